"""The `train` flow: one LoRA training as its own flow run, so it can run on the GPU work pool.

The pipeline (flows/pipeline.py) trains in-process by default. With `training.deployment: train/gpu`
the training stage (tasks/train.py, train_on_deployment) starts a run of this flow through the
deployment, on whichever host runs a `gpu` worker, waits, and gets the same candidate `train_adapter`
returns. Only references cross the boundary: the result is a small JSON document persisted in the
result storage both sides read, and the adapter travels as an MLflow artifact of the pipeline's run
when the two sides do not share a disk.

A global concurrency limit (`gpu-training`, one slot per GPU, created by `make up`) keeps one
training per GPU however many runs are queued.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.concurrency.sync import concurrency

from deployments.stack import GPU_LIMIT
from phitune.config import PipelineConfig
from tasks.train import publish_adapter, train_adapter


@flow(name="train", persist_result=True, result_serializer="json", log_prints=True)
def train(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """Fine-tune one LoRA adapter (resuming from work_dir's last checkpoint) under the GPU limit."""
    with concurrency(GPU_LIMIT, occupy=1):
        trained = train_adapter(config, data, run_id, work_dir)
    return publish_adapter(config, run_id, trained)
