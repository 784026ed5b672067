"""Azure pre-flight against the fake Azure: every item reported, nothing uploaded, failures named."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from azure_fake import READER, FakeAzure, FakeCredential, Reply, write_chat_jsonl

from phitune.azure.client import connect
from phitune.azure.preflight import PreflightError, action_allowed, check_azure_file, parse_regions, run_preflight
from phitune.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ContractResult:
    """The shape of phitune.data.contract's report, as pre-flight reads it."""

    valid: bool = True
    errors: list[Any] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=lambda: {"files": {"train": {"valid_examples": 20, "tokens": 1200}}})


@dataclass
class ContractIssue:
    file: str
    line: int
    code: str
    message: str


def azure_config(fake: FakeAzure, *overrides: str) -> PipelineConfig:
    return load_config(
        ROOT / "configs/phi3-mini-azure.yaml",
        [f"azure.subscription_id={fake.subscription_id}", f"azure.resource_group={fake.resource_group}", f"azure.workspace={fake.workspace}", *overrides],
    )


@pytest.fixture
def fake() -> FakeAzure:
    return FakeAzure()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_chat_jsonl(tmp_path / "train.jsonl", 20), write_chat_jsonl(tmp_path / "validation.jsonl", 5, start=100)


def preflight(fake: FakeAzure, cfg: PipelineConfig, files: tuple[Path, Path], contract: Any = None, **kw: Any):
    az = connect(cfg.azure, credential=fake.credential, transport=fake.transport())
    return run_preflight(az, cfg, files[0], files[1], contract or ContractResult(), **kw)


