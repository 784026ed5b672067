"""The local LoRA trainer on tiny random models: it learns, resumes after a kill, and its gates stop bad runs.

Every run here is real training (tiny models, one CPU thread: they gain nothing from more).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from phitune.config import PipelineConfig
from phitune.errors import ConfigError, ModelNotFoundError, TrainingError
from phitune.training import train
from phitune.training.data import batch_order, padded_fraction

ROOT = Path(__file__).resolve().parents[1]
REPLIES = {
    "billing": "We refunded order 1234 to your card within five days.",
    "connectivity": "Restart the router and check the app for the light status.",
}
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def support_chats(n: int, seed: int) -> list[dict]:
    """Short, repetitive support-desk chats (like data/support): a category and a canned reply per problem."""
    import random

    rng = random.Random(seed)
    chats = []
    for i in range(n):
        category = rng.choice(sorted(REPLIES))
        problem = "my bill is wrong" if category == "billing" else "my Wi-Fi keeps dropping"
        chats.append({"messages": [
            {"role": "system", "content": "You are a helpful support assistant."},
            {"role": "user", "content": f"Hello there, {problem} (ticket {seed * 1000 + i})"},
            {"role": "assistant", "content": f"Category: {category} Reply: {REPLIES[category]}"},
        ]})
    return chats


def write_jsonl(path: Path, chats: list[dict]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_jsonl(tmp_path / "train.jsonl", support_chats(32, 0)), write_jsonl(tmp_path / "validation.jsonl", support_chats(8, 1))


def config(model: Path, **training) -> PipelineConfig:
    settings = {"max_steps": 16, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "num_threads": 1,
                "target_modules": ["all-linear"], "checkpoint_every_steps": 4, **training}
    return PipelineConfig.model_validate({"model": {"base_model": str(model)}, "training": settings})


@pytest.mark.parametrize("model, targets", [("tiny_chatml", ["all-linear"]), ("tiny_phi3", PHI3_TARGETS)])
def test_a_tiny_model_learns_the_replies(model: str, targets: list[str], files, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    steps: list[dict] = []
    result = train(config(request.getfixturevalue(model), target_modules=targets), *files, tmp_path / "run", on_step=steps.append)

    m = result.metrics
    assert m["eval_loss"] < m["base_eval_loss"] - 0.3, m
    first, last = sum(s["loss"] for s in steps[:4]) / 4, sum(s["loss"] for s in steps[-4:]) / 4
    assert last < first - 0.3
    assert [s["step"] for s in steps] == list(range(1, 17)) and all(s["total_steps"] == 16 for s in steps)
    assert {"step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second", "tokens"} <= steps[0].keys()
    assert steps[-1]["tokens"] == m["train_tokens"] > m["labelled_tokens"] > 0
    assert m["steps"] == 16 and m["resumed_from_step"] == 0 and m["device"] == "cpu"
    assert m["padding_fraction"] < 0.05  # length-grouped batches
    assert (result.adapter_dir / "adapter_config.json").is_file() and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000012", "step-000016"]  # the newest two
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == result.base_model


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


CHILD = """
import sys, time
from pathlib import Path
from phitune.config import PipelineConfig
from phitune.training import train
cfg = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())
train(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), on_step=lambda record: time.sleep(0.3))
"""


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(tiny_chatml: Path, files, tmp_path: Path) -> None:
    cfg = config(tiny_chatml, max_steps=12, checkpoint_every_steps=3)
    reference = train(cfg, *files, tmp_path / "reference")

    work = tmp_path / "killed"
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "cfg.json"), *map(str, files), str(work)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (work / "checkpoints" / "step-000003" / "state.json").exists():
            assert child.poll() is None, "the training process ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = [int(p.name.split("-")[1]) for p in (work / "checkpoints").glob("step-*")]
    assert 0 < max(killed_at) < 12

    (work / "checkpoints" / ".tmp-killed-mid-write").mkdir()  # what a kill during a checkpoint write leaves
    steps: list[int] = []
    resumed = train(cfg, *files, work, on_step=lambda r: steps.append(r["step"]))
    assert not (work / "checkpoints" / ".tmp-killed-mid-write").exists()

    assert resumed.metrics["resumed_from_step"] == max(killed_at)
    assert steps == list(range(max(killed_at) + 1, 13))
    assert resumed.metrics["steps"] == reference.metrics["steps"] == 12
    assert resumed.metrics["base_eval_loss"] == reference.metrics["base_eval_loss"]
    assert resumed.metrics["train_tokens"] == reference.metrics["train_tokens"]
    ours, theirs = _adapter(resumed.adapter_dir), _adapter(reference.adapter_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    assert resumed.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], abs=1e-4)


def test_resuming_with_another_config_is_refused(tiny_chatml: Path, files, tmp_path: Path) -> None:
    train(config(tiny_chatml, max_steps=4), *files, tmp_path / "run")
    with pytest.raises(TrainingError, match=r"different run .*training\.learning_rate"):
        train(config(tiny_chatml, max_steps=4, learning_rate=2e-2), *files, tmp_path / "run")


def test_continued_fine_tuning_starts_from_the_given_adapter(tiny_chatml: Path, files, tmp_path: Path) -> None:
    fresh: list[dict] = []
    first = train(config(tiny_chatml, lora_r=4), *files, tmp_path / "first", on_step=fresh.append)
    continued: list[dict] = []
    second = train(config(tiny_chatml, init_adapter=str(first.adapter_dir), learning_rate=2e-3), *files, tmp_path / "second", on_step=continued.append)

    # The base is the same model; the run starts where the first one ended, not from a fresh LoRA.
    assert second.metrics["base_eval_loss"] == first.metrics["base_eval_loss"]
    assert continued[0]["loss"] < fresh[0]["loss"] - 0.3
    assert continued[0]["loss"] == pytest.approx(fresh[-1]["loss"], abs=0.3)
    assert second.metrics["eval_loss"] < second.metrics["base_eval_loss"] - 0.3
    assert json.loads((second.adapter_dir / "adapter_config.json").read_text())["r"] == 4  # the adapter's own shape


def test_an_init_adapter_that_is_neither_uri_nor_folder_is_named(tiny_chatml: Path, files, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="training.init_adapter"):
        train(config(tiny_chatml, init_adapter=str(tmp_path / "nowhere")), *files, tmp_path / "run")


def test_a_run_whose_loss_overflows_stops_with_the_step(tiny_chatml: Path, files, tmp_path: Path) -> None:
    # An adapter that diverged in an earlier run (weights ~1e30): its activations overflow to inf/nan.
    first = train(config(tiny_chatml, max_steps=2), *files, tmp_path / "first")
    weights = _adapter(first.adapter_dir)
    save_file({k: torch.full_like(v, 1e30) if "lora_B" in k else v for k, v in weights.items()}, first.adapter_dir / "adapter_model.safetensors")

    with pytest.raises(TrainingError, match=r"step 1/16: the training loss is (nan|inf) \(not finite\).*learning_rate"):
        train(config(tiny_chatml, init_adapter=str(first.adapter_dir)), *files, tmp_path / "diverged")


def test_data_without_assistant_turns_has_zero_trainable_tokens(tiny_chatml: Path, files, tmp_path: Path) -> None:
    # E.g. an export of unanswered tickets passed as training data (train() is also called without the contract).
    unanswered = [{"messages": c["messages"][:2]} for c in support_chats(8, 0)]
    path = write_jsonl(tmp_path / "unanswered.jsonl", unanswered)
    with pytest.raises(TrainingError, match=r"unanswered\.jsonl: zero trainable tokens"):
        train(config(tiny_chatml), path, files[1], tmp_path / "run")


def test_a_run_that_does_not_beat_the_base_model_fails_but_keeps_the_adapter(tiny_chatml: Path, files, tmp_path: Path) -> None:
    # A learning rate too small to move the model: the validation loss stays at the base model's.
    with pytest.raises(TrainingError, match="validation loss did not improve on the base model") as err:
        train(config(tiny_chatml, max_steps=4, learning_rate=1e-12), *files, tmp_path / "run")
    assert str(tmp_path / "run" / "adapter") in str(err.value)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_target_modules_that_the_model_lacks_are_a_config_error(tiny_phi3: Path, files, tmp_path: Path) -> None:
    # Llama names on Phi-3 (which fuses qkv_proj and gate_up_proj) would silently train only o_proj/down_proj.
    with pytest.raises(ConfigError, match=r"training\.target_modules: \['q_proj'.*qkv_proj"):
        train(config(tiny_phi3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), *files, tmp_path / "run")


def test_batch_order_is_seeded_complete_and_groups_lengths() -> None:
    import random

    lengths = [random.Random(i).randint(20, 200) for i in range(100)]
    epoch0 = batch_order(lengths, 8, seed=1, epoch=0)
    assert epoch0 == batch_order(lengths, 8, seed=1, epoch=0)  # a resumed run sees the same batches
    assert epoch0 != batch_order(lengths, 8, seed=1, epoch=1)
    assert sorted(i for b in epoch0 for i in b) == list(range(100))
    assert len(epoch0) == 13 and sorted(len(b) for b in epoch0)[0] == 4
    plain = batch_order(lengths, 8, seed=1, epoch=0, group_by_length=False)
    assert padded_fraction(lengths, epoch0) < 0.1 < padded_fraction(lengths, plain)
    assert len(batch_order(lengths, 8, seed=1, epoch=0, min_batch=5)) == 12  # the 4-example remainder is dropped


def test_cli_train_validates_splits_and_prints_the_adapter(tiny_chatml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from phitune.cli import main

    data = write_jsonl(tmp_path / "all.jsonl", support_chats(24, 0))
    code = main([
        "train", f"model.base_model={tiny_chatml}", f"data.train_file={data}", "data.validation_file=",
        "training.max_steps=4", "training.batch_size=4", "training.num_threads=1", "training.target_modules=[all-linear]",
        "training.learning_rate=0.01", f"training.output_dir={tmp_path / 'runs'}", "--run-id", "r1",
    ])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(tmp_path / "runs" / "r1" / "adapter")
    assert (tmp_path / "runs" / "r1" / "data" / "validation.jsonl").is_file()


def test_cli_train_stops_on_invalid_data_before_training(tiny_chatml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from phitune.cli import main

    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    code = main(["train", f"model.base_model={tiny_chatml}", f"data.train_file={data}", "data.validation_file=",
                 f"training.output_dir={tmp_path / 'runs'}", "--run-id", "r1"])
    assert code == 1
    assert "INVALID" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r1" / "checkpoints").exists()


@pytest.mark.slow
def test_num_processes_runs_data_parallel_under_torchrun(tiny_chatml: Path, files, tmp_path: Path) -> None:
    # Two CPU processes (gloo): the same code path as several GPUs, launched from the config alone.
    steps: list[int] = []
    result = train(config(tiny_chatml, max_steps=6, num_processes=2), *files, tmp_path / "run", on_step=lambda r: steps.append(r["step"]))
    assert steps == [1, 2, 3, 4, 5, 6]
    assert result.metrics["num_processes"] == 2 and result.metrics["steps"] == 6
    assert result.metrics["eval_loss"] < result.metrics["base_eval_loss"]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
