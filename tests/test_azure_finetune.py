"""Data assets and the fine-tuning job against the fake Azure, through azure-ai-ml's real HTTP layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from azure_fake import FakeAzure, FakeCredential, Reply, route_blob_uploads, write_chat_jsonl

from phitune.azure.client import AzureClients, connect
from phitune.azure.data_assets import upload_training_data
from phitune.azure.errors import AzureAuthError, AzureJobError
from phitune.azure.finetune import FLOW_RUN_TAG, cancel_flow_run_jobs, run_finetune, to_phitune_state
from phitune.config import PipelineConfig, load_config
from phitune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FLOW_RUN_ID = "0b6f4a9e-3c1d-4f7a-9a52-1f2e3d4c5b6a"


class Clock:
    """Injected time: `sleep` advances `now`, so polling runs instantly and its waits are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAzure:
    fake = FakeAzure()
    route_blob_uploads(monkeypatch, fake)
    return fake


@pytest.fixture
def cfg(fake: FakeAzure) -> PipelineConfig:
    return load_config(
        ROOT / "configs/phi3-mini-azure.yaml",
        [f"azure.subscription_id={fake.subscription_id}", f"azure.resource_group={fake.resource_group}", f"azure.workspace={fake.workspace}"],
    )


@pytest.fixture
def az(fake: FakeAzure, cfg: PipelineConfig) -> AzureClients:
    return connect(cfg.azure, credential=fake.credential, transport=fake.transport())


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_chat_jsonl(tmp_path / "train.jsonl", 20), write_chat_jsonl(tmp_path / "validation.jsonl", 5, start=100)


def blob_puts(fake: FakeAzure) -> list:
    return [r for r in fake.sent("PUT", r"\.blob\.core\.windows\.net/") if r.query.get("comp") != "metadata"]


def test_data_assets_are_named_by_digest_and_uploaded_once(fake: FakeAzure, az: AzureClients, files: tuple[Path, Path]) -> None:
    train, validation = upload_training_data(az, *files)

    assert train.name == "phitune-train" and validation is not None and validation.name == "phitune-validation"
    assert len(train.version) == 12 and train.sha256.startswith(train.version)
    assert train.uploaded and validation.uploaded
    assert train.asset_id == f"{fake.ws_path}/data/phitune-train/versions/{train.version}"
    uploads = blob_puts(fake)
    assert sorted(r.body for r in uploads) == sorted(p.read_bytes() for p in files)
    (put,) = fake.sent("PUT", f"/data/phitune-train/versions/{train.version}$")
    assert put.api_version == "2023-04-01-preview"
    body = put.json()["properties"]
    assert body["dataType"] == "uri_file" and body["dataUri"].endswith("/train.jsonl")
    assert body["tags"]["sha256"] == train.sha256

    fake.requests.clear()
    again, again_val = upload_training_data(az, *files)

    assert (again.version, again.uploaded, again_val.uploaded) == (train.version, False, False)  # type: ignore[union-attr]
    assert [r.method for r in fake.requests] == ["GET", "GET"]  # one existence check per file, nothing uploaded


def test_changed_data_gets_a_new_version(az: AzureClients, files: tuple[Path, Path], tmp_path: Path) -> None:
    first, _ = upload_training_data(az, files[0], None)
    second, _ = upload_training_data(az, write_chat_jsonl(tmp_path / "train2.jsonl", 21), None)

    assert second.version != first.version and second.uploaded


