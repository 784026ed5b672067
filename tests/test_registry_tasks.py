"""The real `finetune` flow on a tiny model, in a real (temporary) Prefect server and a real MLflow store:
the stages' metrics and tables land in the run, artifacts in Prefect, the promotion concurrency limit is
created, the gate's decision is recorded, and a second pipeline evaluates the champion beside its candidate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client

from flows.pipeline import finetune
from phitune.config import PipelineConfig
from phitune.registry import CHAMPION, configure
from tasks.register import PROMOTION_LIMIT
from test_training import support_chats, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _config(tmp_path: Path, model: Path, **registry: Any) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "data": {"train_file": str(write_jsonl(tmp_path / "train.jsonl", support_chats(24, 0))),
                 "validation_file": str(write_jsonl(tmp_path / "validation.jsonl", support_chats(6, 1))),
                 "docs_dir": str(tmp_path / "docs")},
        "model": {"base_model": str(model)},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "num_threads": 1, "target_modules": ["all-linear"],
                     "output_dir": str(tmp_path / "runs")},
        "evaluation": {"max_new_tokens": 4, "batch_size": 3},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts"),
                     "model_name": "tiny-tasks", "promotion_metric": "eval_loss", **registry},
        "deployment": {"target": "none"},
    })


def test_the_pipeline_registers_gates_and_evaluates_the_champion_next_time(
    tmp_path: Path, tiny_chatml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PHITUNE_HOME", str(tmp_path / "home"))
    cfg = _config(tmp_path, tiny_chatml)

    first = finetune(cfg)

    evaluation, registered = first["evaluation"], first["registered"]
    assert evaluation["champion_version"] is None and "champion" not in evaluation
    assert set(evaluation["candidate"]) == {"eval_loss", "perplexity", "token_accuracy", "label_accuracy", "macro_f1", "rougeL"}
    assert registered["name"] == "tiny-tasks" and registered["model_uri"] == f"models:/tiny-tasks/{registered['version']}"
    # Six steps at a high learning rate lower the held-out loss of a random model: the gate must promote it.
    assert evaluation["candidate"]["eval_loss"] < evaluation["base"]["eval_loss"] - cfg.registry.promotion_margin
    assert registered["promoted"] and registered["aliases"] == ["challenger", "champion"]
    assert registered["reason"].startswith("promoted: eval_loss") and "there was no champion" in registered["reason"]

    client = configure(cfg.registry).client
    mv = client.get_model_version("tiny-tasks", registered["version"])
    assert mv.tags["phitune.promotion"] == registered["reason"]
    assert float(mv.tags["phitune.metric.eval_loss"]) == pytest.approx(evaluation["candidate"]["eval_loss"])
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["phitune.promoted"] == "true"
    assert run.data.metrics["candidate_eval_loss"] == pytest.approx(evaluation["candidate"]["eval_loss"])
    assert "base_macro_f1" in run.data.metrics
    assert [a.path for a in client.list_artifacts(first["mlflow_run_id"], "evaluation")] == ["evaluation/examples.json"]

    with get_client(sync_client=True) as prefect:
        assert prefect.read_global_concurrency_limit_by_name(PROMOTION_LIMIT).limit == 1
    table = Artifact.get("evaluation-examples")
    assert table is not None and table.type == "table" and "candidate_generated" in str(table.data)
    gate = Artifact.get("promotion-gate")
    assert gate is not None and registered["reason"] in str(gate.data)

    # Same data and config: nothing to train. Another seed: a second candidate, judged beside the champion.
    assert finetune(cfg)["skipped"]
    second = finetune(cfg.model_copy(update={"training": cfg.training.model_copy(update={"seed": 7})}))
    evaluation = second["evaluation"]
    assert evaluation["champion_version"] == registered["version"]
    assert evaluation["champion"]["eval_loss"] == pytest.approx(first["evaluation"]["candidate"]["eval_loss"], rel=1e-5)
    assert evaluation["base"] == pytest.approx(first["evaluation"]["base"])
    assert "champion_eval_loss" in client.get_run(second["mlflow_run_id"]).data.metrics
    gain = first["evaluation"]["candidate"]["eval_loss"] - evaluation["candidate"]["eval_loss"]
    promoted = gain >= cfg.registry.promotion_margin
    assert second["registered"]["promoted"] == promoted
    assert str(client.get_registered_model("tiny-tasks").aliases[CHAMPION]) == (second["registered"]["version"] if promoted else registered["version"])
