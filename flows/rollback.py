"""The `rollback` flow: what the SLO-breach automation runs (deployments/automations.py).

It moves the champion alias back to the previous version and redeploys the endpoint, blue/green, so the
breached version keeps serving until the previous one has passed its smoke test. It is safe to run
twice for one breach: when the endpoint no longer serves the breached version, nothing is done.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from phitune.config import PipelineConfig
from tasks.deploy import deploy_champion
from tasks.register import rollback_champion


@flow(name="rollback")
def rollback(
    config: PipelineConfig = PipelineConfig(),
    endpoint: str | None = None,
    model_name: str | None = None,
    breached_version: str | None = None,
) -> dict[str, Any]:
    """Roll the champion of `model_name` back and redeploy `endpoint` with it (defaults: from the config)."""
    endpoint = endpoint or config.deployment.endpoint_name
    name = model_name or config.registry.model_name
    decision = rollback_champion(config, endpoint, name, breached_version)
    if not decision["redeploy"]:
        return decision
    config = config.model_copy(update={"deployment": config.deployment.model_copy(update={"endpoint_name": endpoint})})
    return {**deploy_champion(config, {"name": name, "version": decision["version"]}), "rolled_back": decision["rolled_back"]}
