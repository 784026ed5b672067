"""Training examples and the order they are seen in: tokenized once, batched by similar length.

Padding is wasted compute: a batch costs as much as its longest example times its size. Batches
are therefore built from examples of similar length (as transformers' `group_by_length`): the
epoch is shuffled, cut into windows of WINDOW_BATCHES batches, each window sorted by length and
cut into batches, and the batches shuffled again. The order is a pure function of (seed, epoch),
so a resumed run sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from phitune.chat import EncodedChat, encode_chat
from phitune.errors import DataError

WINDOW_BATCHES = 16
"""Batches per sorting window: large enough that padding is a few percent, small enough to stay random."""


def load_chats(path: Path, tokenizer: Any, max_seq_length: int) -> list[EncodedChat]:
    """Every conversation of a chat JSONL file as token ids and assistant-only labels.

    The data contract has normally checked the file already; what training cannot work with
    still ends in a DataError naming the file and line rather than a traceback.
    """
    examples = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                encoded = encode_chat(tokenizer, messages)
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{number}: not a chat example ({type(exc).__name__}: {exc}); run `phitune validate {path}`") from None
            if len(encoded.input_ids) > max_seq_length:
                raise DataError(
                    f"{path}:{number}: {len(encoded.input_ids)} tokens, more than training.max_seq_length={max_seq_length}"
                )
            examples.append(encoded)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True, min_batch: int = 1) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch.

    A final batch smaller than `min_batch` (the number of data-parallel processes, so that every
    process gets at least one example) is dropped.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * WINDOW_BATCHES
        order = [i for start in range(0, len(order), window) for i in sorted(order[start : start + window], key=lengths.__getitem__)]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return [b for b in batches if len(b) >= min_batch]


def padded_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the batch tensors' positions that are padding (what length grouping minimises)."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / total if total else 0.0
