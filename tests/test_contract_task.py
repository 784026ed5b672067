"""The validate_data Prefect task in a real (temporary) Prefect server: artifacts, Data Docs, the automatic
split, and the flow stopping on invalid data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.artifacts import Artifact

from phitune.config import PipelineConfig
from phitune.data import data_digest
from phitune.errors import DataError
from tasks.validate import FAILURES_KEY, SUMMARY_KEY, validate_data

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow
def validate_only(config: PipelineConfig, work_dir: str) -> dict[str, Any]:
    """The pipeline's first step, as flows/pipeline.py wires it."""
    return validate_data(config, work_dir)


def _chats(path: Path, n: int, extra: list[bytes] = ()) -> str:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}).encode()
        for i in range(n)
    ]
    path.write_bytes(b"\n".join([*lines, *extra]) + b"\n")
    return str(path)


def _config(tmp_path: Path, tiny_chatml: Path, **data: Any) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {"model": {"base_model": str(tiny_chatml)}, "data": {"min_examples": 5, "docs_dir": str(tmp_path / "docs"), **data}}
    )


def test_valid_data_with_automatic_split(tmp_path: Path, tiny_chatml: Path) -> None:
    cfg = _config(tmp_path, tiny_chatml, train_file=_chats(tmp_path / "train.jsonl", 20), validation_file=None, validation_split=0.25)
    result = validate_only(cfg, str(tmp_path / "run"))

    assert set(result) == {"train_file", "validation_file", "digest", "report_file", "stats"}
    train, val = Path(result["train_file"]), Path(result["validation_file"])
    assert train.parent == val.parent == tmp_path / "run" / "data"
    train_lines, val_lines = train.read_bytes().splitlines(), val.read_bytes().splitlines()
    assert len(val_lines) == 5 and len(train_lines) == 15 and not set(train_lines) & set(val_lines)
    assert result["digest"] == data_digest(train, val)
    assert result["stats"]["split"]["seed"] == cfg.data.split_seed and result["stats"]["valid_examples"] == 20
    assert json.loads(Path(result["report_file"]).read_text())["valid"] is True
    assert (tmp_path / "docs" / "index.html").is_file()

    again = validate_only(cfg, str(tmp_path / "run2"))  # same seed, same split, same digest
    assert again["digest"] == result["digest"]

    summary = Artifact.get(SUMMARY_KEY)
    assert summary is not None and "passed" in summary.data
    assert Artifact.get(FAILURES_KEY).data in ("[]", [])


def test_invalid_data_publishes_artifacts_and_stops_the_flow(tmp_path: Path, tiny_chatml: Path) -> None:
    train = _chats(tmp_path / "train.jsonl", 6, extra=[b"{broken", b'{"messages": [{"role": "user", "content": "only a question"}]}'])
    val = _chats(tmp_path / "val.jsonl", 2)
    cfg = _config(tmp_path, tiny_chatml, train_file=train, validation_file=val)

    with pytest.raises(DataError, match="invalid_json"):
        validate_only(cfg, str(tmp_path / "run"))

    table = Artifact.get(FAILURES_KEY).data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [(r["line"], r["code"]) for r in rows] == [(7, "invalid_json"), (8, "example_missing_assistant_message"), (1, "train_validation_overlap"), (2, "train_validation_overlap")]
    assert "FAILED" in Artifact.get(SUMMARY_KEY).data
    report = json.loads((tmp_path / "run" / "data" / "validation-report.json").read_text())
    assert report["valid"] is False and len(report["errors"]) == 4
    assert (tmp_path / "docs" / "index.html").is_file()
