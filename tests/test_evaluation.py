"""Evaluation metrics on known outputs, generation with the model's own stop token, and load-once adapter switching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from phitune.chat import collate, encode_chat, prompt_ids
from phitune.config import EvaluationConfig
from phitune.errors import DataError
from phitune.evaluation import (
    evaluate_model,
    evaluate_models,
    generate,
    generate_ids,
    label_metrics,
    load_examples,
    loss_metrics,
    parse_label,
    rouge_l,
)

CHATS = [
    ("My Wi-Fi keeps dropping every evening.", "Category: connectivity\nReply: Restart the router."),
    ("Refund order 1234 please", "Category: billing\nReply: We refunded order 1234 to your card."),
    ("hello", "Category: billing\nReply: Thanks!"),
    ("The app shows a red light status, what should I do? Thanks, and have a nice day.", "Category: connectivity\nReply: Check the app."),
    ("abc", "Category: hardware\nReply: Send us the serial number."),
]


def write_chats(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for user, reply in CHATS:
            messages = [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": user},
                {"role": "assistant", "content": reply},
            ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chats(tmp_path_factory.mktemp("eval") / "validation.jsonl")


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Category: billing\nReply: refunded", "billing"),
        ("  category:Feature_Request.\nReply: x", "feature_request"),
        ("Category: connectivity", "connectivity"),
        ("Reply: no category first\nCategory: billing", None),
        ("Category:\nReply: empty label", None),
        ("", None),
        ("The category is billing", None),
    ],
)
def test_parse_label_reads_the_first_line_only(text: str, label: str | None) -> None:
    assert parse_label(text) == label


def test_label_metrics_on_hand_computed_values() -> None:
    refs = ["a", "a", "b", "c"]
    preds = ["a", None, "b", "b"]  # None: unparseable generation, counted wrong
    got = label_metrics(refs, preds)
    assert got["label_accuracy"] == pytest.approx(0.5)
    # F1 per class: a = 2/3 (P 1, R 1/2), b = 2/3 (P 1/2, R 1), c = 0; labels come from the references.
    assert got["macro_f1"] == pytest.approx(4 / 9)
    # A label outside the reference set is simply wrong; references without a label are skipped.
    assert label_metrics(["a", None, "b"], ["zzz", "a", "b"]) == {"label_accuracy": 0.5, "macro_f1": pytest.approx(0.5)}
    assert label_metrics([None, None], ["a", "b"]) == {}


def test_rouge_l() -> None:
    scores = rouge_l(["restart the router now", "restart the router now"], ["Restart the router now.", "send a refund"])
    assert scores == [pytest.approx(1.0), 0.0]


def test_load_examples_requires_a_final_assistant_reply(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: the last message must be the assistant reply"):
        load_examples(path)
    examples = load_examples(write_chats(tmp_path / "ok.jsonl"), max_examples=2)
    assert [ex.label for ex in examples] == ["connectivity", "billing"]


@pytest.mark.parametrize("model_fixture", ["tiny_phi3", "tiny_chatml"])
def test_loss_metrics_are_token_weighted_over_assistant_tokens(model_fixture: str, chats: Path, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model_fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    examples = load_examples(chats)
    got = loss_metrics(model, tok, examples, batch_size=3)
    # Reference: transformers' own loss, one example at a time (labels = assistant tokens), weighted by token count.
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            batch = collate([encode_chat(tok, ex.messages)], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    assert got["eval_loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
    assert 0.0 <= got["token_accuracy"] <= 1.0


def _greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("model_fixture", ["tiny_phi3", "tiny_chatml"])
def test_generation_stops_at_the_models_own_stop_token(model_fixture: str, chats: Path, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model_fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    example = load_examples(chats)[0]
    free = _greedy_tokens(model, prompt_ids(tok, example.messages), 3)
    # Make the third greedy token the model's stop token: the reply must end right before its first occurrence.
    model.generation_config.eos_token_id = [free[2]]
    stop_at = free.index(free[2])
    reply = generate(model, tok, [example], batch_size=1, max_new_tokens=10)[0]
    assert reply == tok.decode(free[:stop_at], skip_special_tokens=True).strip()


@pytest.mark.parametrize("model_fixture", ["tiny_phi3", "tiny_chatml"])
def test_batched_left_padded_generation_equals_one_at_a_time(model_fixture: str, chats: Path, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model_fixture)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompts = [prompt_ids(tok, ex.messages) for ex in load_examples(chats)]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch really is padded
    batched = generate_ids(model, tok, prompts, batch_size=len(prompts), max_new_tokens=5)
    single = [generate_ids(model, tok, [p], batch_size=1, max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert all(batched)


def test_load_once_adapter_switching_equals_separately_loaded_models(tiny_chatml: Path, chats: Path, tmp_path: Path) -> None:
    candidate = make_adapter(tiny_chatml, tmp_path / "candidate", seed=1)
    champion = make_adapter(tiny_chatml, tmp_path / "champion", seed=2)
    tok = AutoTokenizer.from_pretrained(tiny_chatml)
    examples = load_examples(chats)
    cfg = EvaluationConfig(max_new_tokens=6, batch_size=2)

    once = evaluate_models(
        AutoModelForCausalLM.from_pretrained(tiny_chatml), tok, examples,
        {"base": None, "candidate": str(candidate), "champion": str(champion)}, cfg,
    )

    separate = {"base": evaluate_model(AutoModelForCausalLM.from_pretrained(tiny_chatml), tok, examples, cfg)}
    for name, path in (("candidate", candidate), ("champion", champion)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chatml), str(path)).eval()
        separate[name] = evaluate_model(model, tok, examples, cfg)

    for name, (metrics, replies) in separate.items():
        assert once.metrics[name] == pytest.approx(metrics, rel=1e-5), name
        assert [row[f"{name}_generated"] for row in once.rows] == replies, name
    # The adapters really were applied (not silently the base model three times).
    assert once.metrics["candidate"]["eval_loss"] != pytest.approx(once.metrics["base"]["eval_loss"])
    assert once.metrics["champion"]["eval_loss"] != pytest.approx(once.metrics["candidate"]["eval_loss"])
    assert set(once.metrics["base"]) == {"eval_loss", "perplexity", "token_accuracy", "label_accuracy", "macro_f1", "rougeL"}
    row = once.rows[1]
    assert row["prompt"] == CHATS[1][0] and row["reference"] == CHATS[1][1] and row["reference_label"] == "billing"
    assert {"base_label", "candidate_label", "champion_label"} <= set(row)
