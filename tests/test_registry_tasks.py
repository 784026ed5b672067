"""The evaluation and registry Prefect tasks in a real (temporary) Prefect server and a real MLflow store:
metrics and tables land in the run, artifacts in Prefect, the promotion concurrency limit is created,
and a second pipeline evaluates the champion beside its candidate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from prefect import flow
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from transformers import AutoModelForCausalLM

from phitune.config import PipelineConfig
from phitune.registry import CHAMPION, configure
from tasks.evaluate import evaluate_models
from tasks.register import PROMOTION_LIMIT, close_run, open_run, register_and_promote, unchanged_champion

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow
def evaluate_and_register(config: PipelineConfig, data: dict[str, Any], adapter_dir: str) -> dict[str, Any]:
    """The pipeline's evaluate -> register slice, as flows/pipeline.py wires it."""
    run_id = open_run(config, data)
    evaluation = evaluate_models(config, data, adapter_dir, run_id)
    registered = register_and_promote(config, run_id, {"adapter_dir": adapter_dir}, evaluation, data["digest"])
    close_run(config, run_id, "FINISHED")
    return {"run_id": run_id, "evaluation": evaluation, "registered": registered, "unchanged": unchanged_champion(config, data["digest"])}


def _chats(path: Path) -> str:
    with path.open("w", encoding="utf-8") as fh:
        for i, label in enumerate(["billing", "connectivity", "billing"]):
            messages = [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"Category: {label}\nReply: ok"}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def _adapter(base: Path, out: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return str(out)


def test_evaluate_register_and_evaluate_the_champion_next_time(tmp_path: Path, tiny_chatml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHITUNE_HOME", str(tmp_path / "home"))
    cfg = PipelineConfig.model_validate({
        "model": {"base_model": str(tiny_chatml)},
        "evaluation": {"max_new_tokens": 4, "batch_size": 2},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts"),
                     "model_name": "tiny-tasks", "promotion_metric": "eval_loss"},
    })
    chats = _chats(tmp_path / "chats.jsonl")
    data = {"train_file": chats, "validation_file": chats, "digest": "c" * 64, "report_file": None}

    first = evaluate_and_register(cfg, data, _adapter(tiny_chatml, tmp_path / "a1", seed=1))
    assert first["evaluation"]["champion_version"] is None and "champion" not in first["evaluation"]
    assert set(first["evaluation"]["candidate"]) == {"eval_loss", "perplexity", "token_accuracy", "label_accuracy", "macro_f1", "rougeL"}
    registered = first["registered"]
    assert registered["name"] == "tiny-tasks" and registered["model_uri"] == f"models:/tiny-tasks/{registered['version']}"
    assert registered["reason"].startswith("promoted" if registered["promoted"] else "not promoted")
    assert first["unchanged"] == (registered["version"] if registered["promoted"] else None)

    client = configure(cfg.registry).client
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["candidate_eval_loss"] == pytest.approx(first["evaluation"]["candidate"]["eval_loss"])
    assert "base_macro_f1" in run.data.metrics
    assert [a.path for a in client.list_artifacts(first["run_id"], "evaluation")] == ["evaluation/examples.json"]

    with get_client(sync_client=True) as prefect:
        assert prefect.read_global_concurrency_limit_by_name(PROMOTION_LIMIT).limit == 1
    table = Artifact.get("evaluation-examples")
    assert table is not None and table.type == "table" and "candidate_generated" in str(table.data)
    gate = Artifact.get("promotion-gate")
    assert gate is not None and registered["reason"] in str(gate.data)

    # Make the first version champion whatever its (random) quality: the next pipeline must evaluate it too.
    client.set_registered_model_alias("tiny-tasks", CHAMPION, registered["version"])
    second = evaluate_and_register(cfg, data, _adapter(tiny_chatml, tmp_path / "a2", seed=2))
    evaluation = second["evaluation"]
    assert evaluation["champion_version"] == registered["version"]
    assert evaluation["champion"]["eval_loss"] == pytest.approx(first["evaluation"]["candidate"]["eval_loss"], rel=1e-5)
    assert evaluation["base"] == pytest.approx(first["evaluation"]["base"])
    assert "champion_eval_loss" in client.get_run(second["run_id"]).data.metrics
    champion_now = client.get_registered_model("tiny-tasks").aliases[CHAMPION]
    assert str(champion_now) == (second["registered"]["version"] if second["registered"]["promoted"] else registered["version"])
