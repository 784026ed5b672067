"""Monitoring tasks: probe every live endpoint and record it (phitune.monitoring), then publish and alert.

Publishing is what only orchestration can do: a table artifact with one row per endpoint, and Prefect
events an automation reacts to (deployments/automations.py): `phitune.endpoint.slo-breached` on the
run that enters a breach of the rolling-window SLO, `phitune.endpoint.slo-recovered` on the run that
leaves it. The resource of both is `phitune.endpoint.<name>`, labelled with the registered model and
the version it served.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from phitune import monitoring
from phitune.config import PipelineConfig
from tasks.deploy import endpoint_key

BREACH_EVENT = "phitune.endpoint.slo-breached"
RECOVERED_EVENT = "phitune.endpoint.slo-recovered"


@task(name="check-endpoints")
def check_endpoints(config: PipelineConfig) -> list[dict[str, Any]]:
    """Probe, record to MLflow and judge every live endpoint; one dict per endpoint ({"row", "slo", "event"})."""
    results = []
    for health in monitoring.check_endpoints(config, key_for=lambda endpoint: endpoint_key(config, endpoint)):
        results.append({"row": health.row(), "slo": asdict(health.slo), "event": monitoring.event_payload(health)})
    return results


def _resource(row: dict[str, Any]) -> dict[str, str]:
    return {"prefect.resource.id": f"phitune.endpoint.{row['endpoint']}", "prefect.resource.name": row["endpoint"],
            "phitune.endpoint.name": row["endpoint"], "phitune.endpoint.url": row["url"],
            "phitune.model.name": row["model"], "phitune.model.version": str(row["version"])}


@task(name="publish-health")
def publish_health(config: PipelineConfig, results: list[dict[str, Any]]) -> list[str]:
    """Table artifact of this run; an event per endpoint entering or leaving an SLO breach. Returns the events sent."""
    logger = get_run_logger()
    rows = [r["row"] for r in results]
    create_table_artifact(
        table=rows or [{"endpoint": "(none)", "slo": "no live endpoints in the registry"}], key="endpoint-health",
        description=f"{len(rows)} live endpoint(s); SLO: pass rate >= {config.monitoring.slo_pass_rate:.0%}, p95 <= "
                    f"{config.monitoring.slo_p95_latency_s:g} s over the last {config.monitoring.window_runs} run(s)",
    )
    sent = []
    for result in results:
        row, slo = result["row"], result["slo"]
        logger.info("%s v%s: pass rate %.0f%%, p95 %s s, window %s %s", row["endpoint"], row["version"],
                    100 * row["pass_rate"], row["p95_latency_s"], row["slo"], row["reasons"])
        event = BREACH_EVENT if slo["newly_breached"] else RECOVERED_EVENT if slo["recovered"] else None
        if event:
            emit_event(event=event, resource=_resource(row), payload=result["event"])
            sent.append(f"{event}:{row['endpoint']}")
            logger.warning("%s: %s (%s)", row["endpoint"], event, row["reasons"] or "back within the SLO")
    return sent
