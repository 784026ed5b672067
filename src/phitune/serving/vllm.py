"""The GPU-host target: vLLM's OpenAI-compatible server with the fine-tuned LoRA adapter on its base model.

vLLM serves the base model once and applies the adapter per request, selected by the request's
`model` field (the LoRA module name, which phitune sets to the endpoint name). It speaks the same
protocol as `phitune serve` (/v1/chat/completions, /v1/models, /health), so deploy, the smoke test and
monitoring treat it like any other endpoint. On a GPU host (a worker of the GPU work pool) with
`pip install vllm`, `deployment.target=vllm` makes the deploy step run, blue/green:

    vllm serve /path/to/base --enable-lora --lora-modules phitune-support=/path/to/adapter \\
        --max-lora-rank 16 --max-loras 1 --host 127.0.0.1 --port 8001 --max-num-seqs 8 --generation-config auto

where the base is the folder the version was trained from (its `phitune.base_model_path` tag) and the
adapter is fetched from the registry. The API key, when configured, is passed as VLLM_API_KEY in the
environment (never on the command line, where `ps` shows it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phitune.errors import EndpointError

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""


def lora_rank(adapter_dir: str | Path) -> int:
    """The adapter's rank `r` from its adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"{path}: cannot read the LoRA rank ({exc})") from None


def max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits an adapter of this rank."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EndpointError(f"LoRA rank {rank} is above what vLLM serves ({LORA_RANKS[-1]})")


def vllm_command(
    base_model: str | Path, adapter_dir: str | Path, lora_name: str, *, host: str = "127.0.0.1", port: int = 8000,
    max_new_tokens: int | None = None, max_batch_size: int | None = None, executable: str = "vllm",
    extra_args: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` command line that serves `adapter_dir` as model `lora_name` on `base_model`."""
    if "=" in lora_name or not lora_name:
        raise EndpointError(f"LoRA module name {lora_name!r} must be non-empty and contain no '='")
    cmd = [
        executable, "serve", str(base_model),
        "--enable-lora", "--lora-modules", f"{lora_name}={Path(adapter_dir).resolve()}",
        "--max-lora-rank", str(max_lora_rank(lora_rank(adapter_dir))), "--max-loras", "1",
        "--host", host, "--port", str(port),
        "--generation-config", "auto",  # the model's own eos/stop tokens (Phi-3 ends turns with <|end|>)
    ]
    if max_batch_size:
        cmd += ["--max-num-seqs", str(max_batch_size)]
    if max_new_tokens:
        # vLLM has no per-server cap on max_tokens; capping the default keeps unbounded requests short.
        cmd += ["--override-generation-config", json.dumps({"max_new_tokens": max_new_tokens})]
    return cmd + list(extra_args or [])


def vllm_available() -> str | None:
    """The path of the `vllm` executable, or None where vLLM is not installed."""
    return shutil.which("vllm")
