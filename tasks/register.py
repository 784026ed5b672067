"""Prefect tasks around the MLflow registry: open/close the pipeline's run, skip when unchanged,
register the adapter and run the promotion gate."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from phitune import registry
from phitune.config import PipelineConfig
from phitune.registry.promotion import LOCK_TIMEOUT_S
from phitune.registry.runs import set_run_tags

PROMOTION_LIMIT = "phitune-promotion"


def _once_per_pipeline_run(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """One MLflow run per flow run, config and data digest: a retried flow run continues its own run.

    Not keyed on the whole `data` dict: it carries validation timings that differ on every attempt."""
    return hash_objects("open-run", str(context.task_run.flow_run_id), parameters["config"].model_dump(mode="json"), parameters["data"]["digest"])


@task(name="open-run", cache_key_fn=_once_per_pipeline_run)
def open_run(config: PipelineConfig, data: dict[str, Any]) -> str:
    """One MLflow run per pipeline run (params, dataset inputs, lineage tags, validation report); its id."""
    extra = {"prefect.flow_run_id": str(flow_run.get_id())} if flow_run.get_id() else {}
    return registry.open_run(config, data, extra)


@task(name="close-run")
def close_run(config: PipelineConfig, run_id: str, status: str = "FINISHED", note: str | None = None) -> None:
    registry.close_run(config, run_id, status, note)


@task(name="unchanged-champion", retries=2, retry_delay_seconds=5)
def unchanged_champion(config: PipelineConfig, digest: str) -> str | None:
    """The champion version trained on this data digest and training config, if any (then training is skipped)."""
    return registry.unchanged_champion(config, digest)


def ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit on first use (without it, concurrency() would not block)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


def _once_per_mlflow_run(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """A pipeline run registers one version, however often its flow run is retried."""
    return hash_objects("register-and-promote", parameters["run_id"])


@task(name="register-and-promote", cache_key_fn=_once_per_mlflow_run)
def register_and_promote(
    config: PipelineConfig, run_id: str, train: dict[str, Any], evaluation: dict[str, Any], digest: str
) -> dict[str, Any]:
    """Register the adapter as a new version (challenger) and run the promotion gate.

    Returns {"name", "version", "model_uri", "aliases", "promoted", "reason"}; writes a markdown
    artifact comparing base, champion and candidate with the gate's reason.
    """
    logger = get_run_logger()
    name = config.registry.model_name
    version = str(registry.log_model_version(config, run_id, train["adapter_dir"], evaluation["candidate"], digest).version)
    ensure_limit(PROMOTION_LIMIT)
    with concurrency(PROMOTION_LIMIT, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True):
        decision = registry.promote(config.registry, version, evaluation)
    logger.info("%s v%s: %s", name, version, decision.reason)
    set_run_tags(config, run_id, {"phitune.registered_version": version, "phitune.promoted": str(decision.promoted).lower()})
    create_markdown_artifact(
        markdown=registry.comparison_markdown(name, version, evaluation, decision),
        key="promotion-gate",
        description=f"{name} v{version}: promotion gate on {decision.metric}",
    )
    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if decision.promoted else [])
    return {
        "name": name, "version": version, "model_uri": f"models:/{name}/{version}",
        "aliases": aliases, "promoted": decision.promoted, "reason": decision.reason,
    }
