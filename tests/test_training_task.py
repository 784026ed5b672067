"""The Prefect training task against a real (ephemeral) Prefect server and a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client

from phitune.config import PipelineConfig
from phitune.errors import TrainingError
from phitune.registry import client_for
from tasks.train import train_adapter
from test_training import support_chats, write_jsonl

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _setup(tmp_path: Path, model: Path, **training) -> tuple[PipelineConfig, dict, str]:
    cfg = PipelineConfig.model_validate({
        "model": {"base_model": str(model)},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "num_threads": 1, "target_modules": ["all-linear"], **training},
        "registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")},
    })
    data = {"train_file": str(write_jsonl(tmp_path / "train.jsonl", support_chats(24, 0))),
            "validation_file": str(write_jsonl(tmp_path / "validation.jsonl", support_chats(8, 1)))}
    client = client_for(cfg.registry.tracking_uri)
    run_id = client.create_run(client.create_experiment("training-task")).info.run_id
    return cfg, data, run_id


def test_train_adapter_logs_every_step_to_mlflow_and_reports_progress(tiny_chatml: Path, tmp_path: Path) -> None:
    cfg, data, run_id = _setup(tmp_path, tiny_chatml)

    @flow
    def pipeline() -> dict:
        return train_adapter(cfg, data, run_id, str(tmp_path / "work"))

    out = pipeline()
    assert Path(out["adapter_dir"], "adapter_config.json").is_file()
    assert out["base_model"] == str(tiny_chatml) and out["metrics"]["steps"] == 6

    client = client_for(cfg.registry.tracking_uri)
    for key in ("loss", "learning_rate", "tokens_per_second", "grad_norm"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5, 6]
    run = client.get_run(run_id)
    assert run.data.metrics["train_eval_loss"] == pytest.approx(out["metrics"]["eval_loss"])
    assert run.data.metrics["train_base_eval_loss"] > run.data.metrics["train_eval_loss"]
    assert run.data.tags["phitune.training.device"] == "cpu"
    progress = Artifact.get("training-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0


def test_a_sanity_gate_fails_the_task_without_a_retry(tiny_chatml: Path, tmp_path: Path) -> None:
    cfg, data, run_id = _setup(tmp_path, tiny_chatml, max_steps=2, learning_rate=1e-12)

    @flow
    def pipeline():
        state = train_adapter(cfg, data, run_id, str(tmp_path / "work"), return_state=True)
        with pytest.raises(TrainingError, match="did not improve"):
            state.result()
        return state.state_details.task_run_id

    with get_client(sync_client=True) as prefect:
        task_run = prefect.read_task_run(pipeline())
    assert task_run.state.is_failed() and task_run.run_count == 1
