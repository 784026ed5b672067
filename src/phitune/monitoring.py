"""Monitoring: probe every live endpoint, record the results in MLflow, judge the SLO over a rolling window.

One MLflow run per endpoint per monitoring run, in the experiment `monitoring.experiment`, tagged with
the endpoint, the registered model and its version. Each run has the run's metrics (pass_rate,
p50/p95 latency, one `errors_<class>` count per error class) and every probe's latency as the
step-indexed metric `probe_latency_s`, so the window's percentiles are computed from the probes
themselves, not averaged from per-run percentiles.

The SLO is judged per endpoint *and version* over its last `window_runs` runs (fewer while a version is
new), pooling their probes: pass rate below `slo_pass_rate` or p95 latency above `slo_p95_latency_s` is
a breach. One failed probe therefore does not breach; an endpoint that stops answering does, as soon as
its failures outweigh the window. A new version (after a rollback or a redeploy) starts a fresh window.
`newly_breached` is true only on the run that enters the breach, so whoever reacts (the Prefect
automation) is told once, not every five minutes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run

from phitune import registry
from phitune.config import MonitoringConfig, PipelineConfig
from phitune.probes import ProbeReport, Target, load_probe_set, percentile, probe_many
from phitune.serving.endpoints import Endpoint, list_endpoints

ENDPOINT_TAG = "phitune.endpoint"
MODEL_NAME_TAG = "phitune.model_name"
MODEL_VERSION_TAG = "phitune.model_version"
URL_TAG = "phitune.endpoint_url"
PROBE_LATENCY = "probe_latency_s"
BREACHED = "slo_breached"

KeyFor = Callable[[Endpoint], "str | None"]


@dataclass
class SLOStatus:
    """The SLO verdict over the window that ends with this monitoring run."""

    runs: int
    pass_rate: float
    p95_latency_s: float | None
    breached: bool
    newly_breached: bool
    recovered: bool  # this run leaves a breach
    reasons: list[str] = field(default_factory=list)


@dataclass
class EndpointHealth:
    """One endpoint in one monitoring run: what the probes found and the SLO verdict."""

    endpoint: Endpoint
    report: ProbeReport
    slo: SLOStatus
    mlflow_run_id: str

    def row(self) -> dict[str, Any]:
        """A flat record (a table-artifact row, an event payload)."""
        e, r, s = self.endpoint, self.report.summary(), self.slo
        return {
            "endpoint": e.name, "model": e.model_name, "version": e.version, "url": e.url, "target": e.target,
            "probes": r["probes"], "passed": r["passed"], "pass_rate": round(r["pass_rate"], 3),
            "p50_latency_s": _round(r["p50_latency_s"]), "p95_latency_s": _round(r["p95_latency_s"]),
            **{f"errors_{k}": v for k, v in r["errors"].items()},
            "window_runs": s.runs, "window_pass_rate": round(s.pass_rate, 3), "window_p95_latency_s": _round(s.p95_latency_s),
            "slo": "BREACHED" if s.breached else "ok", "reasons": "; ".join(s.reasons), "mlflow_run_id": self.mlflow_run_id,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def env_api_key(config: PipelineConfig) -> KeyFor:
    """Keys of local and vLLM endpoints: the deployment's env var (absent: probes go without, and a 401 is recorded)."""
    name = config.deployment.api_key_env

    def key_for(endpoint: Endpoint) -> str | None:
        return (os.environ.get(name) or None) if name else None

    return key_for


def monitoring_experiment(config: PipelineConfig) -> str:
    """The monitoring experiment's id (created with the registry's artifact root when missing)."""
    return registry.configure(config.registry.model_copy(update={"experiment": config.monitoring.experiment})).experiment_id


