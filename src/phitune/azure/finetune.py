"""The Azure fine-tuning job: build it, submit it, follow it, read what it produced.

Serverless ("model as a service") by default; with `azure.compute` set, the same job type runs on
a GPU cluster of the workspace (managed compute). The job entity is built directly instead of with
`azure.ai.ml.finetuning.create_finetuning_job`, which in azure-ai-ml 1.35.2 raises UnboundLocalError
when there is no validation data.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from phitune.azure.client import AzureClients, workspace_path
from phitune.azure.data_assets import DataAssetRef
from phitune.azure.errors import AzureError, AzureJobError, azure_errors
from phitune.azure.preflight import parse_registry_model_id
from phitune.config import PipelineConfig

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
StatusCallback = Callable[[JobState, str, float], None]

FLOW_RUN_TAG = "phitune_flow_run_id"
"""Job tag holding the Prefect flow run id, so a cancel hook can find the flow run's jobs."""

AZURE_STATES: dict[str, JobState] = {
    "NotStarted": "queued",
    "Queued": "queued",
    "Preparing": "queued",
    "Provisioning": "queued",
    "Starting": "queued",
    "Paused": "queued",
    "Running": "running",
    "Finalizing": "running",
    "NotResponding": "running",
    "CancelRequested": "cancelled",
    "Completed": "succeeded",
    "Failed": "failed",
    "Canceled": "cancelled",
}
TERMINAL = {"Completed", "Failed", "Canceled"}
PROGRESS: dict[str, float] = {
    # How far along a status is, for a progress bar: Azure reports no percentage for these jobs.
    "NotStarted": 0, "Queued": 5, "Preparing": 10, "Provisioning": 15, "Starting": 20, "Paused": 20,
    "Running": 50, "NotResponding": 50, "Finalizing": 90, "CancelRequested": 95,
    "Completed": 100, "Failed": 100, "Canceled": 100,
}


def to_phitune_state(azure_status: str) -> JobState:
    """Azure's job status as one of phitune's job states; an unknown status counts as running."""
    return AZURE_STATES.get(azure_status, "running")


def hyperparameters(cfg: PipelineConfig) -> dict[str, str]:
    """The training section as the string hyperparameters Azure's fine-tuning jobs take."""
    t = cfg.training
    return {
        "num_train_epochs": str(t.epochs),
        "learning_rate": str(t.learning_rate),
        "per_device_train_batch_size": str(t.batch_size),
    }


@dataclass
class AzureFinetuneResult:
    """What a finished Azure fine-tune produced, for registration in MLflow (by reference, no weights)."""

    job_name: str
    azure_status: str
    state: JobState
    model_name: str
    model_version: str
    model_uri: str
    """azureml://locations/<region>/workspaces/<workspace guid>/models/<name>/versions/<n>: what a serverless endpoint deploys."""
    model_asset_id: str
    """ARM id of the registered model version in the workspace."""
    base_model_id: str
    train_asset: DataAssetRef
    validation_asset: DataAssetRef | None
    studio_url: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("train_asset", "validation_asset")}
        out["train_asset"] = self.train_asset.to_dict()
        out["validation_asset"] = self.validation_asset.to_dict() if self.validation_asset else None
        return out


def new_job_name(cfg: PipelineConfig) -> str:
    """A unique job name; the fine-tuned model is registered under the same name."""
    base = parse_registry_model_id(cfg.azure.model_id).name.lower().replace(".", "-")
    return f"{cfg.azure.output_model_prefix}-{base}-{uuid.uuid4().hex[:10]}"


def compute_id(cfg: PipelineConfig) -> str | None:
    """ARM id of the managed-compute cluster (`azure.compute` may be a name, azureml:name or an ARM id); None: serverless.

    azure-ai-ml sends a fine-tuning job's compute as given, and the REST API wants an ARM id.
    """
    compute = (cfg.azure.compute or "").strip()
    if not compute:
        return None
    if compute.startswith("/subscriptions/"):
        return compute
    return f"{workspace_path(cfg.azure)}/computes/{compute.removeprefix('azureml:')}"


