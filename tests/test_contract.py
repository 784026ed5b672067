"""The chat-data contract: every error code from real bad bytes, the JSON shape, exit statuses, the split, streaming."""

from __future__ import annotations

import copy
import json
import random
import tracemalloc
from pathlib import Path

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from phitune.chat import encode_chat
from phitune.cli import main
from phitune.config import PipelineConfig
from phitune.data import ERROR_CODES, DataFileError, split_train_validation, validate_files
from phitune.data.contract import line_cap
from phitune.data.reader import FileRead, iter_lines
from phitune.data.tokens import TokenCounter
from phitune.digest import file_sha256


def example(i: int, turns: int = 1, system: bool = True) -> dict:
    messages = [{"role": "system", "content": "You are Skylark Support."}] if system else []
    for t in range(turns):
        messages += [{"role": "user", "content": f"my router {i} drops Wi-Fi, try {t}"},
                     {"role": "assistant", "content": f"Category: connectivity\nReply: restart hub {i}."}]
    return {"messages": messages}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def write(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.write_bytes(b"".join(raw + end for raw in lines))
    return path


GOOD = [line(example(i)) for i in range(3)]


@pytest.fixture(scope="module")
def tok(tiny_chatml: Path):
    return AutoTokenizer.from_pretrained(tiny_chatml)


@pytest.fixture(scope="module")
def cfg(tiny_chatml: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"model": {"base_model": str(tiny_chatml)}, "training": {"max_seq_length": 256}, "data": {"min_examples": 1}}
    )


def codes_at(report, line_no: int | None = None) -> set[str]:
    return {e.code for e in report.errors if line_no is None or e.line == line_no}


# Real bad bytes per code; each variant is one line of a file of otherwise good examples.
BAD_LINES = {
    "invalid_encoding": [
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}',
        b"\xff\xfe{\x00",
        b'{"messages": [{"role": "user", "content": "x\\ud800"}, {"role": "assistant", "content": "ok"}]}',
    ],
    "invalid_json": [b'{"messages": [', b"not json at all", b"{'messages': []}", b"[" * 100_000],
    "data_type": [b"[1, 2]", b'"just a string"', b"42", b"null",
                  b'{"messages": ["hi", {"role": "assistant", "content": "ok"}]}'],
    "missing_messages_list": [b'{"prompt": "q", "completion": "a"}', b'{"messages": []}', b'{"messages": "hi"}', b"{}"],
    "message_missing_key": [b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "ok"}]}',
                            b'{"messages": [{"content": "q"}, {"role": "assistant", "content": "ok"}]}'],
    "message_unrecognized_key": [b'{"messages": [{"role": "user", "content": "q", "tool": 1}, {"role": "assistant", "content": "ok"}]}'],
    "unrecognized_role": [b'{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "ok"}]}',
                          b'{"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "ok"}]}'],
    "missing_content": [b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]}',
                        b'{"messages": [{"role": "user", "content": " \\n\\t "}, {"role": "assistant", "content": "ok"}]}',
                        b'{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "ok"}]}',
                        b'{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "ok"}]}'],
    "example_missing_assistant_message": [b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}'],
    "last_message_not_assistant": [
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]}'
    ],
    "too_many_tokens": [line({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]})],
    "duplicate_example": [GOOD[1]],
}


@pytest.mark.parametrize("code", list(BAD_LINES))
def test_line_error_codes(tmp_path: Path, tok, cfg, code: str) -> None:
    """Every variant of the code's bad bytes, each on its own line between good ones: exactly that code, at that line."""
    bads = BAD_LINES[code]
    lines = list(GOOD)
    for i, bad in enumerate(bads):
        lines += [bad, line(example(100 + i))]
    train = write(tmp_path / "train.jsonl", lines)
    report = validate_files(train, None, cfg, tokenizer=tok)
    bad_lines = [len(GOOD) + 1 + 2 * i for i in range(len(bads))]
    assert [(e.file, e.line, e.code) for e in report.errors] == [(str(train), n, code) for n in bad_lines], report.errors
    assert all(e.message for e in report.errors)
    assert report.stats["examples"] == len(lines) and report.stats["valid_examples"] == len(lines) - len(bads)


def test_messages_name_the_problem(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "t.jsonl", [*GOOD, *(BAD_LINES[c][0] for c in ("invalid_encoding", "unrecognized_role", "too_many_tokens", "duplicate_example"))])
    msgs = {e.code: e.message for e in validate_files(train, None, cfg, tokenizer=tok).errors}
    assert "0xe9" in msgs["invalid_encoding"]
    assert "'bot'" in msgs["unrecognized_role"] and "message 1" in msgs["unrecognized_role"]
    assert "max_seq_length=256" in msgs["too_many_tokens"]
    assert "line 2" in msgs["duplicate_example"]


def test_empty_file(tmp_path: Path, tok, cfg) -> None:
    for content in (b"", b"\n\n  \r\n"):
        train = tmp_path / "empty.jsonl"
        train.write_bytes(content)
        report = validate_files(train, None, cfg, tokenizer=tok)
        assert [(e.code, e.line) for e in report.errors] == [("empty_file", None)]


