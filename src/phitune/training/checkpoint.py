"""Resumable checkpoints in the run's work folder: `checkpoints/step-NNNNNN/`.

A checkpoint holds what a killed run needs to continue as if it had not stopped: the adapter
weights, the optimizer, scheduler and grad-scaler states, the RNG states and a JSON state (step,
running totals, the run's identity). The data order needs no state: it is a function of the seed
and epoch (see `data.batch_order`).

Writes are atomic: everything goes to a temporary folder that is renamed into place, so a run
killed mid-write leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"
KEEP = 2
"""Checkpoints kept: the newest, and one before it in case the newest is unreadable (disk full)."""


def _root(work_dir: Path) -> Path:
    return Path(work_dir) / CHECKPOINTS


def _complete(work_dir: Path) -> list[tuple[int, Path]]:
    root = _root(work_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def latest(work_dir: Path) -> Path | None:
    """The newest complete checkpoint of a work folder, or None."""
    found = _complete(work_dir)
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(work_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any, state: dict[str, Any]) -> Path:
    """Write checkpoint `step` atomically and drop all but the newest KEEP; returns its folder."""
    root = _root(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, tmp / "adapter_model.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state()},
            tmp / "trainer_state.pt",
        )
        # Written last: a folder without state.json is not a checkpoint.
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
        final = root / f"step-{step:06d}"
        if final.exists():  # the same step written by an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in _complete(work_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sweep_partial(work_dir: Path) -> None:
    """Remove temporary folders left by a run killed while writing a checkpoint."""
    root = _root(work_dir)
    if root.is_dir():
        for tmp in root.glob(_TMP_PREFIX + "*"):
            shutil.rmtree(tmp, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, Any]:
    """Restore a checkpoint into freshly built training objects; returns its JSON state."""
    path = Path(path)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: adapter weights do not fit the model: {result.unexpected_keys[:3]}")
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return read_state(path)