def build_finetuning_job(
    cfg: PipelineConfig,
    train: DataAssetRef,
    validation: DataAssetRef | None,
    *,
    job_name: str,
    flow_run_id: str | None = None,
) -> Any:
    """The chat-completion fine-tuning job entity (serverless, or on `azure.compute`)."""
    from azure.ai.ml import Input, Output
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import CustomModelFineTuningJob
    from azure.ai.ml.finetuning import FineTuningTaskType

    parse_registry_model_id(cfg.azure.model_id)
    tags = {"created_by": "phitune", "phitune_train_sha256": train.sha256}
    if flow_run_id:
        tags[FLOW_RUN_TAG] = str(flow_run_id)
    return CustomModelFineTuningJob(
        task=FineTuningTaskType.CHAT_COMPLETION,
        model=Input(type=AssetTypes.MLFLOW_MODEL, path=cfg.azure.model_id),
        training_data=Input(type=AssetTypes.URI_FILE, path=train.asset_id),
        validation_data=Input(type=AssetTypes.URI_FILE, path=validation.asset_id) if validation else None,
        hyperparameters=hyperparameters(cfg),
        compute=compute_id(cfg),
        outputs={"registered_model": Output(type=AssetTypes.MLFLOW_MODEL, name=job_name)},
        name=job_name,
        display_name=job_name,
        experiment_name=cfg.azure.experiment,
        description=f"phitune fine-tune of {cfg.azure.model_id}",
        tags=tags,
    )


def submit_job(az: AzureClients, job: Any) -> Any:
    with azure_errors(f"submit fine-tuning job {job.name}"):
        return az.ml.jobs.create_or_update(job)


def _status(job: Any) -> str:
    status = job.status
    return str(getattr(status, "value", status))


def _read_run(az: AzureClients, job_name: str) -> Any | None:
    """The job's run-history record (error details, run properties, times); None if it cannot be read.

    azure-ai-ml exposes no public call for it; `jobs.stream` reads it the same way.
    """
    try:
        return az.ml.jobs._runs_operations.get_run(job_name)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - details are a bonus on top of the job status
        return None


def _failure_message(az: AzureClients, job: Any) -> str:
    run = _read_run(az, job.name)
    err = getattr(getattr(run, "error", None), "error", None)
    detail = f"{err.code}: {err.message}" if err is not None and err.message else "Azure gave no error details"
    where = f" (logs: {job.studio_url})" if getattr(job, "studio_url", None) else ""
    return f"Azure fine-tuning job {job.name} failed: {detail}{where}"