def test_all_checks_pass_and_only_reads_are_sent(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    report = preflight(fake, azure_config(fake), files)

    assert report.ok, report.render()
    assert {c.name: c.status for c in report.checks} == {
        "credential": "pass", "workspace": "pass", "region": "pass", "Microsoft.Network": "pass",
        "permissions": "pass", "training file": "pass", "validation file": "pass", "data contract": "pass",
    }
    assert report.workspace_location == "eastus2"
    assert "tag maas-finetuning-deploy-regions" in next(c.detail for c in report.checks if c.name == "region")
    # nothing is uploaded or created by a pre-flight
    assert {r.method for r in fake.requests} == {"GET"}
    assert fake.credential.scopes[0] == ("https://management.azure.com/.default",)
    (provider,) = fake.sent("GET", r"/providers/Microsoft\.Network$")
    assert provider.path == f"/subscriptions/{fake.subscription_id}/providers/Microsoft.Network"
    assert provider.api_version == "2021-04-01"
    (perm,) = fake.sent("GET", "Microsoft.Authorization/permissions")
    assert perm.path == f"{fake.ws_path}/providers/Microsoft.Authorization/permissions" and perm.api_version == "2022-04-01"
    assert perm.headers["Authorization"] == "Bearer fake-access-token"
    (model,) = fake.sent("GET", "registries/azureml/models/Phi-3-mini-4k-instruct/versions/15")
    assert model.host == "cert-eastus.experiments.azureml.net"
    (ws,) = fake.sent("GET", fake.ws_path + "$")
    assert ws.api_version == "2024-10-01-preview"


def test_cost_drivers_are_training_tokens_times_epochs(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    report = preflight(fake, azure_config(fake, "training.epochs=2", "azure.price_per_1k_training_tokens=0.5"), files)

    assert report.cost is not None
    assert (report.cost.train_examples, report.cost.train_tokens, report.cost.epochs) == (20, 1200, 2)
    assert report.cost.as_metrics() == {
        "azure_train_examples": 20.0, "azure_train_tokens": 1200.0, "azure_epochs": 2.0,
        "azure_trained_tokens": 2400.0, "azure_estimated_training_cost": 1.2,
    }
    assert "2400 trained tokens" in report.render()


def test_unsupported_region_fails_naming_it(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    fake.location = "westeurope"

    with pytest.raises(PreflightError) as info:
        preflight(fake, azure_config(fake), files)

    message = str(info.value)
    assert "region westeurope does not support serverless fine-tuning of Phi-3-mini-4k-instruct" in message
    assert "supported: eastus2" in message
    assert "config azure.region" not in message and "azure.region says eastus2" in message
    assert not fake.sent("PUT") and not fake.sent("POST")


def test_documented_regions_are_the_fallback_when_the_model_has_no_region_tag(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    fake.registry_model_tags = {"task": "chat-completion"}
    fake.location = "westus3"

    report = preflight(fake, azure_config(fake), files, raise_on_failure=False)

    region = next(c for c in report.checks if c.name == "region")
    assert region.status == "fail" and "documented regions of Phi-3-mini-4k-instruct" in region.detail


def test_expired_credential_fails_first_and_skips_remote_checks(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    fake.credential = FakeCredential(error="AADSTS700082: The refresh token has expired due to inactivity.")

    with pytest.raises(PreflightError) as info:
        preflight(fake, azure_config(fake), files)

    message = str(info.value)
    assert "credential: cannot get a token for Azure Resource Manager: AADSTS700082: The refresh token has expired" in message
    assert "az login" in message
    for name in ("workspace", "region", "Microsoft.Network", "permissions"):
        assert f"{name}: needs a working credential" in message
    assert fake.requests == []


def test_token_rejected_by_azure_is_reported_with_azure_code(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    expired = Reply(401, {"error": {"code": "ExpiredAuthenticationToken", "message": "The access token expiry UTC time '5/1/2024 9:00:00 AM' is earlier than current UTC time."}})
    fake.inject("GET", r"/workspaces/[^/]+$", expired)

    report = preflight(fake, azure_config(fake), files, raise_on_failure=False)

    ws = next(c for c in report.checks if c.name == "workspace")
    assert ws.status == "fail"
    assert "HTTP 401 ExpiredAuthenticationToken: The access token expiry UTC time" in ws.detail
    assert next(c for c in report.checks if c.name == "region").status == "skipped"


def test_unregistered_network_provider_and_missing_permissions_are_all_listed(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    fake.providers["Microsoft.Network"] = "NotRegistered"
    fake.permissions = [READER]

    with pytest.raises(PreflightError) as info:
        preflight(fake, azure_config(fake), files)

    message = str(info.value)
    assert "Microsoft.Network: resource provider is NotRegistered" in message
    assert "az provider register --namespace Microsoft.Network" in message
    assert "permissions: missing on workspace 'phitune-project': Microsoft.MachineLearningServices/workspaces/data/versions/write" in message
    assert "serverlessEndpoints/listKeys/action" in message
    assert "Azure AI Developer" in message


def test_contract_errors_name_file_and_line(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    contract = ContractResult(valid=False, errors=[ContractIssue("train.jsonl", 4, "example_missing_assistant_message", "nothing to learn")])

    with pytest.raises(PreflightError) as info:
        preflight(fake, azure_config(fake), files, contract)

    assert "data contract: 1 problem(s): train.jsonl line 4: example_missing_assistant_message nothing to learn" in str(info.value)


def test_bad_lines_are_the_data_contracts_to_report(fake: FakeAzure, tmp_path: Path, tiny_phi3: Path) -> None:
    """Pre-flight has no line checker of its own: a bad line fails the contract, named by its file and line."""
    train = write_chat_jsonl(tmp_path / "train.jsonl", 12)
    with train.open("a", encoding="utf-8") as fh:
        fh.write('{"messages": [{"role": "user", "content": "only a question"}]}\n')
        fh.write("not json\n")
    cfg = azure_config(fake, f"model.base_model={tiny_phi3}")
    az = connect(cfg.azure, credential=fake.credential, transport=fake.transport())

    report = run_preflight(az, cfg, train, write_chat_jsonl(tmp_path / "v.jsonl", 2, start=100), raise_on_failure=False)

    checks = {c.name: c for c in report.checks}
    assert checks["training file"].status == "pass"  # Azure's own rules hold
    contract = checks["data contract"]
    assert contract.status == "fail"
    assert f"{train} line 13: example_missing_assistant_message" in contract.detail
    assert f"{train} line 14: invalid_json" in contract.detail
    assert report.cost is not None and report.cost.train_examples == 12


def test_azure_size_limit_is_in_mb_of_a_million_bytes(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    with big.open("wb") as fh:  # sparse: 512 MB + 1 byte on disk costs nothing
        fh.truncate(512 * 10**6 + 1)

    check = check_azure_file(big, "training file")

    assert check.status == "fail" and "512.0 MB is over Azure's 512 MB limit" in check.detail
    with big.open("r+b") as fh:
        fh.truncate(512 * 10**6)
    assert check_azure_file(big, "training file").status == "pass"


def test_wrong_extension_is_refused(fake: FakeAzure, tmp_path: Path) -> None:
    train = write_chat_jsonl(tmp_path / "train.json", 3)

    report = preflight(fake, azure_config(fake), (train, write_chat_jsonl(tmp_path / "v.jsonl", 2)), raise_on_failure=False)

    assert "train.json: Azure wants a .jsonl file" in next(c.detail for c in report.checks if c.name == "training file")


def test_real_data_contract_is_used_when_no_report_is_given(fake: FakeAzure, tiny_phi3: Path) -> None:
    cfg = azure_config(fake, f"model.base_model={tiny_phi3}")  # the contract counts tokens with the model's tokenizer
    az = connect(cfg.azure, credential=fake.credential, transport=fake.transport())
    train, validation = ROOT / "data/support/train.jsonl", ROOT / "data/support/validation.jsonl"

    report = run_preflight(az, cfg, train, validation)

    assert next(c for c in report.checks if c.name == "data contract").status == "pass", report.render()
    assert report.cost is not None
    assert report.cost.train_examples == sum(1 for line in train.read_text(encoding="utf-8").splitlines() if line.strip())
    assert report.cost.train_tokens > 10 * report.cost.train_examples  # training file only, counted by the tokenizer


def test_contract_that_cannot_run_is_a_failed_item(fake: FakeAzure, files: tuple[Path, Path]) -> None:
    cfg = azure_config(fake, "model.base_model=/nonexistent/model")
    az = connect(cfg.azure, credential=fake.credential, transport=fake.transport())

    report = run_preflight(az, cfg, files[0], files[1], raise_on_failure=False)

    contract = next(c for c in report.checks if c.name == "data contract")
    assert contract.status == "fail" and contract.detail.startswith("could not run the data contract: ")
    assert report.cost is None  # nothing counted the tokens


def test_rbac_wildcards_and_region_tag_formats() -> None:
    developer = [{"actions": ["Microsoft.MachineLearningServices/workspaces/*/write"], "notActions": ["Microsoft.MachineLearningServices/workspaces/computes/*/write"]}]
    assert action_allowed("Microsoft.MachineLearningServices/workspaces/jobs/write", developer)
    assert not action_allowed("Microsoft.MachineLearningServices/workspaces/computes/gpu/write", developer)
    assert action_allowed("microsoft.machinelearningservices/workspaces/jobs/read", [{"actions": ["*"], "notActions": []}])
    assert parse_regions("['eastus2', 'westus3']") == parse_regions("eastus2, westus3") == ["eastus2", "westus3"]
