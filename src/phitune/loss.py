"""Next-token loss on assistant tokens only, shared by training and evaluation.

Logits are computed only where there is a label: the LM head (hidden x vocab, 49k wide for SmolLM2)
is the largest matmul of a small model, and most positions of a chat (system and user turns,
padding) have nothing to learn. Selecting the labelled hidden states before the head saves most of
that work and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from phitune.chat import IGNORE_INDEX


@dataclass
class LossResult:
    loss: torch.Tensor  # mean over labelled tokens (differentiable)
    tokens: int  # labelled tokens in the batch
    correct: int  # of those, how many the argmax predicted


def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and LM head, through any PEFT wrapper (Llama, Phi-3, Mistral, Qwen... share this shape)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


def assistant_loss(model: Any, batch: dict[str, torch.Tensor]) -> LossResult:
    """Cross-entropy of the labelled (assistant) tokens; padding is excluded by attention mask and labels."""
    backbone, head = _backbone_and_head(model)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # Position t predicts token t+1.
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    tokens = int(keep.sum())
    if tokens == 0:
        zero = hidden.sum() * 0.0
        return LossResult(zero, 0, 0)
    logits = head(hidden[:, :-1][keep]).float()
    wanted = targets[keep]
    loss = F.cross_entropy(logits, wanted)
    correct = int((logits.argmax(-1) == wanted).sum())
    return LossResult(loss, tokens, correct)
