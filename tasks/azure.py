"""The Azure training backend (`training.backend: azure`), and the flow hook that cancels a flow run's Azure jobs.

What a user of Azure AI Foundry's fine-tuning wizard does, without the portal:

    config checks -> pre-flight (cost drivers on the MLflow run) -> data assets -> serverless fine-tuning job

`train_on_azure` returns the candidate reference (the Azure model URI); the pipeline then registers,
evaluates (through an endpoint), gates and deploys it with the same tasks as a local candidate.
Thin wrappers over `phitune.azure`: they add what only orchestration knows, i.e. task logs, artifacts,
a progress artifact for the fine-tuning job, and cancellation of the Azure job when the flow run is
cancelled or crashes.

Use the hook on the pipeline flow:
    @flow(on_cancellation=[cancel_azure_job_on_cancel], on_crashed=[cancel_azure_job_on_cancel])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run as current_flow_run

from phitune.azure.client import connect
from phitune.azure.data_assets import DataAssetRef, upload_training_data
from phitune.azure.finetune import PROGRESS, AzureFinetuneResult, JobState, cancel_flow_run_jobs, run_finetune
from phitune.azure.preflight import ContractReport, PreflightError, PreflightReport, check_azure_config, run_preflight
from phitune.config import PipelineConfig
from phitune.errors import PhituneError
from phitune.registry.external import log_to_run


@dataclass
class _PassedContract:
    """validate_data's verdict in the shape the pre-flight reads: the data already passed, don't validate it twice."""

    stats: dict[str, Any]
    valid: bool = True
    errors: list[Any] = field(default_factory=list)


@task(name="azure-preflight")
def azure_preflight(config: PipelineConfig, run_id: str, train_file: str, validation_file: str | None,
                    contract: ContractReport | None = None) -> PreflightReport:
    """Check everything before anything is uploaded or paid for; a table artifact lists each item.

    The cost drivers become run metrics, each check's outcome a param, the whole report an artifact.
    """
    logger = get_run_logger()
    report = run_preflight(connect(config.azure), config, Path(train_file), Path(validation_file) if validation_file else None, contract, raise_on_failure=False)
    for line in report.render().splitlines():
        (logger.info if not line.startswith(("[FAIL", "[SKIPPED")) else logger.error)(line)
    create_table_artifact(key="azure-preflight", table=[asdict(c) for c in report.checks], description="Azure pre-flight checks")
    params: dict[str, Any] = {f"azure_preflight.{c.name.replace(' ', '_')}": c.status for c in report.checks}
    params["azure_workspace_location"] = report.workspace_location
    metrics: dict[str, float] = {}
    if report.cost:
        metrics = report.cost.as_metrics()
    log_to_run(config, run_id, params=params, metrics=metrics, json_artifacts={"azure/preflight.json": report.to_dict()})
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
def azure_finetune(config: PipelineConfig, run_id: str, train: DataAssetRef, validation: DataAssetRef | None) -> AzureFinetuneResult:
    """Submit the fine-tuning job and wait for it, with its status in the log and a progress artifact.

    The job's params and metrics land on the pipeline's MLflow run, the job itself as an artifact.

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
    log_to_run(config, run_id, params=result.params, metrics=result.metrics, json_artifacts={"azure/finetune-job.json": result.to_dict()})
    return result


def train_on_azure(config: PipelineConfig, data: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The Azure backend of the training stage: the candidate is the Azure model URI of the fine-tune.

    Raises before anything is uploaded or paid for when the config or the pre-flight says it cannot work.
    """
    check_azure_config(config)
    azure_preflight(config, run_id, data["train_file"], data.get("validation_file"), _PassedContract(data.get("stats") or {}))
    train, validation = azure_upload_data(config, data["train_file"], data.get("validation_file"))
    job = azure_finetune(config, run_id, train, validation)
    return {"location": "azure", "model_uri": job.model_uri, "base_model": job.base_model_id, "azure_job": job.to_dict()}


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
