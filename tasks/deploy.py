"""The deploy stage: serve a registered version blue/green on the configured target, smoke-test it, say how to use it.

One task module for every target (deployment.target):
- local / vllm: a new endpoint process on a fresh port next to the old one (phitune.serving.endpoints.deploy);
  it must report healthy and pass the smoke test before the registry tags move to it and the old
  process stops.
- azure: a serverless endpoint per version (`<endpoint_name>-v<version>`: a serverless endpoint serves
  one model and cannot be switched), so blue/green is a new endpoint beside the old one; the old one is
  deleted once the new one passed its smoke test. A fine-tune that exists only on Azure can be
  evaluated only through an endpoint, so the pipeline deploys it as the challenger first
  (`deploy_challenger`) and, once the gate promotes it, `deploy_champion` smoke-tests that same endpoint.

Every endpoint is recorded on the version it serves from its first minute (model-version tags), so
`phitune endpoints` shows, and `phitune endpoint stop` removes, one a killed run left behind. Keys of
Azure endpoints go to a Prefect Secret block and are read from there; they are never a task parameter
or result, and never reach MLflow or a log.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NONE
from prefect.events import emit_event

from phitune import registry
from phitune.config import PipelineConfig
from phitune.errors import EndpointError
from phitune.registry.tags import BASE_MODEL_TAG
from phitune.serving import endpoints
from phitune.serving.endpoints import Endpoint
from tasks.smoke import smoke_check


def secret_block_name(endpoint_name: str) -> str:
    """Name of the Prefect Secret block holding an Azure endpoint's key (block names: lowercase, digits, dashes)."""
    return "azure-endpoint-key-" + re.sub(r"[^a-z0-9-]+", "-", endpoint_name.lower()).strip("-")


def endpoint_key(config: PipelineConfig, endpoint: Endpoint) -> str | None:
    """The key a client of `endpoint` sends: an Azure endpoint's from its Secret block, others' from deployment.api_key_env."""
    if endpoint.target != "azure":
        from phitune.monitoring import env_api_key

        return env_api_key(config)(endpoint)
    try:
        return str(Secret.load(secret_block_name(endpoint.name)).get())
    except (ValueError, RuntimeError):  # no such block: requests go without a key and meet a 401
        get_run_logger().warning("no Secret block %s for Azure endpoint %s", secret_block_name(endpoint.name), endpoint.name)
        return None


def usage_markdown(result: dict[str, Any], api_key_env: str | None) -> str:
    """How to query and stop the endpoint (shown as an artifact and printed by the pipeline)."""
    url, name = result["base_url"], result["endpoint"]
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    return "\n".join([
        f"## {name}: {result['model_name']} v{result['version']} at {url}",
        "",
        f"Replaced v{result['replaced']}." if result.get("replaced") else "First deployment of this endpoint.",
        "",
        "```bash",
        f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\",
        "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 48, \"temperature\": 0}'",
        "phitune endpoints              # live endpoints and their health",
        f"phitune endpoint stop {name}   # stop it and clear its registry tags",
        "```",
        "",
        f"OpenAI client: `OpenAI(base_url=\"{url}/v1\", api_key=...)`." + (f" Log: `{result['log_file']}`." if result.get("log_file") else ""),
    ])


def _publish(config: PipelineConfig, result: dict[str, Any]) -> None:
    """The usage artifact and a `phitune.endpoint.deployed` event (automations and the UI's event feed see it)."""
    get_run_logger().info("%s serves %s v%s at %s", result["endpoint"], result["model_name"], result["version"], result["base_url"])
    create_markdown_artifact(markdown=usage_markdown(result, config.deployment.api_key_env), key="endpoint",
                             description=f"{result['endpoint']} serves v{result['version']}")
    emit_event(
        event="phitune.endpoint.deployed",
        resource={"prefect.resource.id": f"phitune.endpoint.{result['endpoint']}",
                  "prefect.resource.name": result["endpoint"], "phitune.endpoint.url": result["base_url"],
                  "phitune.model.name": result["model_name"], "phitune.model.version": result["version"]},
        payload={k: v for k, v in result.items() if k != "smoke"},
    )


# ---------------------------------------------------------------- Azure: one serverless endpoint per version

