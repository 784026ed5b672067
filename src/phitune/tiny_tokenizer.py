"""Small BPE tokenizers with real chat templates, trained offline in a second.

`phitune bench validate` counts tokens with a ChatML one where the embedded default model is not
provisioned, and the tests build their tiny random models on these, so no download is ever needed.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


def train_tokenizer(special: list[str], bos: str, eos: str, pad: str, template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 400 tokens trained on a few support sentences, with these special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _CORPUS,
        trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template)


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """ChatML with pad == eos == <|im_end|>, as in SmolLM2."""
    return train_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", template=CHATML_TEMPLATE,
    )
