"""The training stage: one candidate from the configured backend (training.backend), as a reference.

    train_candidate(config, data, run_id, work_dir) -> candidate
      local, in-process   train_adapter        LoRA here (phitune.training.local)
      local, GPU pool     train_on_deployment  the `train` flow as a run of training.deployment (e.g. train/gpu)
      azure               tasks.azure.train_on_azure   an Azure AI Foundry fine-tuning job

A candidate is a small dict: {"location": "local", "adapter_dir", "base_model", "metrics"} or
{"location": "azure", "model_uri", "base_model", "azure_job"}; the register stage turns either into a
model version, and the evaluation stage reaches it as weights or through an endpoint.

`train_adapter` adds what only orchestration knows to `phitune.training.local.train`: per-step metrics on the
pipeline's MLflow run, a progress artifact, and a retry. The work folder is stable across retries of a
flow run, so a retry after a crash (a killed worker, out of memory) resumes from the last checkpoint
instead of starting over. A sanity gate or bad input fails the same way every time, so those are not
retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import State, TaskRun

from phitune.config import PipelineConfig
from phitune.errors import PhituneError, TrainingError

ADAPTER_ARTIFACT = "adapter"

FLUSH_SECONDS = 5.0
"""Per-step records are sent to MLflow and the progress artifact at most this often (and at the end):
on a GPU a step takes milliseconds, and a tracking-server round trip per step would slow training."""

STEP_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_second")


def _retry_on_crash_only(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry unexpected failures (they resume from the checkpoint); a PhituneError would only repeat itself."""
    try:
        state.result()
    except PhituneError:
        return False
    except BaseException:
        return True
    return True


class _StepSink:
    """on_step: buffers step records and flushes them to MLflow (log_batch) and the progress artifact."""

    def __init__(self, client: Any, run_id: str, artifact_id: Any) -> None:
        self.client, self.run_id, self.artifact_id = client, run_id, artifact_id
        self.pending: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def __call__(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if record["step"] == record["total_steps"] or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(r[key]), now, r["step"]) for r in self.pending for key in STEP_METRICS]
        self.client.log_batch(self.run_id, metrics=metrics)
        last = self.pending[-1]
        update_progress_artifact(
            self.artifact_id,
            progress=100.0 * last["step"] / last["total_steps"],
            description=f"Fine-tuning: step {last['step']}/{last['total_steps']}, loss {last['loss']:.4f}, "
            f"{last['tokens_per_second']:.0f} tokens/s",
        )
        self.pending.clear()
        self.last_flush = time.monotonic()


@task(name="train-adapter", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_on_crash_only)
def train_adapter(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """{"adapter_dir", "base_model", "metrics"}: LoRA fine-tuning on data["train_file"], validated on data["validation_file"].

    Logs loss, learning_rate, grad_norm and tokens_per_second per step to the MLflow run `run_id`,
    the run's summary as train_* metrics, and the device/precision as tags.
    """
    from mlflow.entities import Metric, RunTag

    from phitune.registry import client_for
    from phitune.training.local import train

    logger = get_run_logger()
    client = client_for(config.registry.tracking_uri)
    artifact_id = create_progress_artifact(progress=0.0, key="training-progress", description="Fine-tuning: starting")
    sink = _StepSink(client, run_id, artifact_id)
    try:
        result = train(config, Path(data["train_file"]), Path(data["validation_file"]), Path(work_dir), on_step=sink)
    finally:
        sink.flush()  # what was trained before a failure stays visible
    m = result.metrics
    now = int(time.time() * 1000)
    summary = [
        Metric(key if key.startswith("train_") else f"train_{key}", float(value), now, 0)
        for key, value in m.items()
        if isinstance(value, (int, float))
    ]
    tags = [RunTag("phitune.training.device", str(m["device"])), RunTag("phitune.training.precision", str(m["precision"]))]
    client.log_batch(run_id, metrics=summary, tags=tags)
    logger.info(
        "Trained %d steps in %.0f s (%.0f tokens/s, %s/%s%s); validation loss %.4f -> %.4f; adapter: %s",
        m["steps"], m["seconds"], m["tokens_per_second"], m["device"], m["precision"],
        f", resumed from step {m['resumed_from_step']}" if m["resumed_from_step"] else "",
        m["base_eval_loss"], m["eval_loss"], result.adapter_dir,
    )
    return {"location": "local", "adapter_dir": str(result.adapter_dir), "base_model": result.base_model, "metrics": m}


@task(name="publish-adapter")
def publish_adapter(config: PipelineConfig, run_id: str, trained: dict[str, Any]) -> dict[str, Any]:
    """The adapter as an artifact of the pipeline's MLflow run, for a pipeline on another host than the GPU worker."""
    from phitune.registry import client_for

    client_for(config.registry.tracking_uri).log_artifacts(run_id, trained["adapter_dir"], ADAPTER_ARTIFACT)
    return {**trained, "adapter_uri": f"runs:/{run_id}/{ADAPTER_ARTIFACT}"}


@task(name="train-on-deployment")
def train_on_deployment(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """Run the `train` flow as a run of `training.deployment` (the GPU work pool), wait for it, return its result.

    The run is keyed by the MLflow run id: when the pipeline run is retried, the same training run is
    found again (and retried from its checkpoint if it had failed or crashed) instead of starting a
    second one. An adapter that is not on this machine's disk is downloaded from MLflow into work_dir.
    """
    import mlflow.artifacts
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.flow_runs import wait_for_flow_run
    from prefect.states import Scheduled
    from prefect.utilities.asyncutils import run_coro_as_sync

    logger = get_run_logger()
    parameters = {"config": config.model_dump(mode="json"), "data": data, "run_id": run_id, "work_dir": work_dir}
    flow_run = run_deployment(config.training.deployment, parameters=parameters, timeout=0, idempotency_key=f"phitune-train-{run_id}")
    if flow_run.state is not None and flow_run.state.is_final() and not flow_run.state.is_completed():
        logger.info("Training run %s ended %s before: retrying it from its checkpoint.", flow_run.name, flow_run.state.name)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Scheduled(), force=True)
    logger.info("Training runs as flow run %s of deployment %s.", flow_run.name, config.training.deployment)
    flow_run = run_coro_as_sync(wait_for_flow_run(flow_run.id, timeout=None, log_states=True))  # on its state events, no polling
    if not flow_run.state.is_completed():
        raise TrainingError(
            f"training run {flow_run.name} of deployment {config.training.deployment} ended "
            f"{flow_run.state.name}: {flow_run.state.message or 'see its logs in the Prefect UI'}"
        )
    result: dict[str, Any] = flow_run.state.result()
    if not Path(result["adapter_dir"]).exists():
        local = Path(work_dir) / ADAPTER_ARTIFACT
        mlflow.artifacts.download_artifacts(result["adapter_uri"], dst_path=str(local.parent), tracking_uri=config.registry.tracking_uri)
        result["adapter_dir"] = str(local)
    return result


def train_candidate(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """The training stage on the configured backend; returns the candidate reference (see the module docstring)."""
    if config.training.backend == "azure":
        from tasks.azure import train_on_azure

        return train_on_azure(config, data, run_id)
    if config.training.deployment:
        return train_on_deployment(config, data, run_id, work_dir)
    return train_adapter(config, data, run_id, work_dir)
