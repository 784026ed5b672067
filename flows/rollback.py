"""The `rollback` flow: what the SLO-breach automation runs (deployments/automations.py).

It moves the champion alias back to the previous version and redeploys the endpoint, blue/green, so the
breached version keeps serving until the previous one has passed its smoke test. It is safe to run
twice for one breach: when the endpoint no longer serves the breached version, nothing is done.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from phitune import registry
from phitune.config import PipelineConfig
from phitune.errors import EndpointError
from phitune.serving.endpoints import find_endpoint
from tasks.deploy import deploy_champion


@task(name="rollback-champion")
def rollback_champion(config: PipelineConfig, model_name: str) -> str:
    """Champion alias -> the previous champion; returns that version."""
    return registry.rollback_champion(model_name, registry.configure(config.registry).client)


@flow(name="rollback")
def rollback(
    config: PipelineConfig = PipelineConfig(),
    endpoint: str | None = None,
    model_name: str | None = None,
    breached_version: str | None = None,
) -> dict[str, Any]:
    """Roll the champion of `model_name` back and redeploy `endpoint` with it (defaults: from the config)."""
    logger = get_run_logger()
    endpoint = endpoint or config.deployment.endpoint_name
    name = model_name or config.registry.model_name
    client = registry.configure(config.registry).client
    live = find_endpoint(client, endpoint)
    if live is None:
        raise EndpointError(f"rollback: no live endpoint named {endpoint!r} in the registry")
    if breached_version and live.version != str(breached_version):
        logger.info("%s already serves v%s, not the breached v%s: nothing to do", endpoint, live.version, breached_version)
        return {"endpoint": endpoint, "version": live.version, "rolled_back": False}
    champion = registry.current_champion(client, name)
    rolled_back = champion is not None and str(champion.version) == live.version
    if rolled_back:
        version = rollback_champion(config, name)
        logger.info("%s: champion rolled back from v%s to v%s", name, live.version, version)
    deployment = config.deployment.model_copy(update={"endpoint_name": endpoint})
    result = deploy_champion(config.model_copy(update={"deployment": deployment}), f"models:/{name}@champion")
    return {**result, "rolled_back": rolled_back}
