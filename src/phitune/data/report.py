"""The validation report: issues by file and line, statistics, the `--json` shape and a readable table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ERROR_CODES = (
    "invalid_encoding", "invalid_json", "data_type", "missing_messages_list", "message_missing_key",
    "message_unrecognized_key", "unrecognized_role", "missing_content", "example_missing_assistant_message",
    "last_message_not_assistant", "too_many_tokens", "duplicate_example", "empty_file", "too_few_examples",
    "train_validation_overlap", "file_too_large",
)
"""The contract's error codes (OpenAI's data-checker taxonomy plus file-level checks)."""

TABLE_ROWS = 50


@dataclass(frozen=True)
class Issue:
    """One problem: the file, the 1-based line (None for the whole file), a code, and what is wrong."""

    file: str
    line: int | None
    code: str
    message: str


@dataclass
class ValidationReport:
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """`{"valid", "errors": [{"file", "line", "code", "message"}], "warnings": [...], "stats": {...}}`."""
        return {
            "valid": self.valid,
            "errors": [asdict(i) for i in self.errors],
            "warnings": [asdict(i) for i in self.warnings],
            "stats": self.stats,
        }

    def summary(self) -> str:
        """One line: verdict, counts, and the most frequent error codes."""
        verdict = "VALID" if self.valid else "INVALID"
        examples = self.stats.get("examples", 0)
        text = f"{verdict}: {plural(examples, 'example')}, {plural(len(self.errors), 'error')}, {plural(len(self.warnings), 'warning')}"
        if self.errors:
            text += " (" + ", ".join(f"{code} x{n}" for code, n in self.error_counts().items()) + ")"
        return text

    def error_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for issue in self.errors:
            counts[issue.code] = counts.get(issue.code, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def render_table(self, limit: int = TABLE_ROWS) -> str:
        """Issues (first `limit` of each kind) and per-file statistics as aligned plain text."""
        out = [f"phitune validate: {self.summary()}"]
        for title, issues in (("errors", self.errors), ("warnings", self.warnings)):
            if not issues:
                continue
            rows = [(i.file, "-" if i.line is None else str(i.line), i.code, i.message) for i in issues[:limit]]
            out += ["", title.upper(), *_table(("FILE", "LINE", "CODE", "MESSAGE"), rows, right={1})]
            if len(issues) > limit:
                out.append(f"... and {len(issues) - limit:,} more {title} (--json lists all)")
        files = self.stats.get("files", {})
        if files:
            rows = []
            for f in files.values():
                pct = f.get("tokens_per_example") or {}
                roles = f.get("messages_per_role") or {}
                rows.append(
                    (f["path"], _n(f.get("examples")), _n(f.get("valid_examples")), _n(f.get("tokens")),
                     _n(pct.get("p50")), _n(pct.get("p95")), _n(pct.get("max")),
                     *(_n(roles.get(r)) for r in ("system", "user", "assistant")))
                )
            header = ("FILE", "EXAMPLES", "VALID", "TOKENS", "P50", "P95", "MAX", "SYSTEM", "USER", "ASSISTANT")
            out += ["", "STATISTICS (tokens per example with the chat template; messages per role)",
                    *_table(header, rows, right=set(range(1, len(header))))]
            out.append(
                f"tokenizer: {self.stats.get('tokenizer')}; training.max_seq_length: {self.stats.get('max_seq_length')}; "
                f"{self.stats.get('seconds', 0):.1f} s"
            )
        return "\n".join(out)


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _n(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    # The last column (messages) is left unpadded so long messages do not widen every row.
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(v).rjust(w) if c in right else str(v).ljust(w) for c, (v, w) in enumerate(zip(r, widths))]
        cells[-1] = cells[-1].rstrip() if len(header) - 1 not in right else cells[-1]
        lines.append("  ".join(cells).rstrip())
    return lines
