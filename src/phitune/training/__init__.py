"""Fine-tuning backends. `local`: LoRA with transformers + peft on this machine's CPU or GPUs.

Modules: local (the loop, resume, gates, CLI), data (tokenized examples, length-grouped batch order),
checkpoint (atomic resumable checkpoints), device (CUDA/CPU, bf16, threads), bench (`phitune bench train`).

`train` and `TrainResult` are imported lazily, so that `python -m phitune.training.local` (what
`accelerate launch` / `torchrun` run) does not find its own module imported before it starts.
"""

from typing import Any

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from phitune.training import local

        return getattr(local, name)
    raise AttributeError(f"module 'phitune.training' has no attribute {name!r}")
