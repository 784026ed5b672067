"""Model versions whose weights live elsewhere (a model fine-tuned on Azure), in the same registry as local ones.

An Azure serverless fine-tune cannot be downloaded: the version's `source` is the Azure model URI, and
its tags say where it lives and carry the same lineage as a local version (run, data and config
digests), so the MLflow UI lists Azure and local versions of one registered model side by side and
the promotion gate, `unchanged_champion`, retire and the monitor treat both alike. Its evaluation
metrics are known only after it has been deployed and queried, so they are tagged separately
(`record_version_metrics`), before the gate reads them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phitune.config import PipelineConfig
from phitune.registry import tags as T
from phitune.registry.runs import config_digest
from phitune.registry.store import configure

LOCATION_TAG = "phitune.location"
"""Where a version's weights live: absent or "local" for MLflow-logged adapters, "azure" for Azure fine-tunes."""
AZURE_TAG_PREFIX = "phitune.azure."
"""+ name: facts of the Azure fine-tune (job, hyperparameters, data assets, Azure model id, job metrics)."""


def register_external_version(
    cfg: PipelineConfig,
    run_id: str,
    source: str,
    *,
    data_digest: str,
    location: str,
    base_model: str,
    tags: Mapping[str, str] | None = None,
) -> ModelVersion:
    """Register `source` (e.g. an azureml:// model URI) as a new version of `registry.model_name`, linked to `run_id`.

    `base_model` is the model the fine-tune started from as its platform names it (for Azure the
    registry model id): a local run then sees that the version cannot ride on its own base model and
    judges it by its recorded metrics instead of trying to download an adapter.
    """
    store = configure(cfg.registry)
    client, name = store.client, cfg.registry.model_name
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {
        LOCATION_TAG: location,
        T.RUN_ID_TAG: run_id,
        T.DATA_DIGEST_TAG: data_digest,
        T.CONFIG_DIGEST_TAG: config_digest(cfg, data_digest),
        T.BASE_MODEL_TAG: base_model,
        **(tags or {}),
    }
    return client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in version_tags.items()})


def azure_version_tags(job: Mapping[str, Any]) -> dict[str, str]:
    """`phitune.azure.*` tags of a version from an Azure fine-tune (AzureFinetuneResult.to_dict()): job, hyperparameters, metrics."""
    facts = {**job["params"], **{k: repr(v) for k, v in job["metrics"].items()}, "azure_model_name": job["model_name"],
             "azure_model_version": job["model_version"], "azure_model_asset_id": job["model_asset_id"],
             "azure_studio_url": job.get("studio_url") or ""}
    return {AZURE_TAG_PREFIX + k.removeprefix("azure_"): str(v) for k, v in facts.items()}


def record_version_metrics(cfg: PipelineConfig, version: str, metrics: Mapping[str, float]) -> None:
    """Tag the version with its evaluation metrics (what a later promotion gate compares against)."""
    client = configure(cfg.registry).client
    for key, value in metrics.items():
        client.set_model_version_tag(cfg.registry.model_name, str(version), f"{T.METRIC_TAG_PREFIX}{key}", repr(float(value)))


def log_to_run(
    cfg: PipelineConfig,
    run_id: str,
    *,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    json_artifacts: Mapping[str, Any] | None = None,
) -> None:
    """Params, metrics and JSON documents (artifact path -> object) of a remote stage, on the pipeline's run."""
    client = configure(cfg.registry).client
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
    )
    for path, document in (json_artifacts or {}).items():
        client.log_text(run_id, json.dumps(document, indent=2, default=str) + "\n", path)