def wait_for_job(
    az: AzureClients,
    job_name: str,
    *,
    on_status: StatusCallback | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Poll the job until it completes; back off 1.5x per unchanged status (reset on a change).

    Calls `on_status(state, azure_status, elapsed_s)` after every read. Raises AzureJobError with
    Azure's error message when the job fails, and when it is cancelled or the timeout passes.
    """
    c = az.config
    start = clock()
    interval, last = c.poll_interval_s, None
    while True:
        with azure_errors(f"read the status of job {job_name}"):
            job = az.ml.jobs.get(job_name)
        status = _status(job)
        elapsed = clock() - start
        if on_status:
            on_status(to_phitune_state(status), status, elapsed)
        if status == "Completed":
            return job
        if status == "Failed":
            raise AzureJobError(_failure_message(az, job), job_name=job_name, azure_status=status)
        if status == "Canceled":
            raise AzureJobError(f"Azure fine-tuning job {job_name} was cancelled", job_name=job_name, azure_status=status)
        if elapsed >= c.job_timeout_h * 3600:
            raise AzureJobError(
                f"Azure fine-tuning job {job_name} is still {status} after {c.job_timeout_h} h (azure.job_timeout_h); "
                f"it keeps running: follow or cancel it at {job.studio_url}",
                job_name=job_name,
                azure_status=status,
            )
        interval = c.poll_interval_s if status != last else min(interval * 1.5, c.poll_max_interval_s)
        last = status
        sleep(interval)


_DURATION = re.compile(r"(?:(?P<d>\d+)\.)?(?P<h>\d+):(?P<m>\d+):(?P<s>\d+(?:\.\d+)?)")


def _timespan_seconds(value: str | None) -> float | None:
    m = _DURATION.fullmatch(value or "")
    if not m:
        return None
    return int(m["d"] or 0) * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])


def collect_result(az: AzureClients, job: Any, train: DataAssetRef, validation: DataAssetRef | None) -> AzureFinetuneResult:
    """The registered fine-tuned model of a completed job, with the job's params and run-time metrics."""
    run = _read_run(az, job.name)
    properties = dict(getattr(run, "properties", None) or {})
    output = (job.outputs or {}).get("registered_model")
    model_name = properties.get("registered_ft_model_name") or getattr(output, "name", None) or job.name
    with azure_errors(f"find the model registered by job {job.name}"):
        versions = [m.version for m in az.ml.models.list(name=model_name)]
        ws = az.ml.workspaces.get(az.config.workspace)
    if not versions:
        raise AzureError(f"job {job.name} completed but no model named {model_name!r} is registered in workspace {az.config.workspace!r}")
    version = max(versions, key=lambda v: (len(v), v))
    metrics: dict[str, float] = {}
    start, end = getattr(run, "start_time_utc", None), getattr(run, "end_time_utc", None)
    if start and end:
        metrics["azure_job_duration_s"] = (end - start).total_seconds()
    compute = _timespan_seconds(getattr(run, "compute_duration", None))
    if compute is not None:
        metrics["azure_compute_duration_s"] = compute
    params = {
        **{f"azure_{k}": v for k, v in (job.hyperparameters or {}).items()},
        "azure_job_name": job.name,
        "azure_base_model": str(job.model.path),
        "azure_compute": str(job.compute or "serverless"),
        "azure_train_data": train.short_uri,
        "azure_validation_data": validation.short_uri if validation else "",
    }
    return AzureFinetuneResult(
        job_name=job.name,
        azure_status=_status(job),
        state=to_phitune_state(_status(job)),
        model_name=model_name,
        model_version=version,
        model_uri=f"azureml://locations/{ws.location}/workspaces/{ws._workspace_id}/models/{model_name}/versions/{version}",  # noqa: SLF001
        model_asset_id=f"{az.workspace_path}/models/{model_name}/versions/{version}",
        base_model_id=str(job.model.path),
        train_asset=train,
        validation_asset=validation,
        studio_url=job.studio_url,
        params=params,
        metrics=metrics,
    )


def run_finetune(
    az: AzureClients,
    cfg: PipelineConfig,
    train: DataAssetRef,
    validation: DataAssetRef | None,
    *,
    flow_run_id: str | None = None,
    on_status: StatusCallback | None = None,
    on_submitted: Callable[[str, str | None], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> AzureFinetuneResult:
    """Submit the fine-tuning job, wait for it, and return the model it registered."""
    job = build_finetuning_job(cfg, train, validation, job_name=new_job_name(cfg), flow_run_id=flow_run_id)
    created = submit_job(az, job)
    if on_submitted:
        on_submitted(created.name, created.studio_url)
    final = wait_for_job(az, created.name, on_status=on_status, sleep=sleep, clock=clock)
    return collect_result(az, final, train, validation)


def cancel_flow_run_jobs(az: AzureClients, flow_run_id: str) -> list[str]:
    """Cancel the active Azure jobs tagged with this Prefect flow run id; return their names."""
    cancelled = []
    with azure_errors(f"list the Azure jobs of flow run {flow_run_id}"):
        jobs = [j for j in az.ml.jobs.list(tag=FLOW_RUN_TAG) if j is not None]
    for job in jobs:
        if (job.tags or {}).get(FLOW_RUN_TAG) != str(flow_run_id) or _status(job) in TERMINAL | {"CancelRequested"}:
            continue
        with azure_errors(f"cancel Azure job {job.name}"):
            az.ml.jobs.begin_cancel(job.name).result()
        cancelled.append(job.name)
    return cancelled

