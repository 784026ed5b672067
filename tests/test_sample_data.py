"""The committed sample dataset is the generator's output and keeps the contract evaluation relies on."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "support"
LABELS = ("billing", "connectivity", "account", "hardware", "shipping", "feature_request")
SHAPE = r"Category: (billing|connectivity|account|hardware|shipping|feature_request)\nReply: [^\n]+"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _label(example: dict) -> str:
    return example["messages"][-1]["content"].split("\n")[0].removeprefix("Category: ")


def _user_key(example: dict) -> tuple[str, ...]:
    return tuple(" ".join(m["content"].lower().split()) for m in example["messages"] if m["role"] == "user")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {"train": _read(DATA / "train.jsonl"), "validation": _read(DATA / "validation.jsonl")}


def test_committed_files_equal_a_fresh_generation(tmp_path: Path) -> None:
    assert gen.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name} drifted: rerun scripts/make_sample_data.py"


def test_sizes_roles_multi_turn_and_no_system_shares(splits: dict[str, list[dict]]) -> None:
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 200, "validation": 50}
    for name, examples in splits.items():
        shapes = Counter(tuple(m["role"] for m in e["messages"]) for e in examples)
        single, multi = ("user", "assistant"), ("user", "assistant", "user", "assistant")
        assert set(shapes) <= {single, multi, ("system", *single), ("system", *multi)}
        assert shapes[multi] + shapes[("system", *multi)] == round(len(examples) * 0.1), name
        assert shapes[single] + shapes[multi] == round(len(examples) * 0.2), name  # no system prompt


def test_every_assistant_turn_has_the_shape_and_a_known_label(splits: dict[str, list[dict]]) -> None:
    assert gen.LABELS == LABELS and gen.REPLY_SHAPE.pattern == SHAPE
    for examples in splits.values():
        for example in examples:
            for message in example["messages"]:
                if message["role"] == "assistant":
                    match = re.fullmatch(SHAPE, message["content"])
                    assert match and match[1] in LABELS, message["content"]


def test_replies_follow_their_category_pattern_with_details_from_the_user(splits: dict[str, list[dict]]) -> None:
    """The reply is the category's pattern, and each filled-in detail occurs in the user message it answers."""
    patterns = {
        label: re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>.+?)", re.escape(category.reply)))
        for label, category in gen.CATEGORIES.items()
    }
    for examples in splits.values():
        for example in examples:
            turns = [m for m in example["messages"] if m["role"] != "system"]
            for user, assistant in zip(turns[::2], turns[1::2]):
                label, reply = assistant["content"].removeprefix("Category: ").split("\nReply: ")
                match = patterns[label].fullmatch(reply)
                assert match, reply
                assert all(value in user["content"] for value in match.groupdict().values()), (user, reply)


def test_classes_are_balanced(splits: dict[str, list[dict]]) -> None:
    for examples in splits.values():
        counts = Counter(_label(e) for e in examples)
        assert set(counts) == set(LABELS)
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_no_duplicates_and_no_train_validation_overlap(splits: dict[str, list[dict]]) -> None:
    keys = {name: [_user_key(e) for e in examples] for name, examples in splits.items()}
    for name, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), f"duplicate user messages in {name}"
    assert not set(keys["train"]) & set(keys["validation"])


def test_examples_stay_short(splits: dict[str, list[dict]]) -> None:
    """CPU training time grows with length: ~300 characters (~100 tokens) on average."""
    for examples in splits.values():
        chars = [sum(len(m["content"]) for m in e["messages"]) for e in examples]
        assert sum(chars) / len(chars) < 400 and max(chars) < 700


def test_generation_is_deterministic_and_seeded() -> None:
    first, again = gen.generate(3, 60, 12), gen.generate(3, 60, 12)
    assert first == again
    assert gen.generate(4, 60, 12) != first
    # Validation is drawn first, from its own stream: changing the training size leaves it as it is.
    assert gen.generate(3, 90, 12)[1] == first[1]


def test_readme_lists_the_label_set_and_the_shape() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert all(f"`{label}`" in readme for label in LABELS)
    assert SHAPE in readme


def test_cli_rejects_a_size_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gen.main(["--out-dir", str(tmp_path), "--n-train", "0"])
    assert exit_info.value.code == 2 and "--n-train" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
