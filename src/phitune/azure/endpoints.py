"""Serving on Azure: serverless endpoints for Azure fine-tunes (deploy, read the key, delete).

A serverless endpoint speaks OpenAI chat at `{scoring_uri}/v1/chat/completions` with
`Authorization: Bearer <key>`. Keys are returned to the caller and never logged or printed here;
the Prefect task stores them in a Secret block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phitune.azure.client import AzureClients
from phitune.azure.errors import AzureError, azure_errors
from phitune.azure.preflight import parse_registry_model_id

FIRST_PARTY_REGISTRIES = {"azureml"}
"""Registries of Microsoft's own models (the Phi family): no marketplace subscription needed."""
MAX_ENDPOINT_NAME = 32


@dataclass
class EndpointInfo:
    """A live serverless endpoint; `key` is a secret (kept out of repr and of `public_dict`)."""

    name: str
    scoring_uri: str
    model_id: str
    key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        """What an OpenAI-style client appends `/v1/chat/completions` to."""
        return self.scoring_uri.rstrip("/")

    def public_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scoring_uri": self.scoring_uri, "base_url": self.base_url, "model_id": self.model_id}


def marketplace_model_id(base_model_id: str) -> str | None:
    """The model id to subscribe to on the Azure Marketplace, or None for Microsoft's own models."""
    try:
        ref = parse_registry_model_id(base_model_id)
    except AzureError:
        return None
    return None if ref.registry in FIRST_PARTY_REGISTRIES else ref.asset_id


def ensure_marketplace_subscription(az: AzureClients, model_id: str) -> str:
    """Subscribe the project to a third-party model (once); return the subscription's name."""
    from azure.ai.ml.entities import MarketplaceSubscription
    from azure.core.exceptions import ResourceNotFoundError

    name = f"{model_id.rsplit('/', 1)[-1].replace('.', '-')}-sub"
    with azure_errors(f"subscribe to {model_id} on the Azure Marketplace"):
        try:
            az.ml.marketplace_subscriptions.get(name)
        except ResourceNotFoundError:
            az.ml.marketplace_subscriptions.begin_create_or_update(MarketplaceSubscription(name=name, model_id=model_id)).result()
    return name


def azure_endpoint_name(base: str, version: str) -> str:
    """`<base>-v<version>`, cut to Azure's 32 characters (letters, digits, '-'; starting with a letter)."""
    suffix = f"-v{version}"
    return base[: MAX_ENDPOINT_NAME - len(suffix)].rstrip("-") + suffix


def is_version_endpoint(base: str, endpoint_name: str) -> bool:
    """Whether `endpoint_name` is `azure_endpoint_name(base, some version)`: an endpoint of this deployment."""
    _, sep, version = endpoint_name.rpartition("-v")
    return bool(sep) and version.isdigit() and azure_endpoint_name(base, version) == endpoint_name


def deploy_serverless(az: AzureClients, endpoint_name: str, model_id: str, *, base_model_id: str | None = None) -> EndpointInfo:
    """Create (or update) a serverless endpoint for `model_id`, wait until it is ready, read its key.

    `base_model_id` is the registry model a fine-tune came from; a third-party base model needs a
    marketplace subscription before its fine-tunes can be deployed.
    """
    from azure.ai.ml.entities import ServerlessEndpoint

    subscribe_to = marketplace_model_id(base_model_id or model_id)
    if subscribe_to:
        ensure_marketplace_subscription(az, subscribe_to)
    with azure_errors(f"deploy {model_id} to serverless endpoint {endpoint_name}"):
        endpoint = az.ml.serverless_endpoints.begin_create_or_update(ServerlessEndpoint(name=endpoint_name, model_id=model_id)).result()
    state = str(endpoint.provisioning_state or "").lower()
    if state != "succeeded":
        raise AzureError(f"serverless endpoint {endpoint_name} ended in provisioning state {endpoint.provisioning_state!r}")
    with azure_errors(f"read the keys of serverless endpoint {endpoint_name}"):
        keys = az.ml.serverless_endpoints.get_keys(endpoint_name)
    return EndpointInfo(endpoint_name, endpoint.scoring_uri, model_id, key=keys.primary_key)


def delete_serverless_endpoint(az: AzureClients, endpoint_name: str) -> bool:
    """Delete a serverless endpoint; False if there was none."""
    from azure.core.exceptions import ResourceNotFoundError

    with azure_errors(f"delete serverless endpoint {endpoint_name}"):
        try:
            az.ml.serverless_endpoints.get(endpoint_name)
        except ResourceNotFoundError:
            return False
        az.ml.serverless_endpoints.begin_delete(endpoint_name).result()
    return True

