"""Tiny random chat models with real tokenizers and real chat templates, built offline in a second.

They exercise the same code paths as the real models (Phi-3's template and `Phi3ForCausalLM`; a
Llama with ChatML like SmolLM2, pad == eos) without any download.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Category: billing Reply: We refunded order 1234 to your card within five days.",
    "Category: connectivity Reply: Restart the router and check the app for the light status.",
    "My Wi-Fi keeps dropping every evening, what should I do? Hello there, thanks!",
    "You are a helpful support assistant. Answer with the category and a reply.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'-()",
] * 20


def _tokenizer(special: list[str], bos: str, eos: str, pad: str, template: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template)


def phi3_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(
        ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", template=PHI3_TEMPLATE,
    )


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    # As in SmolLM2: pad == eos == <|im_end|>.
    return _tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", template=CHATML_TEMPLATE,
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
