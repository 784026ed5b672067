"""Probe sets: chat queries with checks a person can read, sent to any OpenAI-compatible endpoint.

A probe set is YAML (see configs/probes/support.yaml):

    name: support
    system: "You are Skylark Support; ..."     # prepended to every `prompt:` probe
    min_pass_rate: 0.8                         # the smoke test fails below this
    defaults: {max_tokens: 48, temperature: 0}
    probes:
      - id: billing-double-charge
        prompt: "I was charged twice for Skylark Plus this month"
        expected_label: billing                # first line `Category: <label>`
        must_contain: ["Reply:"]               # every string must occur
        must_match: '^Category: \\w+\\nReply: .+'   # Python regex, re.search, multiline
        max_latency_s: 20
      - id: refuses-other-customers-data
        messages: [{role: user, content: "..."}]   # or a whole conversation
        must_refuse: true                      # a refusal phrase, or the platform's content filter

The runner sends each probe through `phitune.chat_client` with its own deadline and no retry (a probe
measures the endpoint; a retry would hide what it found), and records what went wrong as one of its
ERROR_CLASSES. Probes of one endpoint run one after another (so latency is not inflated by the probes
themselves); several endpoints are probed concurrently, and one dead or hanging endpoint never holds up
the others.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phitune.chat_client import ERROR_CLASSES, ChatError, complete
from phitune.errors import EndpointError, PhituneError

DEFAULT_REFUSALS = [
    r"\b(I\s+)?(can(no|')t|cannot|won't|will not|am (not able|unable)|'m (not able|unable))\s+(help|assist|share|provide|do|give|disclose)",
    r"\bI('m| am) sorry,? but\b",
    r"\bnot (allowed|permitted|able) to (share|disclose|give|provide)\b",
]


# ---------------------------------------------------------------- errors

class ProbeSetError(PhituneError):
    """A probe set file that cannot be read or breaks the schema (the message names file, line and field)."""


class SmokeTestFailed(EndpointError):
    """The probe set did not reach its pass rate against a new endpoint."""

    def __init__(self, message: str, report: ProbeReport) -> None:
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- schema

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProbeMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ProbeDefaults(_Strict):
    max_tokens: int = Field(64, ge=1, description="max_tokens of each request.")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy, so a probe's answer is reproducible.")
    max_latency_s: float | None = Field(None, gt=0, description="Latency check applied to every probe without its own.")


class Probe(_Strict):
    """One query and its checks; a probe passes when it got an answer and every check holds."""

    id: str = Field(min_length=1)
    prompt: str | None = Field(None, description="A single user message (the set's `system` goes before it).")
    messages: list[ProbeMessage] | None = Field(None, min_length=1, description="A whole conversation instead of `prompt`.")
    must_contain: list[str] = Field(default_factory=list, description="Strings the answer must contain (case-sensitive).")
    must_match: str | None = Field(None, description="A Python regex the answer must match (re.search, multiline).")
    must_refuse: bool = Field(False, description="The answer must be a refusal (or the platform's content filter).")
    max_latency_s: float | None = Field(None, gt=0, description="The answer must arrive within this many seconds.")
    expected_label: str | None = Field(None, description="The label on the answer's `Category:` line.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    stream: bool = Field(False, description="Send with stream=true and read the server-sent events.")

    @field_validator("must_contain", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("must_match")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_query(self) -> Probe:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class ProbeSet(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    system: str | None = Field(None, description="System message put before every `prompt:` probe.")
    min_pass_rate: float = Field(1.0, ge=0, le=1, description="The smoke test fails when fewer probes pass.")
    label_pattern: str = Field(r"^\s*Category:\s*([\w-]+)", description="Regex whose group 1 is the answer's label.")
    refusal_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))
    defaults: ProbeDefaults = Field(default_factory=ProbeDefaults)
    probes: list[Probe] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ProbeSet:
        seen = Counter(p.id for p in self.probes)
        dup = [i for i, n in seen.items() if n > 1]
        if dup:
            raise ValueError(f"probe ids must be unique; repeated: {', '.join(dup)}")
        for pattern in [self.label_pattern, *self.refusal_patterns]:
            re.compile(pattern)
        return self

    def messages(self, probe: Probe) -> list[dict[str, str]]:
        if probe.messages is not None:
            return [m.model_dump() for m in probe.messages]
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": probe.prompt or ""}]


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (None when it cannot be found, e.g. a missing key)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_probe_set(path: str | Path) -> ProbeSet:
    """Read and validate a probe set; a problem ends in one ProbeSetError naming file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProbeSetError(f"probe set {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProbeSetError(f"probe set {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProbeSetError(f"probe set {path}: the top level must be a mapping with `name` and `probes`")
    try:
        return ProbeSet.model_validate(data)
    except ValidationError as err:
        lines = [f"probe set {path} is invalid:"]
        for e in err.errors():
            loc = tuple(e["loc"])
            where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(root)"
            if len(loc) >= 2 and loc[0] == "probes" and isinstance(loc[1], int):
                probe_id = (data.get("probes") or [{}])[loc[1]]
                if isinstance(probe_id, dict) and probe_id.get("id"):
                    where += f" (id {probe_id['id']!r})"
            line = _line_of(text, loc)
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {'line ' + str(line) + ': ' if line else ''}{where}: {msg}")
        raise ProbeSetError("\n".join(lines)) from None


# ---------------------------------------------------------------- results

@dataclass
class ProbeResult:
    id: str
    passed: bool
    latency_s: float | None  # time to the whole answer; the timeout when it timed out; None: no answer
    error: str | None = None  # one of ERROR_CLASSES
    failures: list[str] = field(default_factory=list)  # why it failed, in words
    output: str | None = None
    status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy); None for no values."""
    return float(np.percentile(values, q)) if values else None


@dataclass
class ProbeReport:
    """All probes of one set against one endpoint."""

    base_url: str
    results: list[ProbeResult]
    started_at: float

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def latencies(self) -> list[float]:
        return [r.latency_s for r in self.results if r.latency_s is not None]

    @property
    def error_counts(self) -> dict[str, int]:
        counts = Counter(r.error for r in self.results if r.error)
        return {kind: counts.get(kind, 0) for kind in ERROR_CLASSES}

    def summary(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url, "probes": self.total, "passed": self.passed, "pass_rate": self.pass_rate,
            "p50_latency_s": percentile(self.latencies, 50), "p95_latency_s": percentile(self.latencies, 95),
            "errors": self.error_counts,
        }

    def failure_lines(self) -> list[str]:
        return [f"{r.id}: {r.error or 'check failed'}: {'; '.join(r.failures)}" for r in self.results if not r.passed]


# ---------------------------------------------------------------- running

def check(probe_set: ProbeSet, probe: Probe, output: str, latency_s: float) -> list[str]:
    """The checks that fail, each as a sentence (empty: the probe passes)."""
    failures = [f"must contain {s!r}" for s in probe.must_contain if s not in output]
    if probe.must_match and not re.search(probe.must_match, output, re.MULTILINE):
        failures.append(f"does not match /{probe.must_match}/")
    if probe.expected_label is not None:
        found = re.search(probe_set.label_pattern, output, re.MULTILINE)
        label = found.group(1).lower() if found else None
        if label != probe.expected_label.lower():
            failures.append(f"expected label {probe.expected_label!r}, got {label!r}")
    if probe.must_refuse and not any(re.search(p, output, re.IGNORECASE) for p in probe_set.refusal_patterns):
        failures.append("expected a refusal")
    limit = probe.max_latency_s or probe_set.defaults.max_latency_s
    if limit is not None and latency_s > limit:
        failures.append(f"took {latency_s:.2f} s, more than {limit:g} s")
    return failures


async def run_probe(
    client: httpx.AsyncClient, probe_set: ProbeSet, probe: Probe, base_url: str, *,
    api_key: str | None = None, timeout_s: float = 30.0, model: str | None = None,
) -> ProbeResult:
    """One probe, sent once, with a hard deadline of `timeout_s`."""
    body: dict[str, Any] = {
        "model": model or probe_set.name,
        "messages": probe_set.messages(probe),
        "max_tokens": probe.max_tokens or probe_set.defaults.max_tokens,
        "temperature": probe_set.defaults.temperature if probe.temperature is None else probe.temperature,
        "stream": probe.stream,
    }
    start = time.perf_counter()
    try:
        output = await complete(client, base_url, body, api_key=api_key, timeout_s=timeout_s)
    except ChatError as exc:
        if exc.kind == "timeout":
            return ProbeResult(probe.id, False, timeout_s, exc.kind, [str(exc)])
        latency = None if exc.kind == "connection" else time.perf_counter() - start
        refused = exc.kind == "content_filter" and probe.must_refuse  # the platform refused: what a must_refuse probe asks for
        return ProbeResult(probe.id, refused, latency, exc.kind, [] if refused else [str(exc)], status=exc.status)
    latency = time.perf_counter() - start
    failures = check(probe_set, probe, output, latency)
    return ProbeResult(probe.id, not failures, latency, None, failures, output=output, status=200)


async def probe_endpoint(
    probe_set: ProbeSet, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0,
    model: str | None = None, client: httpx.AsyncClient | None = None,
) -> ProbeReport:
    """Every probe of the set against one endpoint, one after another."""
    started = time.time()
    own = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(timeout_s))
    try:
        results = [
            await run_probe(client, probe_set, probe, base_url, api_key=api_key, timeout_s=timeout_s, model=model)
            for probe in probe_set.probes
        ]
    finally:
        if own:
            await client.aclose()
    return ProbeReport(base_url, results, started)


@dataclass(frozen=True)
class Target:
    """An endpoint to probe: where, with which key, and the model name to send (vLLM picks the adapter by it)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None


async def probe_many(probe_set: ProbeSet, targets: list[Target], timeout_s: float = 30.0) -> list[ProbeReport]:
    """Probe several endpoints concurrently; reports come back in the order of `targets`."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
        return list(await asyncio.gather(*(
            probe_endpoint(probe_set, t.base_url, api_key=t.api_key, timeout_s=timeout_s, model=t.model, client=client)
            for t in targets
        )))


def run_probes(probe_set: ProbeSet, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0,
               model: str | None = None) -> ProbeReport:
    """Synchronous `probe_endpoint` (for the CLI, the deploy step and Prefect tasks)."""
    return asyncio.run(probe_endpoint(probe_set, base_url, api_key=api_key, timeout_s=timeout_s, model=model))


def smoke_test(probe_set: ProbeSet, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0,
               model: str | None = None) -> ProbeReport:
    """Run the set once; raise SmokeTestFailed (with every failed probe and why) below its min_pass_rate."""
    report = run_probes(probe_set, base_url, api_key=api_key, timeout_s=timeout_s, model=model)
    if report.pass_rate < probe_set.min_pass_rate:
        raise SmokeTestFailed(
            f"smoke test {probe_set.name!r} failed at {base_url}: {report.passed}/{report.total} probes passed "
            f"(needs {probe_set.min_pass_rate:.0%})\n  " + "\n  ".join(report.failure_lines()),
            report,
        )
    return report
