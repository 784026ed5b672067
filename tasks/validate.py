"""The pipeline's first task: the chat-data contract, with what only orchestration adds.

Artifacts (table of failures, markdown summary), Great Expectations Data Docs on disk, and the
automatic validation split when the config has no validation file. Invalid data raises DataError
after the artifacts are published, so the flow stops before training and the UI shows why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from phitune.config import PipelineConfig
from phitune.data import ValidationReport, data_digest, split_train_validation, validate_files
from phitune.errors import DataError

FAILURES_KEY = "data-validation-failures"
SUMMARY_KEY = "data-validation-summary"
ARTIFACT_ROWS = 500  # the table artifact is for reading in the UI; the report file has every issue


def _table(report: ValidationReport) -> list[dict[str, Any]]:
    issues = [("error", i) for i in report.errors] + [("warning", i) for i in report.warnings]
    return [
        {"severity": sev, "file": i.file, "line": i.line, "code": i.code, "message": i.message} for sev, i in issues[:ARTIFACT_ROWS]
    ]


def _markdown(report: ValidationReport, docs: str | None, split: dict[str, Any] | None) -> str:
    stats = report.stats
    lines = [f"# Data validation: {'passed' if report.valid else 'FAILED'}", "", report.summary(), ""]
    if report.errors:
        lines += ["| code | errors |", "|---|---:|", *(f"| `{c}` | {n:,} |" for c, n in report.error_counts().items()), ""]
        first = report.errors[0]
        lines += [f"First error: `{first.file}` line {first.line if first.line is not None else '-'}: {first.message}", ""]
    lines += ["| file | examples | valid | tokens | p50 | p95 | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    for f in stats.get("files", {}).values():
        pct = f.get("tokens_per_example") or {}
        lines.append(
            f"| `{f['path']}` | {f.get('examples') or 0:,} | {f.get('valid_examples') or 0:,} | {f.get('tokens') or 0:,} "
            f"| {pct.get('p50', '-')} | {pct.get('p95', '-')} | {pct.get('max', '-')} |"
        )
    lines += ["", f"Tokens with the chat template of `{stats.get('tokenizer')}`; training.max_seq_length = {stats.get('max_seq_length')}."]
    if split:
        lines.append(
            f"Automatic split (seed {split['seed']}, fraction {split['fraction']}): `{split['train_file']}`, `{split['validation_file']}`."
        )
    if docs:
        lines.append(f"Great Expectations Data Docs: `{docs}`")
    return "\n".join(lines)


@task(name="validate-data", cache_policy=NONE)
def validate_data(config: PipelineConfig, work_dir: str) -> dict[str, Any]:
    """Run the contract on the configured files; split off a validation set when none is configured.

    Returns {"train_file", "validation_file", "digest", "report_file", "stats"} (paths as str; digest:
    `phitune.data.data_digest` of the two files training and evaluation will read). Never cached:
    the answer must follow the bytes on disk, not the config that names them.
    """
    logger = get_run_logger()
    data = config.data
    train = Path(data.train_file)
    validation = Path(data.validation_file) if data.validation_file else None
    out = Path(work_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)

    report = validate_files(train, validation, config, docs_dir=Path(data.docs_dir))
    split = None
    if report.valid and validation is None:
        train, validation = split_train_validation(train, out, data.validation_split, data.split_seed)
        split = {"seed": data.split_seed, "fraction": data.validation_split, "train_file": str(train), "validation_file": str(validation)}
        report.stats["split"] = split
    report_file = out / "validation-report.json"
    report_file.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    create_table_artifact(
        table=_table(report),
        key=FAILURES_KEY,
        description=f"Chat-data contract issues (first {ARTIFACT_ROWS}; all in {report_file}).",
    )
    create_markdown_artifact(_markdown(report, report.stats.get("data_docs"), split), key=SUMMARY_KEY, description="Chat-data contract summary")
    logger.info("data validation: %s", report.summary())
    if not report.valid:
        first = report.errors[0]
        where = first.file + (f" line {first.line}" if first.line is not None else "")
        raise DataError(f"training data failed validation: {report.summary()}; first: {where}: {first.code}: {first.message}. Report: {report_file}")
    return {
        "train_file": str(train),
        "validation_file": str(validation),
        "digest": data_digest(train, validation),
        "report_file": str(report_file),
        "stats": report.stats,
    }
