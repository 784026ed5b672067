"""The `train` flow: one LoRA training as its own flow run, so it can run on the GPU work pool.

The pipeline (flows/pipeline.py) trains in-process by default. With `training.deployment: train/gpu`
it calls `train_on_deployment` instead, which starts a run of this flow through the deployment (on
whichever host runs a `gpu` worker), waits, and returns the same dict `train_adapter` returns. Only
references cross the boundary: the result is a small JSON document (paths, the MLflow run id,
metrics) persisted in the result storage both sides read, and the adapter itself travels as an
MLflow artifact of the pipeline's run when the two sides do not share a disk.

A global concurrency limit (`gpu-training`, one slot per GPU, created by `make up`) keeps one
training per GPU however many runs are queued.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.states import Scheduled

from phitune.config import PipelineConfig
from phitune.errors import TrainingError
from phitune.stack import GPU_LIMIT
from tasks.train import train_adapter

ADAPTER_ARTIFACT = "adapter"
POLL_SECONDS = 2.0


@flow(name="train", persist_result=True, result_serializer="json", log_prints=True)
def train(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """Fine-tune one LoRA adapter (resuming from work_dir's last checkpoint) under the GPU limit."""
    with concurrency(GPU_LIMIT, occupy=1):
        result = train_adapter(config, data, run_id, work_dir)
    client = mlflow.MlflowClient(config.registry.tracking_uri)
    client.log_artifacts(run_id, result["adapter_dir"], ADAPTER_ARTIFACT)
    return {**result, "adapter_uri": f"runs:/{run_id}/{ADAPTER_ARTIFACT}"}


def train_on_deployment(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """Run `train` as a run of `config.training.deployment`, wait for it, return its result.

    The run is keyed by the MLflow run id: when the pipeline run is retried, the same training run is
    found again (and retried from its checkpoint if it had failed or crashed) instead of starting a
    second one. An adapter that is not on this machine's disk is downloaded from MLflow into work_dir.
    """
    logger = get_run_logger()
    parameters = {"config": config.model_dump(mode="json"), "data": data, "run_id": run_id, "work_dir": work_dir}
    flow_run = run_deployment(
        config.training.deployment, parameters=parameters, timeout=0, idempotency_key=f"phitune-train-{run_id}"
    )
    with get_client(sync_client=True) as client:
        if flow_run.state is not None and flow_run.state.is_final() and not flow_run.state.is_completed():
            logger.info("Training run %s ended %s before: retrying it from its checkpoint.", flow_run.name, flow_run.state.name)
            client.set_flow_run_state(flow_run.id, Scheduled(), force=True)
        logger.info("Training runs as flow run %s of deployment %s.", flow_run.name, config.training.deployment)
        while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
            time.sleep(POLL_SECONDS)
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
