"""The automatic validation split: a seeded, deterministic hold-out of a training file's lines.

Lines are copied as bytes (never re-serialised), blank lines are dropped, and each part keeps the
original order, so the same file, fraction and seed always give byte-identical parts. Two streaming
passes (count, then copy): memory holds only the chosen line indices.
"""

from __future__ import annotations

import random
from pathlib import Path

from phitune.errors import DataError


def _example_lines(path: Path):
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield raw if raw.endswith(b"\n") else raw + b"\n"


def split_train_validation(train: Path, out_dir: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Write `out_dir/train.jsonl` and `out_dir/validation.jsonl`; about `fraction` of the examples (at least one) are held out."""
    if not 0 < fraction < 1:
        raise DataError(f"data.validation_split must be between 0 and 1 (got {fraction})")
    total = sum(1 for _ in _example_lines(Path(train)))
    if total < 2:
        raise DataError(f"{train}: {total} example(s); an automatic validation split needs at least 2")
    n_val = min(total - 1, max(1, round(total * fraction)))
    held_out = set(random.Random(seed).sample(range(total), n_val))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_out, val_out = out_dir / "train.jsonl", out_dir / "validation.jsonl"
    with train_out.open("wb") as t, val_out.open("wb") as v:
        for i, line in enumerate(_example_lines(Path(train))):
            (v if i in held_out else t).write(line)
    return train_out, val_out
