"""The one place base models and tokenizers come from.

`model.base_model` is 'default' (the embedded SmolLM2, provisioned on first use), a local folder, or a
hub id. Every stage loads through here, so they all see the same resolution, the same revision and
trust_remote_code, and the same pad-token fallback; a model that cannot be had ends in one
ModelNotFoundError naming the field and what to do, not a hub traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from phitune.config import DEFAULT_MODEL, ModelConfig
from phitune.errors import ModelNotFoundError

ModelRef = ModelConfig | str | Path


def _as_config(ref: ModelRef) -> ModelConfig:
    return ref if isinstance(ref, ModelConfig) else ModelConfig(base_model=str(ref))


def _looks_like_path(ref: str) -> bool:
    # A hub id is `name` or `org/name`; anything else with a path shape can only be a (missing) folder.
    return ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve_base_model(cfg: ModelRef) -> str:
    """The folder or hub id to load: pulls the default model when needed, checks local folders."""
    ref = _as_config(cfg).base_model
    if ref == DEFAULT_MODEL:
        from phitune.default_model import pull_default

        return str(pull_default())
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.base_model: {path} is a folder but has no config.json (not a Hugging Face model folder)")
        return str(path.resolve())
    if _looks_like_path(ref):
        raise ModelNotFoundError(f"model.base_model: folder not found: {path}")
    return ref


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """One quick request instead of huggingface_hub's retry loop (~47 s per file when the hub is unreachable)."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def _load(loader: Any, cfg: ModelConfig, offline_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Call a from_pretrained; a folder or hub id that cannot be loaded ends in a ModelNotFoundError.

    Hub ids: when the hub is unreachable only the local Hugging Face cache is tried, so an offline run fails
    (or succeeds from the cache) in a second instead of retrying for minutes.
    """
    source = resolve_base_model(cfg)
    kwargs.update(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if Path(source).is_dir():
        try:
            return loader.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise ModelNotFoundError(f"model.base_model: cannot load {source}: {exc}") from None
    online = _hub_reachable()
    if not online:
        kwargs.update(offline_kwargs or {})
    try:  # hub errors (offline, not found, gated) are all OSError subclasses
        return loader.from_pretrained(source, local_files_only=not online, **kwargs)
    except OSError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        why = (
            f"not found on the hub ({detail})"
            if online
            else "no such local folder, the hub is unreachable and it is not in the local Hugging Face cache"
        )
        raise ModelNotFoundError(
            f"model.base_model: could not fetch {source!r}: {why}. Download it where the hub is reachable and set "
            "model.base_model to the local folder, or use 'default' (the embedded SmolLM2-135M-Instruct)."
        ) from None


def load_tokenizer(cfg: ModelRef) -> Any:
    """The base model's tokenizer with a pad token (eos when the model has none; callers pick padding_side)."""
    from transformers import AutoTokenizer

    config = _as_config(cfg)
    tokenizer = _load(AutoTokenizer, config)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelNotFoundError(f"model.base_model: the tokenizer of {config.base_model!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelRef, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """The base causal LM on `device` (from_pretrained leaves it in eval mode)."""
    from transformers import AutoModelForCausalLM

    # transformers 5.23 looks for a PEFT adapter_config.json without honouring local_files_only (and retries
    # for ~25 s when offline) unless told through adapter_kwargs.
    model = _load(
        AutoModelForCausalLM, _as_config(cfg), offline_kwargs={"adapter_kwargs": {"local_files_only": True}}, dtype=dtype
    )
    return model.to(device)


def chat_template_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's chat template, for lineage: the same weights under another template are another model."""
    template = tokenizer.chat_template
    text = json.dumps(template, sort_keys=True) if isinstance(template, dict) else (template or "")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a turn, the generation config's first; local serving and evaluation both stop on these.

    A model may end a turn on several ids (Phi-3's generation config lists <|endoftext|> and <|end|>),
    and the generation config, the model config and the tokenizer need not agree, so all three count.
    """
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return list(dict.fromkeys(ids))  # each once, in that order
