"""The `monitor` flow: probe every live endpoint recorded in the registry, record, publish, alert.

Scheduled by prefect.yaml (monitor/every-5-minutes). A dead or hanging endpoint is recorded (connection
or timeout errors) and never stops the others; an SLO breach over the rolling window emits
`phitune.endpoint.slo-breached`, which the automation of deployments/automations.py answers with a
rollback (flows/rollback.py) or a retraining run.

Run once by hand:  python flows/monitor.py [--config CONFIG] [key.sub=value ...]
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from flows.report import run_cli
from phitune.config import PipelineConfig
from tasks.monitor import check_endpoints, publish_health


@flow(name="monitor", log_prints=True)
def monitor(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Probe every live endpoint; record pass rate, latency and errors; alert on an SLO breach."""
    results = check_endpoints(config)
    events = publish_health(config, results)
    return {"endpoints": [r["row"] for r in results], "events": events}


def print_health(config: PipelineConfig, result: dict[str, Any]) -> None:
    for row in result["endpoints"]:
        print(f"{row['endpoint']} v{row['version']} {row['url']}: {row['passed']}/{row['probes']} passed, "
              f"p95 {row['p95_latency_s']} s, SLO {row['slo']} {row['reasons']}")
    if not result["endpoints"]:
        print("no live endpoints in the registry")


if __name__ == "__main__":
    sys.exit(run_cli(monitor, print_health, "Run one monitoring pass over every live endpoint."))
