"""The smoke test: the deployment's probe set, once, against a live endpoint, published as a table artifact.

The probes' results become a table artifact whether they pass or not (a failed deployment is exactly
when someone reads it); below the set's min_pass_rate the check raises SmokeTestFailed with every
failed probe and why.
"""

from __future__ import annotations

from prefect.artifacts import create_table_artifact

from phitune.config import PipelineConfig
from phitune.probes import ProbeReport
from phitune.serving.endpoints import SmokeCheck, probe_smoke_check


def publish(report: ProbeReport, key: str = "smoke-test") -> None:
    """One row per probe: passed, latency, error class, why it failed, the start of the answer."""
    rows = [
        {"probe": r.id, "passed": r.passed, "latency_s": None if r.latency_s is None else round(r.latency_s, 3),
         "error": r.error or "", "failures": "; ".join(r.failures), "output": (r.output or "")[:120]}
        for r in report.results
    ]
    create_table_artifact(table=rows, key=key,
                          description=f"smoke test: {report.passed}/{report.total} probes passed at {report.base_url}")


def smoke_check(config: PipelineConfig, api_key: str | None = None) -> SmokeCheck:
    """The configured probe set as a blue/green check, publishing its table artifact passed or failed.

    `api_key` defaults to the deployment's key (deployment.api_key_env); an Azure endpoint's comes from its Secret block.
    """
    return probe_smoke_check(config, on_report=publish, api_key=api_key)
