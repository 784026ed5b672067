"""Chat examples -> token ids and labels, with the model's own chat template.

Loss is taken on assistant turns only, each turn's end-of-turn token included (Phi-3 `<|end|>`,
ChatML `<|im_end|>`), so the model learns to stop. The assistant spans are found by rendering the
conversation prefix by prefix with the template itself, which works for any template whose
tokenization is prefix-stable (Phi-3 and ChatML are: turns start with special tokens).

Padding is masked by attention mask in `collate`, never by token id: in SmolLM2 pad == eos ==
`<|im_end|>`, the very token the model must learn to emit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100

Messages = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns

    @property
    def trainable_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model's chat template writes it."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any BOS/special tokens; adding them again would shift every label.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Any, messages: Messages) -> EncodedChat:
    """Token ids of the whole conversation and labels that keep only the assistant turns."""
    full_ids = _ids(tokenizer, render(tokenizer, messages))
    labels = [IGNORE_INDEX] * len(full_ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prefix = _ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True))
        if full_ids[: len(prefix)] != prefix:
            raise ValueError("the chat template does not tokenize prefix-stably; cannot locate assistant turns")
        start = len(prefix)
        # A turn ends where rendering up to it stops agreeing with the whole conversation: that drops the
        # trailer a template adds after the last message (Phi-3 appends eos), except for the final turn.
        end = _common_prefix(full_ids, _ids(tokenizer, render(tokenizer, messages[: i + 1])))
        if i == len(messages) - 1:
            end = len(full_ids)
        labels[start:end] = full_ids[start:end]
    return EncodedChat(full_ids, labels)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Ids of the conversation up to (not including) the final assistant turn, ready for generation."""
    history = list(messages)
    if history and history[-1].get("role") == "assistant":
        history = history[:-1]
    return _ids(tokenizer, render(tokenizer, history, add_generation_prompt=True))


def collate(batch: Sequence[EncodedChat], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention_mask 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