def _azure_endpoint(config: PipelineConfig, name: str, version: str) -> dict[str, Any]:
    """A serverless endpoint for the version (created unless the registry already records one); key to a Secret block."""
    from phitune.azure.client import connect
    from phitune.azure.endpoints import azure_endpoint_name, deploy_serverless

    client = registry.configure(config.registry).client
    endpoint_name = azure_endpoint_name(config.deployment.endpoint_name, version)
    live = endpoints.find_endpoint(client, endpoint_name)
    if live is None:
        mv = client.get_model_version(name, version)
        info = deploy_serverless(connect(config.azure), endpoint_name, mv.source, base_model_id=mv.tags.get(BASE_MODEL_TAG))
        block = secret_block_name(endpoint_name)
        Secret(value=info.key).save(block, overwrite=True)
        get_run_logger().info("serverless endpoint %s serves %s at %s; key in Secret block %r", endpoint_name, mv.source, info.base_url, block)
        live = Endpoint(endpoint_name, name, version, info.base_url, target="azure")
        endpoints.record(client, name, version, live)
    return {"endpoint": live.name, "base_url": live.url, "version": version, "model_name": name, "target": "azure"}


def _delete_azure_endpoint(config: PipelineConfig, endpoint_name: str) -> None:
    """Delete the endpoint on Azure, then its registry tags and its Secret block (a failed delete stays visible)."""
    endpoints.stop(config, endpoint_name)
    try:
        Secret.delete(secret_block_name(endpoint_name))
    except ValueError:  # no such block
        pass
    get_run_logger().info("serverless endpoint %s deleted", endpoint_name)


def _deploy_on_azure(config: PipelineConfig, name: str, version: str) -> dict[str, Any]:
    from phitune.azure.endpoints import is_version_endpoint

    live = _azure_endpoint(config, name, version)
    client = registry.configure(config.registry).client
    key = endpoint_key(config, Endpoint(live["endpoint"], name, version, live["base_url"], target="azure"))
    live["smoke"] = smoke_check(config, api_key=key)(live["base_url"], None)
    replaced = [e for e in endpoints.list_endpoints(client)
                if e.target == "azure" and e.model_name == name and e.name != live["endpoint"]
                and is_version_endpoint(config.deployment.endpoint_name, e.name)]
    for old in replaced:
        get_run_logger().info("%s v%s is champion at %s: deleting the replaced endpoint %s", name, version, live["endpoint"], old.name)
        _delete_azure_endpoint(config, old.name)
    return {**live, "replaced": ", ".join(e.version for e in replaced) or None}


# ---------------------------------------------------------------- the tasks

@task(name="deploy-challenger", cache_policy=NONE)  # registry and cloud state: never answered from a cache
def deploy_challenger(config: PipelineConfig, registered: dict[str, Any]) -> dict[str, Any]:
    """An endpoint for a candidate that can only be queried through one (an Azure serverless fine-tune), for evaluation."""
    if config.deployment.target != "azure":
        raise EndpointError(f"deployment.target={config.deployment.target!r}: only a model served on Azure needs an endpoint to be evaluated")
    return _azure_endpoint(config, registered["name"], registered["version"])


@task(name="deploy-champion", cache_policy=NONE)
def deploy_champion(config: PipelineConfig, registered: dict[str, Any]) -> dict[str, Any]:
    """Blue/green deployment of the registered version; returns {"endpoint", "base_url", "version", "model_name", "replaced", "smoke", ...}.

    "replaced" is the version the endpoint served before, if any.

    A failed start or smoke test leaves the old version serving and fails the task with the reason.
    """
    name, version = registered["name"], str(registered["version"])
    if config.deployment.target == "azure":
        result = _deploy_on_azure(config, name, version)
    else:
        result = endpoints.deploy(config, f"models:/{name}/{version}", check=smoke_check(config))
    _publish(config, result)
    return result


@task(name="remove-endpoint", cache_policy=NONE)
def remove_endpoint(config: PipelineConfig, endpoint: dict[str, Any]) -> None:
    """Stop an endpoint that must not outlive the run (a challenger that lost, or one a failure left behind)."""
    if endpoint.get("target") == "azure":
        _delete_azure_endpoint(config, endpoint["endpoint"])
    else:
        endpoints.stop(config, endpoint["endpoint"])


@task(name="ensure-served", cache_policy=NONE)
def ensure_served(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Reconcile: the champion must be live. A healthy endpoint is kept; a dead or missing one is deployed again."""
    name = config.registry.model_name
    client = registry.configure(config.registry).client
    for live in endpoints.list_endpoints(client):
        if live.model_name == name and live.version == str(version) and (live.target == "azure" or endpoints.is_healthy(live.url)):
            get_run_logger().info("%s v%s is served and healthy at %s", name, version, live.url)
            return {"endpoint": live.name, "base_url": live.url, "version": live.version, "model_name": name,
                    "target": live.target, "replaced": None, "already_serving": True}
    get_run_logger().warning("champion %s v%s is not served (or its endpoint does not answer): deploying it", name, version)
    return deploy_champion.fn(config, {"name": name, "version": str(version)})
