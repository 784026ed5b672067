"""MLflow lineage and model versions on a real sqlite store: runs, reload equality, adapters, retirement."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.cli import main as cli_main
from phitune.config import PipelineConfig, RegistryConfig
from phitune.errors import ModelNotFoundError, PhituneError
from phitune.modeling import chat_template_hash
from phitune.registry import (
    CHAMPION,
    close_run,
    config_digest,
    configure,
    endpoint_tag,
    fetch_adapter,
    live_endpoints,
    log_model_version,
    open_run,
    retire,
)
from phitune.registry import tags as T
from phitune.registry.runs import git_commit
from phitune.registry.store import resolve_artifact_location



def write_chats(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"Category: billing\nReply: answer {i}"},
            ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


@dataclass
class Registered:
    cfg: PipelineConfig
    data: dict
    run_id: str
    version: str
    adapter: Path
    root: Path


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_chatml: Path) -> Iterator[Registered]:
    """A store in tmp with one pipeline run and one registered version (log_model takes a few seconds: shared)."""
    root = tmp_path_factory.mktemp("registry")
    patch = pytest.MonkeyPatch()
    patch.setenv("PHITUNE_HOME", str(root / "home"))
    cfg = PipelineConfig.model_validate({
        "model": {"base_model": str(tiny_chatml)},
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts"), "model_name": "tiny"},
    })
    report = root / "report.json"
    report.write_text('{"valid": true}', encoding="utf-8")
    data = {
        "train_file": str(write_chats(root / "train.jsonl", 6)),
        "validation_file": str(write_chats(root / "validation.jsonl", 3)),
        "digest": "d" * 64,
        "report_file": str(report),
    }
    run_id = open_run(cfg, data)
    adapter = make_adapter(tiny_chatml, root / "adapter", seed=3)
    mv = log_model_version(cfg, run_id, adapter, data["digest"])
    yield Registered(cfg, data, run_id, str(mv.version), adapter, root)
    patch.undo()


def test_configure_makes_relative_paths_absolute(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(registered.root)  # the module's store, named relative to the working directory
    reg = RegistryConfig(tracking_uri="sqlite:///mlflow.db", artifact_location="arts", experiment="x")
    store = configure(reg)
    assert store.tracking_uri == f"sqlite:///{registered.root}/mlflow.db"
    assert mlflow.get_tracking_uri() == store.tracking_uri
    assert store.client.get_experiment(store.experiment_id).artifact_location == (registered.root / "arts").as_uri()
    assert (registered.root / "arts").is_dir()
    assert configure(reg).experiment_id == store.experiment_id  # idempotent


@pytest.mark.parametrize(
    ("location", "tracking_uri", "expected"),
    [
        ("s3://bucket/phitune", "sqlite:///x.db", "s3://bucket/phitune"),
        ("mlflow-artifacts:/phitune", "http://127.0.0.1:5000", "mlflow-artifacts:/phitune"),
        ("local/folder", "http://127.0.0.1:5000", None),  # the server's own root: a client folder is invisible to it
    ],
)
def test_artifact_locations_by_store(location: str, tracking_uri: str, expected: str | None) -> None:
    assert resolve_artifact_location(location, tracking_uri) == expected


def test_open_run_records_config_data_and_lineage(registered: Registered, tiny_chatml: Path) -> None:
    client = configure(registered.cfg.registry).client
    run = client.get_run(registered.run_id)
    params = run.data.params
    assert params["training.lora_r"] == "16"
    assert json.loads(params["training.target_modules"])[0] == "q_proj"
    assert params["registry.model_name"] == "tiny" and params["data.validation_file"]
    tags = run.data.tags
    assert tags[T.DATA_DIGEST_TAG] == registered.data["digest"]
    assert tags[T.CONFIG_DIGEST_TAG] == config_digest(registered.cfg, registered.data["digest"])
    assert tags[T.CHAT_TEMPLATE_TAG] == chat_template_hash(AutoTokenizer.from_pretrained(tiny_chatml))
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"}
    train_bytes = Path(registered.data["train_file"]).read_bytes()
    assert inputs["train"].dataset.digest == hashlib.sha256(train_bytes).hexdigest()[:32]
    assert json.loads(inputs["train"].dataset.profile)["num_rows"] == 6
    assert {t.value for t in inputs["validation"].tags} == {"evaluation"}
    assert [a.path for a in client.list_artifacts(registered.run_id, "validation")] == ["validation/report.json"]


def test_close_run_sets_status_and_note(registered: Registered) -> None:
    cfg = registered.cfg
    client = configure(cfg.registry).client
    run_id = client.create_run(client.get_run(registered.run_id).info.experiment_id).info.run_id
    close_run(cfg, run_id, "FAILED", note="skipped: unchanged")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[T.NOTE_TAG] == "skipped: unchanged"


def test_git_commit_inside_and_outside_a_repository(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(tmp_path) == head


def test_config_digest_follows_what_changes_training(registered: Registered) -> None:
    cfg, digest = registered.cfg, registered.data["digest"]
    same = cfg.model_copy(deep=True)
    same.training.output_dir = "elsewhere"
    same.training.checkpoint_every_steps = 3
    same.evaluation.max_new_tokens = 7
    assert config_digest(same, digest) == config_digest(cfg, digest)
    other = cfg.model_copy(deep=True)
    other.training.learning_rate = 5e-4
    assert config_digest(other, digest) != config_digest(cfg, digest)
    assert config_digest(cfg, "e" * 64) != config_digest(cfg, digest)


def test_registered_version_reloads_with_the_in_memory_models_outputs(registered: Registered, tiny_chatml: Path) -> None:
    client = configure(registered.cfg.registry).client
    mv = client.get_model_version("tiny", registered.version)
    assert mv.tags[T.RUN_ID_TAG] == registered.run_id and mv.run_id == registered.run_id
    assert mv.tags[T.DATA_DIGEST_TAG] == registered.data["digest"]
    assert mv.tags[T.CONFIG_DIGEST_TAG] == config_digest(registered.cfg, registered.data["digest"])
    assert mv.tags[T.BASE_MODEL_TAG] == str(tiny_chatml)

    in_memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chatml), str(registered.adapter)).eval()
    reloaded = mlflow.transformers.load_model(f"models:/tiny/{registered.version}", return_type="components")["model"].eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        expected, got = in_memory(input_ids=ids).logits, reloaded(input_ids=ids).logits
        assert torch.equal(got, expected)
        greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=2)
        assert torch.equal(reloaded.generate(input_ids=ids, **greedy), in_memory.generate(input_ids=ids, **greedy))
    # The adapter did change the model: equality above is not base == base.
    with torch.no_grad(), in_memory.disable_adapter():
        assert not torch.allclose(in_memory(input_ids=ids).logits, expected)

    chat = mlflow.pyfunc.load_model(f"models:/tiny/{registered.version}").predict(
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    )
    assert chat[0]["object"] == "chat.completion" and chat[0]["choices"][0]["message"]["role"] == "assistant"


def test_fetch_adapter_by_alias_and_version(registered: Registered) -> None:
    store = configure(registered.cfg.registry)
    store.client.set_registered_model_alias("tiny", "challenger", registered.version)
    by_alias = fetch_adapter("models:/tiny@challenger", store.tracking_uri)
    assert (by_alias / "adapter_config.json").is_file()
    original = (registered.adapter / "adapter_model.safetensors").read_bytes()
    assert (by_alias / "adapter_model.safetensors").read_bytes() == original
    assert fetch_adapter(f"models:/tiny/{registered.version}", store.tracking_uri) == by_alias  # cached
    with pytest.raises(ModelNotFoundError, match="has no alias 'nope'"):
        fetch_adapter("models:/tiny@nope", store.tracking_uri)
    with pytest.raises(ModelNotFoundError, match="has no version 99"):
        fetch_adapter("models:/tiny/99", store.tracking_uri)
    with pytest.raises(ModelNotFoundError, match="not a registered-model URI"):
        fetch_adapter("runs:/abc/model", store.tracking_uri)


def test_serving_pins_an_alias_to_its_version_with_the_registry_parser(registered: Registered) -> None:
    from phitune.serving.generator import load_model

    store = configure(registered.cfg.registry)
    store.client.set_registered_model_alias("tiny", "challenger", registered.version)
    loaded = load_model("models:/tiny@challenger", store.tracking_uri)
    assert (loaded.name, loaded.version) == ("tiny", registered.version)
    with pytest.raises(ModelNotFoundError, match="has no alias 'nope'"):
        load_model("models:/tiny@nope", store.tracking_uri)


def test_retire_is_refused_while_served_and_deletes_version_and_artifacts_after(
    registered: Registered, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = registered.cfg
    client = configure(cfg.registry).client
    version = str(log_model_version(cfg, registered.run_id, registered.adapter, registered.data["digest"]).version)
    artifacts = Path(client.get_model_version_download_uri("tiny", version).removeprefix("file://"))
    assert (artifacts / "peft" / "adapter_config.json").is_file()
    client.set_model_version_tag("tiny", version, endpoint_tag("blue"), "http://127.0.0.1:8011")
    client.set_model_version_tag("tiny", version, endpoint_tag("blue", "pid"), "4242")
    assert live_endpoints("tiny", version, client) == ["blue"]

    store_args = [f"registry.tracking_uri={cfg.registry.tracking_uri}", f"registry.artifact_location={cfg.registry.artifact_location}"]
    assert cli_main(["retire", "tiny", version, *store_args]) == 1
    assert "still served by blue (http://127.0.0.1:8011)" in capsys.readouterr().err

    client.delete_model_version_tag("tiny", version, endpoint_tag("blue"))
    client.set_registered_model_alias("tiny", CHAMPION, version)
    with pytest.raises(PhituneError, match="is the champion"):
        retire("tiny", version, client)
    client.delete_registered_model_alias("tiny", CHAMPION)

    assert cli_main(["retire", "tiny", version, *store_args]) == 0
    assert f"retired tiny version {version}" in capsys.readouterr().out
    with pytest.raises(MlflowException):
        client.get_model_version("tiny", version)
    assert not artifacts.exists()
    # The other version is untouched.
    assert client.get_model_version("tiny", registered.version).status == "READY"
    with pytest.raises(ModelNotFoundError):
        retire("tiny", version, client)
