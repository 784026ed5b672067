"""Deploy the champion as a Prefect task: blue/green through phitune.serving.endpoints, then say how to use it.

The endpoint process outlives the flow run (its own session, a log file under deployment.log_dir);
the registry records where it serves. The task adds what only orchestration knows: the smoke test's
table artifact, a markdown artifact with how to query and stop the endpoint, and a
`phitune.endpoint.deployed` event.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from phitune.config import PipelineConfig
from phitune.errors import EndpointError
from phitune.serving import endpoints
from tasks.smoke import smoke_check


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
        "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"My Wi-Fi keeps dropping\"}], \"max_tokens\": 48, \"temperature\": 0}'",
        "phitune endpoints              # live endpoints and their health",
        f"phitune endpoint stop {name}   # stop it and clear its registry tags",
        "```",
        "",
        f"OpenAI client: `OpenAI(base_url=\"{url}/v1\", api_key=...)`. Log: `{result['log_file']}`.",
    ])


@task(name="deploy-champion")
def deploy_champion(config: PipelineConfig, model_uri: str) -> dict[str, Any]:
    """Blue/green deployment of `model_uri`; returns {"endpoint", "base_url", "version", "pid", ...}.

    A failed start or smoke test stops the new process, leaves the old version serving and fails the
    task with the reason.
    """
    target = config.deployment.target
    if target not in ("local", "vllm"):
        raise EndpointError(f"deployment.target={target!r}: deploy_champion starts local and vllm endpoints; "
                            "Azure endpoints are deployed by tasks.azure.azure_deploy")
    result = endpoints.deploy(config, model_uri, check=smoke_check(config))
    get_run_logger().info("%s serves %s v%s at %s (pid %s)", result["endpoint"], result["model_name"],
                          result["version"], result["base_url"], result["pid"])
    create_markdown_artifact(markdown=usage_markdown(result, config.deployment.api_key_env), key="endpoint",
                             description=f"{result['endpoint']} serves v{result['version']}")
    emit_event(
        event="phitune.endpoint.deployed",
        resource={"prefect.resource.id": f"phitune.endpoint.{result['endpoint']}",
                  "prefect.resource.name": result["endpoint"], "phitune.endpoint.url": result["base_url"],
                  "phitune.model.name": result["model_name"], "phitune.model.version": result["version"]},
        payload={k: v for k, v in result.items() if k != "smoke"},
    )
    return result