def test_too_few_examples(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "t.jsonl", [*GOOD, b"broken"])
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"min_examples": 4})})
    report = validate_files(train, None, strict, tokenizer=tok)
    assert codes_at(report) == {"invalid_json", "too_few_examples"}
    [few] = [e for e in report.errors if e.code == "too_few_examples"]
    assert few.line is None and "3 valid examples" in few.message and "min_examples=4" in few.message


def test_train_validation_overlap(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "train.jsonl", GOOD)
    val = write(tmp_path / "val.jsonl", [line(example(7)), GOOD[2]])
    report = validate_files(train, val, cfg, tokenizer=tok)
    assert [(e.file, e.line, e.code) for e in report.errors] == [(str(val), 2, "train_validation_overlap")]
    assert "line 3" in report.errors[0].message


def test_file_too_large(tmp_path: Path, tok, cfg) -> None:
    small = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_file_mb": 1})})
    train = write(tmp_path / "big.jsonl", [line(example(i)) for i in range(12_000)])
    assert train.stat().st_size > 1_000_000
    report = validate_files(train, None, small, tokenizer=tok)
    assert [(e.code, e.line) for e in report.errors] == [("file_too_large", None)]
    assert "max_file_mb=1" in report.errors[0].message


def test_huge_line_is_skipped_not_parsed(tmp_path: Path, tok, cfg) -> None:
    huge = b'{"messages": [{"role": "user", "content": "' + b"a" * (3 * line_cap(256)) + b'"}]}'
    train = write(tmp_path / "t.jsonl", [GOOD[0], huge, GOOD[1]])
    report = validate_files(train, None, cfg, tokenizer=tok)
    assert [(e.line, e.code) for e in report.errors] == [(2, "too_many_tokens")]
    assert "per-line cap" in report.errors[0].message and "not parsed" in report.errors[0].message
    assert report.stats["valid_examples"] == 2


def test_reading_a_100mb_line_holds_only_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(GOOD[0] + b"\n")
        for _ in range(100):
            fh.write(b"x" * (1 << 20))
        fh.write(b"\n" + GOOD[1] + b"\n")
    state = FileRead()
    tracemalloc.start()
    with path.open("rb") as fh:
        seen = [(n, data is not None, size) for n, data, size in iter_lines(fh, 1 << 20, state)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == [(1, True, len(GOOD[0])), (2, False, 100 << 20), (3, True, len(GOOD[1]))]
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 100 MiB line"
    assert state.lines == 3 and state.sha256.hexdigest() == file_sha256(path)


def test_never_crashes_on_garbage(tmp_path: Path, tok, cfg) -> None:
    rng = random.Random(0)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))).replace(b"\n", b"") or b"x" for _ in range(60)]
    garbage += [b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"', b"\x00" * 10, b"\xef\xbb\xbf{}"]
    train = write(tmp_path / "g.jsonl", [*GOOD, *garbage], end=b"\r\n")
    report = validate_files(train, None, cfg, tokenizer=tok)
    assert report.stats["valid_examples"] == 3
    assert {e.line for e in report.errors} <= set(range(4, 4 + len(garbage)))
    assert codes_at(report) <= set(ERROR_CODES)
    json.dumps(report.to_json())


def test_bom_crlf_and_blank_lines_are_tolerated(tmp_path: Path, tok, cfg) -> None:
    train = tmp_path / "t.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + GOOD[0] + b"\r\n\r\n" + GOOD[1] + b"\r\n" + GOOD[2])  # no final newline
    report = validate_files(train, None, cfg, tokenizer=tok)
    assert report.valid and report.stats["examples"] == 3
    assert [(w.code, w.line) for w in report.warnings] == [("blank_line", 2)]


def test_template_rejection_is_reported(tmp_path: Path, tok, cfg) -> None:
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    )
    train = write(tmp_path / "t.jsonl", [line(example(1, system=False)), line(example(2))])
    report = validate_files(train, None, cfg, tokenizer=strict)
    assert [(e.line, e.code) for e in report.errors] == [(2, "unrecognized_role")]
    assert "System role not supported" in report.errors[0].message