def record_run(client: MlflowClient, experiment_id: str, endpoint: Endpoint, report: ProbeReport) -> str:
    """Log one endpoint's probe report as a run of the monitoring experiment; returns the run id."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(report.started_at))
    run = client.create_run(
        experiment_id, start_time=int(report.started_at * 1000), run_name=f"{endpoint.name}-v{endpoint.version}-{stamp}",
        tags={ENDPOINT_TAG: endpoint.name, MODEL_NAME_TAG: endpoint.model_name, MODEL_VERSION_TAG: endpoint.version,
              URL_TAG: endpoint.url, "phitune.endpoint_target": endpoint.target},
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    summary = report.summary()
    values = {"pass_rate": summary["pass_rate"], "probes": summary["probes"], "passed": summary["passed"],
              **{f"errors_{k}": v for k, v in summary["errors"].items()}}
    for key in ("p50_latency_s", "p95_latency_s"):
        if summary[key] is not None:
            values[key] = summary[key]
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    metrics += [Metric(PROBE_LATENCY, lat, now, i) for i, lat in enumerate(report.latencies)]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, {"summary": summary, "probes": [r.to_dict() for r in report.results]}, "probes.json")
    return run_id


def window_runs(client: MlflowClient, experiment_id: str, endpoint: Endpoint, size: int) -> list[Run]:
    """The last `size` monitoring runs of this endpoint serving this version, newest first."""
    filter_string = (f"tags.`{ENDPOINT_TAG}` = '{endpoint.name}' AND tags.`{MODEL_NAME_TAG}` = '{endpoint.model_name}' "
                     f"AND tags.`{MODEL_VERSION_TAG}` = '{endpoint.version}'")
    return client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=size)


def judge(client: MlflowClient, runs: list[Run], cfg: MonitoringConfig) -> SLOStatus:
    """Pool the window's probes; breached when its pass rate or p95 latency misses the SLO."""
    probes = sum(r.data.metrics.get("probes", 0) for r in runs)
    passed = sum(r.data.metrics.get("passed", 0) for r in runs)
    latencies = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, PROBE_LATENCY)]
    pass_rate = passed / probes if probes else 0.0
    p95 = percentile(latencies, 95)
    reasons = []
    if pass_rate < cfg.slo_pass_rate:
        reasons.append(f"pass rate {pass_rate:.0%} < {cfg.slo_pass_rate:.0%} over {len(runs)} run(s)")
    if p95 is not None and p95 > cfg.slo_p95_latency_s:
        reasons.append(f"p95 latency {p95:.2f} s > {cfg.slo_p95_latency_s:g} s over {len(runs)} run(s)")
    breached = bool(reasons)
    was_breached = len(runs) > 1 and runs[1].data.metrics.get(BREACHED, 0.0) > 0
    return SLOStatus(len(runs), pass_rate, p95, breached, breached and not was_breached,
                     was_breached and not breached, reasons)


def check_endpoints(config: PipelineConfig, key_for: KeyFor | None = None) -> list[EndpointHealth]:
    """One monitoring run: probe every live endpoint (concurrently), record each, judge each one's window."""
    cfg = config.monitoring
    client = registry.configure(config.registry).client
    endpoints = list_endpoints(client)
    if not endpoints:
        return []
    probe_set = load_probe_set(cfg.probes_file)
    key_for = key_for or env_api_key(config)
    targets = [Target(e.url, key_for(e), e.model) for e in endpoints]
    reports = asyncio.run(probe_many(probe_set, targets, cfg.timeout_s))
    experiment_id = monitoring_experiment(config)
    results = []
    for endpoint, report in zip(endpoints, reports):
        run_id = record_run(client, experiment_id, endpoint, report)
        slo = judge(client, window_runs(client, experiment_id, endpoint, cfg.window_runs), cfg)
        now = int(time.time() * 1000)
        window = [Metric(BREACHED, float(slo.breached), now, 0), Metric("window_pass_rate", slo.pass_rate, now, 0)]
        if slo.p95_latency_s is not None:
            window.append(Metric("window_p95_latency_s", slo.p95_latency_s, now, 0))
        client.log_batch(run_id, metrics=window)
        client.set_terminated(run_id, "FINISHED")
        results.append(EndpointHealth(endpoint, report, slo, run_id))
    return results


def event_payload(health: EndpointHealth) -> dict[str, Any]:
    """What an SLO event carries: the window's verdict and this run's numbers."""
    return {"slo": asdict(health.slo), "run": health.row(), "failures": health.report.failure_lines()}

