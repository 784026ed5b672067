"""Connecting to Azure: one MLClient for the workspace and a small ARM client, sharing credential and transport.

Credentials come from azure-identity's DefaultAzureCredential (environment, managed identity,
`az login`, ...), never from config files. Tests inject a fake credential and an HTTP transport so
the SDK's real HTTP layer runs against a fake Azure; `override_connection` lets a test (or a
notebook) do that for code it does not call directly, such as a Prefect task or flow hook.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phitune.config import AzureConfig
from phitune.errors import ConfigError

if TYPE_CHECKING:
    from azure.ai.ml import MLClient
    from azure.core.credentials import TokenCredential
    from azure.core.pipeline.transport import HttpTransport

ARM_ENDPOINT = "https://management.azure.com"
ARM_SCOPE = "https://management.azure.com/.default"

_override: dict[str, Any] = {}


@contextmanager
def override_connection(*, credential: TokenCredential, transport: HttpTransport | None = None) -> Iterator[None]:
    """Make every `connect()` in this process use `credential` and `transport` until the block ends."""
    previous = dict(_override)
    _override.update(credential=credential, transport=transport)
    try:
        yield
    finally:
        _override.clear()
        _override.update(previous)


class ArmClient:
    """Plain ARM requests that azure-ai-ml has no operation for: resource providers, permissions, model deletion.

    Built on azure-mgmt-core's ARM pipeline (bearer token, ARM challenge handling, the standard retry
    policy for 408/429/5xx) over the same credential and transport as the MLClient.
    """

    def __init__(self, credential: TokenCredential, transport: HttpTransport | None = None) -> None:
        from azure.core.pipeline.policies import HeadersPolicy, RetryPolicy, UserAgentPolicy
        from azure.mgmt.core import ARMPipelineClient
        from azure.mgmt.core.policies import ARMChallengeAuthenticationPolicy, ARMHttpLoggingPolicy

        policies = [
            HeadersPolicy(),
            UserAgentPolicy(sdk_moniker="phitune"),
            RetryPolicy(),
            ARMChallengeAuthenticationPolicy(credential, ARM_SCOPE),
            ARMHttpLoggingPolicy(),
        ]
        self._client = ARMPipelineClient(base_url=ARM_ENDPOINT, policies=policies, **_transport_kwargs(transport))

    def request(self, method: str, path: str, api_version: str) -> Any:
        """Send one ARM request; return the JSON body (None when empty); raise azure-core's typed errors."""
        from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceExistsError, ResourceNotFoundError, map_error
        from azure.core.rest import HttpRequest

        response = self._client.send_request(HttpRequest(method, ARM_ENDPOINT + path, params={"api-version": api_version}))
        if response.status_code >= 400:
            map_error(response.status_code, response, {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError})
            raise HttpResponseError(response=response)
        return response.json() if response.content else None


@dataclass
class AzureClients:
    """What every Azure operation of phitune needs; build it with `connect`."""

    config: AzureConfig
    credential: TokenCredential
    ml: MLClient
    arm: ArmClient
    transport: HttpTransport | None = None

    @property
    def workspace_path(self) -> str:
        return workspace_path(self.config)

    def registry(self, registry_name: str) -> MLClient:
        """An MLClient on an Azure ML registry (e.g. `azureml`, where the base models live)."""
        from azure.ai.ml import MLClient

        return MLClient(self.credential, registry_name=registry_name, show_progress=False, **_transport_kwargs(self.transport))


def workspace_path(cfg: AzureConfig) -> str:
    """The workspace's ARM resource id (a path under management.azure.com)."""
    return (
        f"/subscriptions/{cfg.subscription_id}/resourceGroups/{cfg.resource_group}"
        f"/providers/Microsoft.MachineLearningServices/workspaces/{cfg.workspace}"
    )


def _transport_kwargs(transport: HttpTransport | None) -> dict[str, Any]:
    return {"transport": transport} if transport is not None else {}


def connect(cfg: AzureConfig, *, credential: TokenCredential | None = None, transport: HttpTransport | None = None) -> AzureClients:
    """Clients for the configured workspace. Nothing is sent to Azure until an operation runs."""
    missing = [f"azure.{name}" for name in ("subscription_id", "resource_group", "workspace") if not getattr(cfg, name)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set: the Azure backend needs the workspace's subscription, resource group and name")
    if credential is None:
        credential = _override.get("credential")
        transport = transport or _override.get("transport")
    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    from azure.ai.ml import MLClient

    # phitune relies on azure-ai-ml's experimental fine-tuning and serverless APIs on purpose; their
    # "This is an experimental method" warning on every first use is noise in the CLI and task logs.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    ml = MLClient(credential, cfg.subscription_id, cfg.resource_group, cfg.workspace, show_progress=False, **_transport_kwargs(transport))
    return AzureClients(config=cfg, credential=credential, ml=ml, arm=ArmClient(credential, transport), transport=transport)
