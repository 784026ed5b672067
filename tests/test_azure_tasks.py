"""The Prefect side of the Azure backend, on a real (temporary) Prefect server, a real MLflow store and the
fake Azure: the training stage's progress artifact and status log, the endpoint key in a Secret block,
and the hook that cancels the Azure job of a crashed or cancelled flow run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from azure_fake import FakeAzure, Reply, route_blob_uploads, write_chat_jsonl
from prefect import flow
from prefect.artifacts import Artifact
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogHandler
from prefect.states import Cancelled

from phitune import registry
from phitune.azure.client import override_connection
from phitune.azure.finetune import FLOW_RUN_TAG
from phitune.config import PipelineConfig, load_config
from tasks.azure import cancel_azure_job_on_cancel
from tasks.deploy import deploy_challenger, remove_endpoint, secret_block_name
from tasks.train import train_candidate
from tasks.validate import validate_data

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAzure]:
    fake = FakeAzure()
    route_blob_uploads(monkeypatch, fake)
    with override_connection(credential=fake.credential, transport=fake.transport()):
        yield fake


@pytest.fixture
def cfg(fake: FakeAzure, tmp_path: Path, tiny_phi3: Path) -> PipelineConfig:
    return load_config(
        Path(__file__).resolve().parents[1] / "configs/phi3-mini-azure.yaml",
        [
            f"azure.subscription_id={fake.subscription_id}", f"azure.resource_group={fake.resource_group}",
            f"azure.workspace={fake.workspace}", "azure.poll_interval_s=0.01", "azure.poll_max_interval_s=0.02",
            f"registry.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"registry.artifact_location={tmp_path}/artifacts",
            f"model.base_model={tiny_phi3}", "data.validation_file=", f"data.docs_dir={tmp_path}/docs",
        ],
    )


@pytest.fixture
def run_id(cfg: PipelineConfig) -> str:
    store = registry.configure(cfg.registry)
    return store.client.create_run(store.experiment_id).info.run_id


@pytest.fixture
def train_file(tmp_path: Path) -> str:
    return str(write_chat_jsonl(tmp_path / "train.jsonl", 12))


class WorkerLost(BaseException):
    """What Prefect turns into a Crashed flow run (not TerminationSignal: Prefect re-sends that SIGTERM to the test process)."""


@flow(on_crashed=[cancel_azure_job_on_cancel], on_cancellation=[cancel_azure_job_on_cancel])
def azure_train(config: PipelineConfig, train_file: str, run_id: str) -> dict:
    """The pipeline's first two stages on the Azure backend, with the pipeline flow's hooks."""
    config = config.model_copy(update={"data": config.data.model_copy(update={"train_file": train_file})})
    work_dir = str(Path(train_file).parent / "work")
    return train_candidate(config, validate_data(config, work_dir), run_id, work_dir)


def flow_run_logs(flow_run_id: object) -> str:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_finetune_task_reports_progress_and_tags_the_job_with_the_flow_run(
    fake: FakeAzure, cfg: PipelineConfig, train_file: str, run_id: str
) -> None:
    state = azure_train(cfg, train_file, run_id, return_state=True)

    candidate = state.result()
    job_result = candidate["azure_job"]
    assert candidate["location"] == "azure" and job_result["state"] == "succeeded" and candidate["model_uri"] == job_result["model_uri"]
    (job,) = fake.jobs.values()
    assert job["properties"]["tags"][FLOW_RUN_TAG] == str(state.state_details.flow_run_id)
    progress = Artifact.get("azure-finetune-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    assert Artifact.get("azure-preflight") is not None
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert "[PASS   ] region: eastus2 supports serverless fine-tuning" in logs
    assert f"submitted Azure fine-tuning job {job_result['job_name']}" in logs
    assert "Azure job status Running (running)" in logs and "Azure job status Completed (succeeded)" in logs


def test_failing_preflight_stops_the_flow_before_any_upload(fake: FakeAzure, cfg: PipelineConfig, train_file: str, run_id: str) -> None:
    fake.location = "westeurope"

    state = azure_train(cfg, train_file, run_id, return_state=True)

    assert state.is_failed() and "region westeurope does not support" in str(state.message)
    assert not fake.sent("PUT")


def test_crashed_flow_run_cancels_its_azure_job(fake: FakeAzure, cfg: PipelineConfig, train_file: str, run_id: str) -> None:
    fake.job_script = ["Queued", "Running"]
    # The flow run's process dies while the task polls the job (at the third status read).
    fake.inject("GET", r"/jobs/[^/]+$", Reply(raises=WorkerLost()), after=4)

    with pytest.raises(WorkerLost):
        azure_train(cfg, train_file, run_id)

    (name,) = fake.jobs
    (cancel,) = fake.sent("POST", r"/jobs/[^/]+/cancel$")
    assert cancel.path == f"{fake.ws_path}/jobs/{name}/cancel"
    assert fake.jobs[name]["_status"] == "CancelRequested"
    flow_run_id = fake.jobs[name]["properties"]["tags"][FLOW_RUN_TAG]
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.is_crashed()  # type: ignore[union-attr]
    assert f"cancelled Azure job(s) {name}" in flow_run_logs(flow_run_id)


def test_cancel_hook_reads_the_config_parameter_and_cancels_only_that_runs_job(fake: FakeAzure, cfg: PipelineConfig, train_file: str, run_id: str) -> None:
    fake.job_script = ["Running"]
    cfg.azure.job_timeout_h = 1e-6  # the flow gives up waiting; the job keeps running in Azure
    first = azure_train(cfg, train_file, run_id, return_state=True)
    second = azure_train(cfg, train_file, run_id, return_state=True)
    assert first.is_failed() and second.is_failed() and len(fake.jobs) == 2
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first.state_details.flow_run_id)

    cancel_azure_job_on_cancel(azure_train, flow_run, Cancelled())

    (cancel,) = fake.sent("POST", r"/jobs/[^/]+/cancel$")
    (mine,) = [n for n, j in fake.jobs.items() if j["properties"]["tags"][FLOW_RUN_TAG] == str(flow_run.id)]
    assert cancel.path.endswith(f"/jobs/{mine}/cancel")


def test_deploy_keeps_the_key_in_a_secret_block_only(fake: FakeAzure, cfg: PipelineConfig, run_id: str) -> None:
    model_id = fake.add_model("phitune-ft", "1")["properties"]["modelUri"]
    mv = registry.register_external_version(cfg, run_id, model_id, data_digest="d" * 64, location="azure", base_model=cfg.azure.model_id)
    name = "phitune-phi3-mini-ft-v1"

    @flow
    def deploy_then_remove() -> dict:
        deployed = deploy_challenger(cfg, {"name": mv.name, "version": str(mv.version)})
        assert Secret.load(secret_block_name(deployed["endpoint"])).get() == f"pk-{name}-secret"
        remove_endpoint(cfg, deployed)
        return deployed

    state = deploy_then_remove(return_state=True)

    deployed = state.result()
    assert deployed["endpoint"] == name and secret_block_name(name) == f"azure-endpoint-key-{name}"
    assert deployed["base_url"] == f"https://{name}.eastus2.models.ai.azure.com"
    assert "pk-" not in str(deployed)  # the key itself is nowhere in the result
    logs = flow_run_logs(state.state_details.flow_run_id)
    assert f"key in Secret block 'azure-endpoint-key-{name}'" in logs and "pk-" not in logs
    with pytest.raises(ValueError):
        Secret.load(secret_block_name(name))  # removed with the endpoint
    assert fake.sent("DELETE", f"/serverlessEndpoints/{name}$")
    assert not [k for k in registry.configure(cfg.registry).client.get_model_version(mv.name, mv.version).tags if k.startswith("endpoint.")]
