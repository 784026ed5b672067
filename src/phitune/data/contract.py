"""The chat-data contract: `validate_files` and `phitune validate`.

One streaming pass per file turns each line into a row of facts (`reader.parse_line`), renders the
conversations that can be rendered with the model's chat template and counts their tokens in
batches on a worker thread (`tokens.TokenCounter`), and links duplicates by a hash of the rendered
text (what training sees). The Great Expectations suites (`suite.ContractSuite`) then decide, over
that one-row-per-example table and a one-row-per-file table, which rows fail which code; the report
turns each failing row into an issue with its file, 1-based line and a message saying what is wrong.

Memory: the per-example table and the duplicate index cost ~1 KB per example (measured: ~120 MB
for 100k), independent of line length; texts live only for the chunk being tokenized; no line
longer than the per-line cap is ever held.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from phitune.config import PipelineConfig, load_config
from phitune.data.reader import FileRead, iter_lines, parse_line
from phitune.data.report import ERROR_CODES, Issue, ValidationReport, plural
from phitune.data.suite import EXAMPLE_COLUMNS, FILE_COLUMNS, ContractSuite, Failure
from phitune.data.tokens import TemplateRejected, TokenCounter
from phitune.errors import DataError

MB = 1_000_000
LINE_BYTES_PER_TOKEN = 32
MIN_LINE_CAP = 1 << 20
CHUNK = 2048
_CODE_ORDER = {code: i for i, code in enumerate(ERROR_CODES)}
_COLUMN = {name: i for i, name in enumerate(EXAMPLE_COLUMNS)}
_TOKENS = _COLUMN["tokens"]


class DataFileError(DataError):
    """A data file that cannot be read at all (missing, a folder, no permission): a usage error, exit 2."""

    exit_code = 2


def line_cap(max_seq_length: int) -> int:
    """Longest line parsed, in bytes: far more than `max_seq_length` tokens of JSON can take (>= 1 MiB).

    A longer line is reported as too_many_tokens without being parsed, so memory stays bounded.
    """
    return max(MIN_LINE_CAP, LINE_BYTES_PER_TOKEN * max_seq_length)


class _ExampleTable:
    """Rows of the per-example table as lists (cheaper than a dict per row)."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def add(self, file: str, line: int, size: int) -> list[Any]:
        row = [None] * len(EXAMPLE_COLUMNS)
        row[0], row[1], row[2] = file, line, size
        self.rows.append(row)
        return row

    @staticmethod
    def set(row: list[Any], values: dict[str, Any]) -> None:
        for name, value in values.items():
            row[_COLUMN[name]] = value

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(EXAMPLE_COLUMNS))


class _Scanner:
    """Streams files into the table; tokenization of one chunk overlaps parsing of the next."""

    def __init__(self, counter: TokenCounter, cap: int, pool: ThreadPoolExecutor, on_bytes: Any = None) -> None:
        self.counter, self.cap, self.pool, self.on_bytes = counter, cap, pool, on_bytes
        self.table = _ExampleTable()
        self.details: dict[tuple[str, int], dict[str, str]] = {}
        self._rows: list[list[Any]] = []
        self._texts: list[str] = []
        self._inflight: tuple[list[list[Any]], Future[list[int]]] | None = None
        self.waited = 0.0  # seconds the reader sat waiting for token counts

    def scan(self, path: Path, label: str, train_index: dict[bytes, int] | None) -> tuple[FileRead, dict[bytes, int]]:
        """Read one file; returns its read state and its hash -> first line index (for overlap checks)."""
        state = FileRead()
        seen: dict[bytes, int] = {}
        with path.open("rb") as fh:
            for number, data, size in iter_lines(fh, self.cap, state, self.on_bytes):
                row = self.table.add(label, number, size)
                if data is None:
                    continue
                parsed = parse_line(data)
                self.table.set(row, parsed.columns)
                if parsed.details:
                    self.details[(label, number)] = parsed.details
                if parsed.messages is None:
                    continue
                try:
                    text = self.counter.render(parsed.messages)
                except TemplateRejected as exc:
                    self.table.set(row, {"renders": False})
                    self.details[(label, number)] = {"unrecognized_role": f"the chat template of {self.counter.name} rejects this conversation: {exc}"}
                    continue
                key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                first = seen.setdefault(key, number)
                self.table.set(row, {
                    "renders": True,
                    "duplicate_of": first if first != number else None,
                    "overlap_line": train_index.get(key) if train_index is not None else None,
                })
                self._rows.append(row)
                self._texts.append(text)
                if len(self._texts) >= CHUNK:
                    self._flush()
        self._flush()
        self._collect()
        return state, seen

    def _flush(self) -> None:
        """Hand the buffered texts to the tokenizer thread; collect the previous chunk (at most two alive)."""
        if not self._texts:
            return
        future = self.pool.submit(self.counter.count, self._texts)
        self._collect()
        self._inflight = (self._rows, future)
        self._rows, self._texts = [], []

    def _collect(self) -> None:
        if self._inflight is None:
            return
        rows, future = self._inflight
        start = time.perf_counter()
        counts = future.result()
        self.waited += time.perf_counter() - start
        for row, n in zip(rows, counts):
            row[_TOKENS] = n
        self._inflight = None