def test_finetune_success_sends_the_job_and_returns_the_registered_model(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    train, validation = upload_training_data(az, *files)
    clock, seen = Clock(), []

    result = run_finetune(
        az, cfg, train, validation, flow_run_id=FLOW_RUN_ID,
        on_status=lambda state, status, elapsed: seen.append((state, status, elapsed)),
        sleep=clock.sleep, clock=clock,
    )

    (put,) = fake.sent("PUT", r"/jobs/[^/]+$")
    assert put.api_version == "2024-10-01-preview"
    props = put.json()["properties"]
    assert props["jobType"] == "FineTuning"
    assert props["experimentName"] == "phitune"
    assert props["tags"][FLOW_RUN_TAG] == FLOW_RUN_ID
    details = props["fineTuningDetails"]
    assert details["taskType"] == "chatCompletion" and details["modelProvider"] == "Custom"
    assert details["model"] == {"uri": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15", "jobInputType": "mlflow_model"}
    assert details["trainingData"] == {"uri": train.asset_id, "jobInputType": "uri_file"}
    assert details["validationData"] == {"uri": validation.asset_id, "jobInputType": "uri_file"}  # type: ignore[union-attr]
    assert details["hyperParameters"] == {"num_train_epochs": "3", "learning_rate": "0.0002", "per_device_train_batch_size": "8"}
    assert all(isinstance(v, str) for v in details["hyperParameters"].values())
    assert props["outputs"]["registered_model"] == {"assetName": put.path.rsplit("/", 1)[1], "jobOutputType": "mlflow_model"}
    assert "computeId" not in props  # serverless

    assert [s[1] for s in seen] == ["Queued", "Running", "Running", "Finalizing", "Completed"]
    assert [s[0] for s in seen] == ["queued", "running", "running", "running", "succeeded"]
    assert clock.sleeps == [30.0, 30.0, 45.0, 30.0]  # back-off while unchanged, reset on a change

    assert result.state == "succeeded" and result.azure_status == "Completed"
    assert result.job_name == put.path.rsplit("/", 1)[1] and result.job_name.startswith("phitune-phi-3-mini-4k-instruct-")
    assert result.model_name == result.job_name and result.model_version == "1"
    assert result.model_uri == f"azureml://locations/eastus2/workspaces/{fake.workspace_guid}/models/{result.model_name}/versions/1"
    assert result.model_asset_id == f"{fake.ws_path}/models/{result.model_name}/versions/1"
    assert result.params["azure_learning_rate"] == "0.0002" and result.params["azure_train_data"] == train.short_uri
    assert result.metrics == {"azure_job_duration_s": 2550.0, "azure_compute_duration_s": 2412.5}
    assert result.to_dict()["train_asset"]["sha256"] == train.sha256
    assert json.dumps(result.to_dict())  # JSON-able for MLflow tags/params


def test_no_validation_file_builds_the_job_without_validation_data(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    train, _ = upload_training_data(az, files[0], None)
    clock = Clock()

    run_finetune(az, cfg, train, None, sleep=clock.sleep, clock=clock)

    (put,) = fake.sent("PUT", r"/jobs/[^/]+$")
    details = put.json()["properties"]["fineTuningDetails"]
    assert "validationData" not in details
    assert FLOW_RUN_TAG not in put.json()["properties"]["tags"]


def test_managed_compute_variant_sets_the_compute(fake: FakeAzure, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    cfg.azure.compute = "gpu-a100"
    az = connect(cfg.azure, credential=fake.credential, transport=fake.transport())
    train, _ = upload_training_data(az, files[0], None)
    clock = Clock()

    run_finetune(az, cfg, train, None, sleep=clock.sleep, clock=clock)

    (put,) = fake.sent("PUT", r"/jobs/[^/]+$")
    assert put.json()["properties"]["computeId"] == f"{fake.ws_path}/computes/gpu-a100"
    assert put.json()["properties"]["fineTuningDetails"]["model"]["uri"].endswith("Phi-3-mini-4k-instruct/versions/15")


def test_failed_job_surfaces_azures_error_message(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    fake.job_script = ["NotStarted", "Queued", "Running", "Failed"]
    fake.job_error = ("UserError", "Training data row 17 has no 'messages' field.")
    train, _ = upload_training_data(az, files[0], None)
    clock, states = Clock(), []

    with pytest.raises(AzureJobError) as info:
        run_finetune(az, cfg, train, None, on_status=lambda s, a, e: states.append(s), sleep=clock.sleep, clock=clock)

    assert str(info.value).startswith(f"Azure fine-tuning job {info.value.job_name} failed: UserError: Training data row 17 has no 'messages' field.")
    assert "logs: https://ml.azure.com/runs/" in str(info.value)
    assert info.value.azure_status == "Failed" and states[-1] == "failed"
    (run,) = fake.sent("GET", rf"/history/v1\.0/.*/runs/{info.value.job_name}$")
    assert run.host == "eastus2.api.azureml.ms"


def test_throttled_requests_are_retried_by_the_sdk(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    fake.job_script = ["NotStarted", "Completed"]
    train, _ = upload_training_data(az, files[0], None)
    too_many = Reply(429, {"error": {"code": "TooManyRequests", "message": "Rate limit exceeded"}}, {"Retry-After": "0"})
    fake.inject("PUT", r"/jobs/[^/]+$", too_many)
    fake.inject("GET", r"/jobs/[^/]+$", Reply(503, {"error": {"code": "ServiceUnavailable", "message": "try later"}}, {"Retry-After": "0"}))
    clock = Clock()

    result = run_finetune(az, cfg, train, None, sleep=clock.sleep, clock=clock)

    assert result.state == "succeeded"
    puts = fake.sent("PUT", r"/jobs/[^/]+$")
    assert len(puts) == 2 and puts[0].body == puts[1].body  # the same request, sent again


def test_expired_credential_during_submit_is_one_clear_error(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    train, _ = upload_training_data(az, files[0], None)
    expired = FakeCredential(error="AADSTS700082: The refresh token has expired due to inactivity.")
    later = connect(cfg.azure, credential=expired, transport=fake.transport())  # e.g. the next Prefect task

    with pytest.raises(AzureAuthError) as info:
        run_finetune(later, cfg, train, None)

    message = str(info.value)
    assert message.startswith("submit fine-tuning job phitune-")
    assert "Azure did not accept the credential (AADSTS700082: The refresh token has expired" in message
    assert "az login" in message
    assert not fake.sent("PUT", "/jobs/")


def test_timeout_says_the_job_keeps_running(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    fake.job_script = ["Queued"]
    cfg.azure.job_timeout_h = 1.0
    train, _ = upload_training_data(az, files[0], None)
    clock = Clock()

    with pytest.raises(AzureJobError, match=r"still Queued after 1\.0 h .* it keeps running"):
        run_finetune(az, cfg, train, None, sleep=clock.sleep, clock=clock)

    assert max(clock.sleeps) == 300.0  # capped at azure.poll_max_interval_s


def test_cancel_finds_the_flow_runs_job_by_tag_and_cancels_it(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    fake.job_script = ["Running"]
    train, _ = upload_training_data(az, files[0], None)
    cfg.azure.job_timeout_h = 0.001
    for run_id in (FLOW_RUN_ID, "another-flow-run"):
        clock = Clock()
        with pytest.raises(AzureJobError):
            run_finetune(az, cfg, train, None, flow_run_id=run_id, sleep=clock.sleep, clock=clock)
    mine = next(n for n, j in fake.jobs.items() if j["properties"]["tags"].get(FLOW_RUN_TAG) == FLOW_RUN_ID)

    cancelled = cancel_flow_run_jobs(az, FLOW_RUN_ID)

    assert cancelled == [mine]
    (listing,) = fake.sent("GET", r"/jobs$")
    assert listing.query["tag"] == FLOW_RUN_TAG and listing.query["listViewType"] == "ActiveOnly"
    (cancel,) = fake.sent("POST", r"/jobs/[^/]+/cancel$")
    assert cancel.path == f"{fake.ws_path}/jobs/{mine}/cancel" and cancel.api_version == "2023-04-01-preview"
    assert fake.jobs[mine]["_status"] == "CancelRequested"
    assert cancel_flow_run_jobs(az, FLOW_RUN_ID) == []  # already cancelling: not sent twice


def test_cancelled_job_ends_the_wait(fake: FakeAzure, az: AzureClients, cfg: PipelineConfig, files: tuple[Path, Path]) -> None:
    fake.job_script = ["Queued", "Running", "Canceled"]
    train, _ = upload_training_data(az, files[0], None)

    clock = Clock()
    with pytest.raises(AzureJobError, match="was cancelled"):
        run_finetune(az, cfg, train, None, sleep=clock.sleep, clock=clock)


def test_state_mapping() -> None:
    assert [to_phitune_state(s) for s in ("NotStarted", "Preparing", "Provisioning", "Starting", "Paused")] == ["queued"] * 5
    assert [to_phitune_state(s) for s in ("Running", "Finalizing", "NotResponding", "SomethingNew")] == ["running"] * 4
    assert [to_phitune_state(s) for s in ("Completed", "Failed", "Canceled", "CancelRequested")] == ["succeeded", "failed", "cancelled", "cancelled"]


def test_missing_workspace_settings_are_a_config_error(cfg: PipelineConfig) -> None:
    cfg.azure.workspace = ""
    with pytest.raises(ConfigError, match=r"azure\.workspace not set"):
        connect(cfg.azure, credential=FakeCredential())
