"""The register stage: the pipeline's MLflow run, the candidate as a model version, and the promotion gate.

One gate for every backend: a local adapter (logged as an MLflow model) and an Azure fine-tune
(registered by reference, `phitune.location=azure`) become versions of the same registered model,
and `promotion_gate` judges either on the evaluation stage's metrics. Also the rollback that the
SLO-breach automation runs.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.utilities.hashing import hash_objects

from phitune import registry
from phitune.config import PipelineConfig
from phitune.errors import EndpointError
from phitune.registry.external import azure_version_tags
from phitune.registry.promotion import LOCK_TIMEOUT_S
from phitune.registry.runs import set_run_tags
from phitune.serving.endpoints import find_endpoint

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
    """A pipeline run registers one version and gates it once, however often its flow run is retried."""
    return hash_objects(context.task.name, parameters["run_id"])


@task(name="register-candidate", cache_key_fn=_once_per_mlflow_run)
def register_candidate(config: PipelineConfig, run_id: str, candidate: dict[str, Any], digest: str) -> dict[str, Any]:
    """The candidate as a new version of registry.model_name with its lineage; {"name", "version", "model_uri", "location"}.

    A local adapter is logged on its base model (an MLflow transformers model); an Azure fine-tune,
    which cannot be downloaded, is registered by its Azure model URI with the job's facts as tags.
    """
    if candidate["location"] == "azure":
        job = candidate["azure_job"]
        mv = registry.register_external_version(config, run_id, candidate["model_uri"], data_digest=digest, location="azure",
                                                base_model=candidate["base_model"], tags=azure_version_tags(job))
        get_run_logger().info("registered %s v%s from Azure model %s:%s (%s)", mv.name, mv.version, job["model_name"],
                              job["model_version"], candidate["model_uri"])
    else:
        mv = registry.log_model_version(config, run_id, candidate["adapter_dir"], digest)
        get_run_logger().info("registered %s v%s from %s", mv.name, mv.version, candidate["adapter_dir"])
    return {"name": mv.name, "version": str(mv.version), "model_uri": f"models:/{mv.name}/{mv.version}", "location": candidate["location"]}


@task(name="promotion-gate", cache_key_fn=_once_per_mlflow_run)
def promotion_gate(config: PipelineConfig, run_id: str, registered: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Challenger always, champion on merit: the gate of phitune.registry.promote under the promotion lock.

    Records the candidate's metrics on the version (what a later gate compares with), the decision
    on the version and the run, and a markdown artifact comparing base, champion and candidate.
    Returns the registration with "aliases", "promoted" and "reason".
    """
    name, version = registered["name"], registered["version"]
    registry.record_version_metrics(config, version, evaluation["candidate"])
    ensure_limit(PROMOTION_LIMIT)
    with concurrency(PROMOTION_LIMIT, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True):
        decision = registry.promote(config.registry, version, evaluation)
    get_run_logger().info("%s v%s: %s", name, version, decision.reason)
    set_run_tags(config, run_id, {"phitune.registered_version": version, "phitune.promoted": str(decision.promoted).lower()})
    create_markdown_artifact(
        markdown=registry.comparison_markdown(name, version, evaluation, decision),
        key="promotion-gate",
        description=f"{name} v{version}: promotion gate on {decision.metric}",
    )
    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if decision.promoted else [])
    return {**registered, "aliases": aliases, "promoted": decision.promoted, "reason": decision.reason}


@task(name="rollback-champion", cache_policy=NONE)
def rollback_champion(config: PipelineConfig, endpoint: str, model_name: str, breached_version: str | None) -> dict[str, Any]:
    """Champion alias -> the previous version, when `endpoint` still serves the breached champion.

    Returns {"endpoint", "version", "rolled_back", "redeploy"}: nothing is done when the endpoint
    already serves another version than the breached one (the automation fired twice).
    """
    logger = get_run_logger()
    client = registry.configure(config.registry).client
    live = find_endpoint(client, endpoint)
    if live is None:
        raise EndpointError(f"rollback: no live endpoint named {endpoint!r} in the registry")
    if breached_version and live.version != str(breached_version):
        logger.info("%s already serves v%s, not the breached v%s: nothing to do", endpoint, live.version, breached_version)
        return {"endpoint": endpoint, "version": live.version, "rolled_back": False, "redeploy": False}
    champion = registry.current_champion(client, model_name)
    rolled_back = champion is not None and str(champion.version) == live.version
    version = registry.rollback_champion(model_name, client) if rolled_back else str(champion.version if champion else live.version)
    if rolled_back:
        logger.info("%s: champion rolled back from v%s to v%s", model_name, live.version, version)
    return {"endpoint": endpoint, "version": version, "rolled_back": rolled_back, "redeploy": True}


@task(name="retire-version", cache_policy=NONE)
def retire_version(config: PipelineConfig, name: str, version: str) -> str:
    """Delete a model version and its artifacts (phitune.registry.retire); refused while served or champion."""
    message = registry.retire(name, version, registry.configure(config.registry).client)
    get_run_logger().info(message)
    return message