@pytest.mark.parametrize("fixture", ["tiny_chatml", "tiny_phi3"])
def test_token_counts_equal_training_encoding(request, fixture: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    counter = TokenCounter(tokenizer)
    assert counter.fast_render
    convs = [example(1)["messages"], example(2, turns=3)["messages"], example(3, system=False)["messages"],
             [{"role": "user", "content": "  padded {{ braces }} <|im_end|>\n"}, {"role": "assistant", "content": "\nok "}]]
    texts = [counter.render(c) for c in convs]
    assert counter.count(texts) == [len(encode_chat(tokenizer, c).input_ids) for c in convs]


def test_added_tokens_that_strip_whitespace_are_counted_exactly(tiny_phi3: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3)
    # Real Phi-3 marks its chat tokens rstrip: `<|end|>\n` is one token, so pieces between tokens do not add up.
    tokenizer.backend_tokenizer.add_special_tokens([AddedToken("<|end|>", rstrip=True, special=True)])
    counter = TokenCounter(tokenizer)
    convs = [example(i, turns=2)["messages"] for i in range(3)]
    assert counter.count([counter.render(c) for c in convs]) == [len(encode_chat(tokenizer, c).input_ids) for c in convs]


def test_content_changing_template_falls_back_to_jinja(tok) -> None:
    trimming = copy.deepcopy(tok)
    trimming.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    counter = TokenCounter(trimming)
    assert not counter.fast_render
    conv = [{"role": "user", "content": "  q  "}, {"role": "assistant", "content": " a "}]
    assert counter.render(conv) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


def test_json_shape_and_stats(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "train.jsonl", [*GOOD, line(example(5, turns=2)), b"oops"])
    val = write(tmp_path / "val.jsonl", [line(example(8))])
    out = validate_files(train, val, cfg, tokenizer=tok).to_json()
    assert set(out) == {"valid", "errors", "warnings", "stats"} and out["valid"] is False
    assert out["errors"] == [{"file": str(train), "line": 5, "code": "invalid_json", "message": out["errors"][0]["message"]}]
    stats = out["stats"]
    assert stats["examples"] == 6 and stats["valid_examples"] == 5
    assert stats["messages_per_role"] == {"system": 5, "user": 6, "assistant": 6}
    assert stats["tokens"] == sum(f["tokens"] for f in stats["files"].values()) > 0
    pct = stats["tokens_per_example"]
    assert pct["min"] <= pct["p50"] <= pct["p90"] <= pct["p95"] <= pct["p99"] <= pct["max"]
    assert stats["files"]["train"]["examples"] == 5 and stats["files"]["validation"]["examples"] == 1
    assert json.loads(json.dumps(out)) == out


def test_table_rendering(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "train.jsonl", [*GOOD, *([b"oops"] * 60)])
    text = validate_files(train, None, cfg, tokenizer=tok).render_table()
    assert "INVALID" in text and "invalid_json x60" in text
    assert "... and 10 more errors" in text and "STATISTICS" in text


def test_data_docs_are_written(tmp_path: Path, tok, cfg) -> None:
    train = write(tmp_path / "train.jsonl", [*GOOD, b"oops"])
    report = validate_files(train, None, cfg, tokenizer=tok, docs_dir=tmp_path / "docs")
    index = Path(report.stats["data_docs"])
    assert index.is_file() and index.parent == (tmp_path / "docs").resolve()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_unreadable_file_is_a_usage_error(tmp_path: Path, tok, cfg) -> None:
    with pytest.raises(DataFileError, match="not found") as err:
        validate_files(tmp_path / "missing.jsonl", None, cfg, tokenizer=tok)
    assert err.value.exit_code == 2
    with pytest.raises(DataFileError, match="not a regular file"):
        validate_files(tmp_path, None, cfg, tokenizer=tok)


def test_cli_exit_statuses(tmp_path: Path, tiny_chatml: Path, capsys) -> None:
    model = f"model.base_model={tiny_chatml}"
    good = write(tmp_path / "good.jsonl", GOOD)
    val = write(tmp_path / "val.jsonl", [line(example(11))])
    bad = write(tmp_path / "bad.jsonl", [*GOOD, b"{"])

    # Overrides follow the positional file: argparse does not take positionals after options here.
    assert main(["validate", str(good), model, "data.min_examples=1", "--validation", str(val), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True and out["stats"]["files"]["validation"]["examples"] == 1

    assert main(["validate", str(bad), model, "data.min_examples=1"]) == 1
    assert "invalid_json" in capsys.readouterr().out

    assert main(["validate", str(tmp_path / "nope.jsonl"), model]) == 2
    assert "train file not found" in capsys.readouterr().err
    assert main(["validate", str(good), "training.max_seq_length=lots"]) == 2
    assert "training.max_seq_length" in capsys.readouterr().err
    assert main(["validate", str(good), "--config", str(tmp_path / "missing.yaml")]) == 2


def test_split_is_seeded_deterministic_and_disjoint(tmp_path: Path) -> None:
    lines = [line(example(i)) for i in range(40)]
    src = tmp_path / "all.jsonl"
    src.write_bytes(b"\n".join(lines[:20]) + b"\n\n" + b"\n".join(lines[20:]))  # a blank line, no final newline
    a = split_train_validation(src, tmp_path / "a", 0.25, seed=7)
    b = split_train_validation(src, tmp_path / "b", 0.25, seed=7)
    c = split_train_validation(src, tmp_path / "c", 0.25, seed=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    train, val = (p.read_bytes().splitlines() for p in a)
    assert len(val) == 10 and len(train) == 30
    assert not set(train) & set(val) and sorted(train + val) == sorted(lines)
    assert train == [ln for ln in lines if ln in set(train)]  # original order kept


def test_bench_data_is_valid_and_distinct(tmp_path: Path, tok, cfg) -> None:
    from phitune.data.bench import make_file

    path = tmp_path / "bench.jsonl"
    assert make_file(path, 300) > 300 * 300
    report = validate_files(path, None, cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_seq_length": 2048})}), tokenizer=tok)
    assert report.valid and report.stats["examples"] == 300
