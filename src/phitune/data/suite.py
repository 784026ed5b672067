"""The Great Expectations suites of the chat-data contract: they decide what passes.

Two tables are validated (GX validates flat tables, not nested JSON): one row per example with the
facts `reader.parse_line` established plus token lengths and duplicate links, and one row per file.
Each expectation carries its contract error code in `meta`; a failing row comes back by its file and
1-based line number (`unexpected_index_column_names`), with the offending value. An ephemeral context
keeps nothing on disk except the Data Docs written on request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

EXAMPLE_COLUMNS = (
    "file", "line", "bytes", "utf8", "json", "kind", "messages_list", "messages", "system", "user", "assistant",
    "bad_messages", "missing_keys", "unrecognized_keys", "unrecognized_roles", "missing_content", "last_role",
    "renders", "tokens", "duplicate_of", "overlap_line",
)
FILE_COLUMNS = ("file", "bytes", "examples", "valid_examples", "required_examples")
_SITE = "phitune"


@dataclass(frozen=True)
class Failure:
    """One failing row of one expectation."""

    code: str
    file: str
    line: int | None
    column: str
    value: Any


def _example_expectations(max_seq_length: int, line_cap: int) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    def zero(column: str) -> Any:
        return gxe.ExpectColumnValuesToBeBetween(column=column, max_value=0)

    return [
        ("invalid_encoding", gxe.ExpectColumnValuesToBeInSet(column="utf8", value_set=[True])),
        ("invalid_json", gxe.ExpectColumnValuesToBeInSet(column="json", value_set=[True])),
        ("data_type", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["object"])),
        ("data_type", zero("bad_messages")),
        ("missing_messages_list", gxe.ExpectColumnValuesToBeInSet(column="messages_list", value_set=[True])),
        ("message_missing_key", zero("missing_keys")),
        ("message_unrecognized_key", zero("unrecognized_keys")),
        ("unrecognized_role", zero("unrecognized_roles")),
        ("unrecognized_role", gxe.ExpectColumnValuesToBeInSet(column="renders", value_set=[True])),
        ("missing_content", zero("missing_content")),
        ("example_missing_assistant_message", gxe.ExpectColumnValuesToBeBetween(column="assistant", min_value=1)),
        ("last_message_not_assistant", gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"])),
        ("too_many_tokens", gxe.ExpectColumnValuesToBeBetween(column="tokens", max_value=max_seq_length)),
        ("too_many_tokens", gxe.ExpectColumnValuesToBeBetween(column="bytes", max_value=line_cap)),
        ("duplicate_example", gxe.ExpectColumnValuesToBeNull(column="duplicate_of")),
        ("train_validation_overlap", gxe.ExpectColumnValuesToBeNull(column="overlap_line")),
    ]


def _file_expectations(max_bytes: int) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    return [
        ("file_too_large", gxe.ExpectColumnValuesToBeBetween(column="bytes", max_value=max_bytes)),
        ("empty_file", gxe.ExpectColumnValuesToBeBetween(column="examples", min_value=1)),
        (
            "too_few_examples",
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="valid_examples", column_B="required_examples", or_equal=True,
                ignore_row_if="either_value_is_missing",
            ),
        ),
    ]


class ContractSuite:
    """An ephemeral GX context holding both suites; `check_*` validate a DataFrame and return its failures."""

    def __init__(self, max_seq_length: int, line_cap: int, max_bytes: int) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self._source = self.context.data_sources.add_pandas("phitune")
        self._examples = self._definition("chat-examples", _example_expectations(max_seq_length, line_cap))
        self._files = self._definition("chat-files", _file_expectations(max_bytes))

    def _definition(self, name: str, expectations: list[tuple[str, Any]]) -> Any:
        gx = self._gx
        batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for code, expectation in expectations:
            expectation.meta = {"code": code}
            suite.add_expectation(expectation)
        return self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))

    def check_examples(self, frame: pd.DataFrame) -> list[Failure]:
        return self._run(self._examples, frame, ["file", "line"])

    def check_files(self, frame: pd.DataFrame) -> list[Failure]:
        return self._run(self._files, frame, ["file"])

    def _run(self, definition: Any, frame: pd.DataFrame, index: list[str]) -> list[Failure]:
        result = definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index, "return_unexpected_index_query": False},
        )
        failures = []
        for r in result.results:
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"Great Expectations failed on {r.expectation_config.type}: {r.exception_info['exception_message']}")
            if r.success:
                continue
            code = r.expectation_config.meta["code"]
            columns = _kwarg_columns(r.expectation_config.kwargs)
            for row in r.result.get("unexpected_index_list") or []:
                line = row.get("line")
                value = row.get(columns[0]) if len(columns) == 1 else {k: row.get(k) for k in columns}
                failures.append(Failure(code, str(row["file"]), None if line is None else int(line), columns[0], _plain(value)))
        return failures

    def write_docs(self, folder: Path) -> Path:
        """Render Data Docs of the runs so far (suites and results, failing rows included) into `folder`."""
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        if _SITE not in (self.context.config.data_docs_sites or {}):
            self.context.add_data_docs_site(
                site_name=_SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        self.context.build_data_docs(site_names=[_SITE])
        return folder / "index.html"


def _kwarg_columns(kwargs: dict[str, Any]) -> list[str]:
    return [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python (ints stay ints) so values print and serialise cleanly."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
