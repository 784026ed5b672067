"""Assistant-only labels round-trip on both chat templates (Phi-3 and ChatML, pad == eos)."""

import pytest
from transformers import AutoTokenizer

from phitune.chat import IGNORE_INDEX, collate, encode_chat, prompt_ids

CONVERSATION = [
    {"role": "system", "content": "You are the support desk."},
    {"role": "user", "content": "My router blinks red."},
    {"role": "assistant", "content": "Category: hardware\nReply: Hold reset for ten seconds."},
    {"role": "user", "content": "Still red."},
    {"role": "assistant", "content": "Category: hardware\nReply: We will send a replacement."},
]
END_OF_TURN = {"tiny_phi3": "<|end|>", "tiny_chatml": "<|im_end|>"}


@pytest.mark.parametrize("model", ["tiny_phi3", "tiny_chatml"])
def test_labels_cover_exactly_the_assistant_turns_with_their_end_token(model: str, request: pytest.FixtureRequest) -> None:
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    enc = encode_chat(tok, CONVERSATION)
    assert len(enc.input_ids) == len(enc.labels)
    # Contiguous labelled spans, decoded, are the assistant replies followed by the end-of-turn token.
    spans, current = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert lab == tid
            current.append(lab)
    if current:
        spans.append(current)
    texts = [tok.decode(s) for s in spans]
    assert len(texts) == 2
    eot = END_OF_TURN[model]
    assert texts[0].startswith("Category: hardware\nReply: Hold reset") and eot in texts[0]
    assert texts[1].startswith("Category: hardware\nReply: We will send") and eot in texts[1]
    # Nothing of the user or system turns is learned.
    assert "router blinks" not in "".join(texts) and "support desk" not in "".join(texts)
    # The end-of-turn token is in the labels even though (for ChatML) it is also the pad token.
    assert tok.convert_tokens_to_ids(eot) in [t for t in enc.labels if t != IGNORE_INDEX]


@pytest.mark.parametrize("model", ["tiny_phi3", "tiny_chatml"])
def test_padding_is_masked_by_attention_not_by_token_id(model: str, request: pytest.FixtureRequest) -> None:
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    short = encode_chat(tok, CONVERSATION[:3])
    long = encode_chat(tok, CONVERSATION)
    batch = collate([short, long], pad_id=tok.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # A real end-of-turn token equal to the pad id keeps its label.
    assert (batch["labels"][0, :n].tolist()) == short.labels


def test_prompt_ids_end_with_the_generation_prompt(tiny_phi3) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    text = tok.decode(prompt_ids(tok, CONVERSATION[:3]))
    assert text.endswith("<|user|>\nMy router blinks red.<|end|>\n<|assistant|>\n")
