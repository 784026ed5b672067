"""Tiny random chat models with real tokenizers and real chat templates, built offline in a second.

They exercise the same code paths as the real models (Phi-3's template and `Phi3ForCausalLM`; a
Llama with ChatML like SmolLM2, pad == eos) without any download.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from phitune.tiny_tokenizer import chatml_tokenizer, train_tokenizer

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def phi3_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(
        ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", template=PHI3_TEMPLATE,
    )


def save_tiny_phi3(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random Phi3ForCausalLM with Phi-3's chat template, saved as an HF folder."""
    import torch

    torch.manual_seed(seed)
    tok = phi3_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = Phi3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<s>"), eos_token_id=[ids("<|endoftext|>"), ids("<|end|>")],
    )
    return _save(Phi3ForCausalLM(config), tok, folder)


def save_tiny_chatml(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random LlamaForCausalLM with ChatML and pad == eos (like SmolLM2)."""
    import torch

    torch.manual_seed(seed)
    tok = chatml_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=eos,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=eos, tie_word_embeddings=True,
    )
    return _save(LlamaForCausalLM(config), tok, folder)


def _save(model, tok, folder: Path) -> Path:
    folder = Path(folder)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