def _check_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise DataFileError(f"{what} file not found: {path}")
    if not path.is_file():
        raise DataFileError(f"{what} file is not a regular file: {path}")
    try:
        path.open("rb").close()
    except OSError as exc:
        raise DataFileError(f"{what} file cannot be read: {path} ({exc.strerror or exc})") from None


def validate_files(
    train: Path,
    validation: Path | None,
    cfg: PipelineConfig,
    tokenizer: Any = None,
    docs_dir: Path | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Check chat JSONL files against the contract; a report, never an exception, for bad content.

    Raises DataFileError (exit status 2) only when a file cannot be opened at all. The tokenizer is
    the configured model's (`cfg.model`) unless given. `docs_dir`: write GX Data Docs there.
    `progress`: a byte progress bar on stderr.
    """
    start = time.perf_counter()
    files = {"train": Path(train)} | ({"validation": Path(validation)} if validation is not None else {})
    for label, path in files.items():
        _check_readable(path, label)
    if tokenizer is None:
        from phitune.modeling import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    counter = TokenCounter(tokenizer)
    reading = time.perf_counter()
    sizes = {label: path.stat().st_size for label, path in files.items()}
    max_bytes = cfg.data.max_file_mb * MB
    to_read = {label: path for label, path in files.items() if sizes[label] <= max_bytes}  # GX reports the others
    cap = line_cap(cfg.training.max_seq_length)

    with ThreadPoolExecutor(1) as tokenize_pool, ThreadPoolExecutor(1) as setup_pool, tqdm(
        total=sum(sizes[label] for label in to_read), unit="B", unit_scale=True, desc="validate", file=sys.stderr,
        leave=False, disable=not progress,
    ) as bar:
        # Importing GX takes seconds: do it while the files are read.
        suite_future = setup_pool.submit(ContractSuite, cfg.training.max_seq_length, cap, max_bytes)
        scanner = _Scanner(counter, cap, tokenize_pool, bar.update if progress else None)
        reads: dict[str, FileRead] = {}
        train_index = None
        for label, path in to_read.items():
            reads[label], seen = scanner.scan(path, label, train_index)
            if label == "train":
                train_index = seen
        scanned = time.perf_counter()
        suite = suite_future.result()
    timings = {
        "load_tokenizer_s": reading - start,
        "read_s": scanned - reading,  # parse + render, overlapping tokenization and the GX import
        "tokenize_s": counter.seconds,
        "read_waiting_for_tokens_s": scanner.waited,
        "gx_setup_wait_s": time.perf_counter() - scanned,
    }

    judged = time.perf_counter()
    frame = scanner.table.frame()
    failures = suite.check_examples(frame)
    bad_rows = {(f.file, f.line) for f in failures}
    frame["_bad"] = np.fromiter(((f, n) in bad_rows for f, n in zip(frame["file"], frame["line"])), dtype=bool, count=len(frame))
    failures += suite.check_files(_file_table(frame, files, sizes, to_read, cfg.data.min_examples))

    report = ValidationReport(errors=_issues(failures, scanner.details, files, cfg, counter.name), warnings=_warnings(reads, files))
    report.stats = _stats(frame, files, reads, sizes, cfg, counter.name)
    timings["gx_validate_and_report_s"] = time.perf_counter() - judged
    if docs_dir is not None:
        report.stats["data_docs"] = str(suite.write_docs(Path(docs_dir)))
    report.stats["seconds"] = round(time.perf_counter() - start, 3)
    report.stats["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return report


def _file_table(frame: pd.DataFrame, files: dict[str, Path], sizes: dict[str, int], read: dict[str, Path], min_examples: int) -> pd.DataFrame:
    """One row per file: size, examples, valid examples (after the example suite), examples required."""
    rows = []
    for label in files:
        bad = frame.loc[frame["file"] == label, "_bad"]
        examples = len(bad) if label in read else None
        rows.append({
            "file": label,
            "bytes": sizes[label],
            "examples": examples,
            "valid_examples": None if examples is None else int((~bad).sum()),
            # Only training needs a minimum; an empty file is reported once, as empty_file.
            "required_examples": min_examples if label == "train" and examples else 0,
        })
    return pd.DataFrame(rows, columns=list(FILE_COLUMNS))


def _message(f: Failure, details: dict[tuple[str, int], dict[str, str]], cfg: PipelineConfig, tokenizer_name: str, files: dict[str, Path]) -> str:
    """What is wrong, in words: the parser's detail when it has one, else built from the failing value."""
    detail = details.get((f.file, f.line), {}).get(f.code) if f.line is not None else None
    if detail:
        return detail
    v = f.value
    max_len = cfg.training.max_seq_length
    match f.code:
        case "too_many_tokens" if f.column == "bytes":
            return (f"line is {v:,} bytes, over the {line_cap(max_len):,}-byte per-line cap; not parsed "
                    f"(no line that long fits training.max_seq_length={max_len} tokens)")
        case "too_many_tokens":
            return f"{v:,} tokens with the chat template of {tokenizer_name}, over training.max_seq_length={max_len}"
        case "example_missing_assistant_message":
            return "no assistant message: nothing to learn from this example"
        case "last_message_not_assistant":
            return f"the last message is from {v!r}, not 'assistant' (turns after the last assistant message are never learned)"
        case "duplicate_example":
            return f"the same conversation as line {v}"
        case "train_validation_overlap":
            return f"the same conversation as line {v} of the training file {files['train']}"
        case "file_too_large":
            return f"{v:,} bytes, over data.max_file_mb={cfg.data.max_file_mb} ({cfg.data.max_file_mb * MB:,} bytes; Azure's fine-tuning limit is 512 MB); not read"
        case "empty_file":
            return "no examples: the file is empty or has only blank lines"
        case "too_few_examples":
            return f"{plural(v['valid_examples'], 'valid example')}, fewer than data.min_examples={v['required_examples']}"
    return f"failed the {f.code} check (value {v!r})"


def _issues(failures: list[Failure], details: dict, files: dict[str, Path], cfg: PipelineConfig, tokenizer_name: str) -> list[Issue]:
    order = {label: i for i, label in enumerate(files)}
    unique = {(f.file, f.line, f.code): f for f in failures}  # two expectations may share a code
    ranked = sorted(unique.values(), key=lambda f: (order[f.file], -1 if f.line is None else f.line, _CODE_ORDER[f.code]))
    return [Issue(str(files[f.file]), f.line, f.code, _message(f, details, cfg, tokenizer_name, files)) for f in ranked]


def _warnings(reads: dict[str, FileRead], files: dict[str, Path]) -> list[Issue]:
    """Blank lines are skipped, not errors: one warning per file, at the first one."""
    warnings = []
    for label, read in reads.items():
        if not read.blank_lines:
            continue
        shown = ", ".join(map(str, read.first_blank_lines)) + (" ..." if read.blank_lines > len(read.first_blank_lines) else "")
        where = f"line{'s' if read.blank_lines > 1 else ''} {shown}"
        message = f"{plural(read.blank_lines, 'blank line')} skipped ({where})"
        warnings.append(Issue(str(files[label]), read.first_blank_lines[0], "blank_line", message))
    return warnings


def _summary(rows: pd.DataFrame) -> dict[str, Any]:
    valid = rows.loc[~rows["_bad"]]
    tokens = valid["tokens"].dropna().to_numpy(dtype=np.int64)
    pct = {}
    if tokens.size:
        qs = np.percentile(tokens, [50, 90, 95, 99])
        pct = {"min": int(tokens.min()), "p50": int(qs[0]), "p90": int(qs[1]), "p95": int(qs[2]), "p99": int(qs[3]),
               "max": int(tokens.max()), "mean": round(float(tokens.mean()), 1)}
    return {
        "examples": len(rows),
        "valid_examples": len(valid),
        "tokens": int(tokens.sum()),
        "messages_per_role": {r: int(valid[r].fillna(0).sum()) for r in ("system", "user", "assistant")},
        "tokens_per_example": pct,
    }


def _stats(frame: pd.DataFrame, files: dict[str, Path], reads: dict[str, FileRead], sizes: dict[str, int], cfg: PipelineConfig, tokenizer_name: str) -> dict[str, Any]:
    per_file = {}
    for label, path in files.items():
        read = reads.get(label)
        per_file[label] = {
            "path": str(path),
            "bytes": sizes[label],
            "sha256": read.sha256.hexdigest() if read else None,
            "lines": read.lines if read else None,
            "blank_lines": read.blank_lines if read else None,
            **_summary(frame[frame["file"] == label]),
        }
    return {**_summary(frame), "tokenizer": tokenizer_name, "max_seq_length": cfg.training.max_seq_length, "files": per_file}


def cli_validate(args: argparse.Namespace) -> int:
    """`phitune validate TRAIN [--validation VAL] [--json] [--docs-dir DIR] [--config C] [k=v ...]`: 0 valid, 1 invalid, 2 usage."""
    cfg = load_config(args.config, args.overrides)
    report = validate_files(
        Path(args.train_file),
        Path(args.validation) if args.validation else None,
        cfg,
        docs_dir=Path(args.docs_dir) if args.docs_dir else None,
        progress=not args.json and sys.stderr.isatty(),
    )
    print(json.dumps(report.to_json(), indent=2, ensure_ascii=False) if args.json else report.render_table())
    return 0 if report.valid else 1
