"""The automation that answers an SLO breach: roll back and redeploy, or retrain (monitoring.on_breach).

It reacts to `phitune.endpoint.slo-breached` (emitted by the monitor flow, once per breach) on any
`phitune.endpoint.*` resource and runs a deployment:
  - on_breach=rollback: `rollback/on-breach` (flows/rollback.py) with the endpoint, model and breached
    version taken from the event's resource labels;
  - on_breach=retrain: `finetune/on-demand` with its default parameters;
  - on_breach=none: the automation is removed.
Idempotent: the automation is found by name and updated; duplicates of that name are removed.
Needs a running Prefect server with the deployments created (`prefect deploy --all`);
`python -m deployments.provision` calls it after deploying.

    python -m deployments.automations [--config CONFIG] [monitoring.on_breach=retrain]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from phitune.config import PipelineConfig, load_config
from tasks.monitor import BREACH_EVENT

AUTOMATION_NAME = "phitune-slo-breach"
DEPLOYMENTS = {"rollback": "rollback/on-breach", "retrain": "finetune/on-demand"}
FROM_EVENT = {  # Jinja in RunDeployment parameters is rendered by the server from the triggering event
    "endpoint": "{{ event.resource['phitune.endpoint.name'] }}",
    "model_name": "{{ event.resource['phitune.model.name'] }}",
    "breached_version": "{{ event.resource['phitune.model.version'] }}",
}


def build_automation(on_breach: str, deployment_id: object) -> AutomationCore:
    return AutomationCore(
        name=AUTOMATION_NAME,
        description=f"On an endpoint SLO breach: {on_breach} (deployment {DEPLOYMENTS[on_breach]}).",
        trigger=EventTrigger(
            expect={BREACH_EVENT}, match={"prefect.resource.id": "phitune.endpoint.*"}, for_each={"prefect.resource.id"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id,
                               parameters=dict(FROM_EVENT) if on_breach == "rollback" else None)],
    )


async def ensure_automation(on_breach: str) -> list[str]:
    """Create or update the automation (or remove it for 'none'); returns the names now in place."""
    async with get_client() as client:
        existing = await client.read_automations_by_name(AUTOMATION_NAME)
        if on_breach == "none":
            for old in existing:
                await client.delete_automation(old.id)
            return []
        try:
            deployment = await client.read_deployment_by_name(DEPLOYMENTS[on_breach])
        except ObjectNotFound:
            raise SystemExit(f"deployment {DEPLOYMENTS[on_breach]!r} not found: create it first (prefect deploy --all)") from None
        wanted = build_automation(on_breach, deployment.id)
        for extra in existing[1:]:
            await client.delete_automation(extra.id)
        if existing:
            await client.update_automation(existing[0].id, wanted)
        else:
            await client.create_automation(wanted)
    return [f"{AUTOMATION_NAME} ({BREACH_EVENT} -> {DEPLOYMENTS[on_breach]})"]


def create_automations(config: PipelineConfig | None = None) -> list[str]:
    """What deployments.provision calls: the automations of this config (default config when none)."""
    return asyncio.run(ensure_automation((config or PipelineConfig()).monitoring.on_breach))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="pipeline config YAML (monitoring.on_breach picks the action)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    names = create_automations(load_config(args.config, args.overrides))
    print("automations: " + (", ".join(names) or "none (monitoring.on_breach=none)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
