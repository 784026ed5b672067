"""Prefect task: fine-tune the LoRA adapter locally, with live progress in MLflow and the Prefect UI.

The task adds what only orchestration knows to `phitune.training.local.train`: per-step metrics on the
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
from phitune.errors import PhituneError

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
    return {"adapter_dir": str(result.adapter_dir), "base_model": result.base_model, "metrics": m}
