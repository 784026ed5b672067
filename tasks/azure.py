"""Prefect tasks of the Azure backend, and the flow hook that cancels a flow run's Azure jobs.

Thin wrappers over `phitune.azure`: they add what only orchestration knows, i.e. task logs, a
progress artifact for the fine-tuning job, the endpoint key kept in a Prefect Secret block, and
cancellation of the Azure job when the flow run is cancelled or crashes. Keys are never logged and
never returned.

Use the hook on the pipeline flow:
    @flow(on_cancellation=[cancel_azure_job_on_cancel], on_crashed=[cancel_azure_job_on_cancel])
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.blocks.system import Secret
from prefect.runtime import flow_run as current_flow_run

from phitune.azure.client import connect
from phitune.azure.data_assets import DataAssetRef, upload_training_data
from phitune.azure.endpoints import delete_model, delete_serverless_endpoint, deploy_serverless
from phitune.azure.finetune import PROGRESS, AzureFinetuneResult, JobState, cancel_flow_run_jobs, run_finetune
from phitune.azure.preflight import ContractReport, PreflightError, PreflightReport, run_preflight
from phitune.config import PipelineConfig
from phitune.errors import PhituneError


def secret_block_name(endpoint_name: str) -> str:
    """Name of the Prefect Secret block holding an endpoint's key (block names: lowercase, digits, dashes)."""
    return "azure-endpoint-key-" + re.sub(r"[^a-z0-9-]+", "-", endpoint_name.lower()).strip("-")


@task(name="azure-preflight")
def azure_preflight(config: PipelineConfig, train_file: str, validation_file: str | None, contract: ContractReport | None = None) -> PreflightReport:
    """Check everything before anything is uploaded or paid for; a table artifact lists each item."""
    logger = get_run_logger()
    report = run_preflight(connect(config.azure), config, Path(train_file), Path(validation_file) if validation_file else None, contract, raise_on_failure=False)
    for line in report.render().splitlines():
        (logger.info if not line.startswith(("[FAIL", "[SKIPPED")) else logger.error)(line)
    create_table_artifact(key="azure-preflight", table=[asdict(c) for c in report.checks], description="Azure pre-flight checks")
    if not report.ok:
        raise PreflightError(report)
    return report


@task(name="azure-upload-data", retries=2, retry_delay_seconds=30)
def azure_upload_data(config: PipelineConfig, train_file: str, validation_file: str | None) -> tuple[DataAssetRef, DataAssetRef | None]:
    """Training and validation files as digest-named data assets (nothing is uploaded twice)."""
    logger = get_run_logger()
    train, validation = upload_training_data(connect(config.azure), Path(train_file), Path(validation_file) if validation_file else None)
    for ref in (train, validation):
        if ref:
            logger.info("data asset %s (%s)", ref.short_uri, "uploaded" if ref.uploaded else "already in Azure, not uploaded")
    return train, validation


@task(name="azure-finetune")
def azure_finetune(config: PipelineConfig, train: DataAssetRef, validation: DataAssetRef | None) -> AzureFinetuneResult:
    """Submit the fine-tuning job and wait for it, with its status in the log and a progress artifact.

    Not retried: a retry would submit (and bill) a second job.
    """
    logger = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, key="azure-finetune-progress", description="Azure fine-tuning job: submitting")

    def submitted(job_name: str, studio_url: str | None) -> None:
        logger.info("submitted Azure fine-tuning job %s (%s)", job_name, studio_url)

    def status(state: JobState, azure_status: str, elapsed: float) -> None:
        logger.info("Azure job status %s (%s) after %.0f s", azure_status, state, elapsed)
        update_progress_artifact(artifact_id, progress=PROGRESS.get(azure_status, 50.0), description=f"Azure fine-tuning job: {azure_status}")

    result = run_finetune(
        connect(config.azure), config, train, validation,
        flow_run_id=current_flow_run.get_id(), on_status=status, on_submitted=submitted,
    )
    logger.info("fine-tuned model %s:%s registered in Azure (%s)", result.model_name, result.model_version, result.model_uri)
    return result


@task(name="azure-deploy")
def azure_deploy(config: PipelineConfig, model_id: str, base_model_id: str | None = None) -> dict[str, Any]:
    """Deploy to the configured serverless endpoint; the key goes to a Prefect Secret block, never to the result."""
    logger = get_run_logger()
    info = deploy_serverless(connect(config.azure), config.deployment.endpoint_name, model_id, base_model_id=base_model_id)
    block = secret_block_name(info.name)
    Secret(value=info.key).save(block, overwrite=True)
    logger.info("serverless endpoint %s serves %s at %s; key in Secret block %r", info.name, model_id, info.base_url, block)
    return {**info.public_dict(), "secret_block": block}


@task(name="azure-delete-endpoint")
def azure_delete_endpoint(config: PipelineConfig, endpoint_name: str) -> bool:
    """Delete the serverless endpoint and its Secret block; False if the endpoint did not exist."""
    deleted = delete_serverless_endpoint(connect(config.azure), endpoint_name)
    try:
        Secret.delete(secret_block_name(endpoint_name))
    except ValueError:  # no such block
        pass
    get_run_logger().info("serverless endpoint %s %s", endpoint_name, "deleted" if deleted else "did not exist")
    return deleted


@task(name="azure-delete-model")
def azure_delete_model(config: PipelineConfig, model_name: str, version: str) -> None:
    """Delete a fine-tuned model version from the workspace (refused while an endpoint serves it)."""
    delete_model(connect(config.azure), model_name, version)
    get_run_logger().info("deleted Azure model %s:%s", model_name, version)


def _config_of(flow_run: Any) -> PipelineConfig | None:
    value = (getattr(flow_run, "parameters", None) or {}).get("config")
    if value is None:
        return None
    return value if isinstance(value, PipelineConfig) else PipelineConfig.model_validate(value)


def cancel_azure_job_on_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook (on_cancellation / on_crashed): cancel the Azure jobs tagged with this flow run's id.

    Reads the Azure settings from the flow run's `config` parameter. Never raises: a hook that
    fails would hide the state the flow run ended in.
    """
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    try:
        cfg = _config_of(flow_run)
        if cfg is None or cfg.training.backend != "azure":
            return
        cancelled = cancel_flow_run_jobs(connect(cfg.azure), str(flow_run.id))
    except (PhituneError, ValueError) as err:
        logger.error("could not cancel the Azure jobs of flow run %s: %s", flow_run.id, err)
        return
    if cancelled:
        logger.warning("flow run %s: cancelled Azure job(s) %s", state.name if state else "ended", ", ".join(cancelled))
    else:
        logger.info("flow run ended (%s): no active Azure job to cancel", state.name if state else "?")
