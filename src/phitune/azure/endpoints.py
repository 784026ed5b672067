"""Serving on Azure: serverless endpoints for Azure fine-tunes, managed online endpoints for local ones.

A serverless endpoint speaks OpenAI chat at `{scoring_uri}/v1/chat/completions` with
`Authorization: Bearer <key>`. Keys are returned to the caller and never logged or printed here;
the Prefect task stores them in a Secret block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from phitune.azure.client import AzureClients
from phitune.azure.data_assets import DIGEST_CHARS, content_sha256
from phitune.azure.errors import AzureError, ModelInUseError, azure_errors, describe
from phitune.azure.preflight import parse_registry_model_id

FIRST_PARTY_REGISTRIES = {"azureml"}
"""Registries of Microsoft's own models (the Phi family): no marketplace subscription needed."""
MODEL_API = "2024-10-01"


@dataclass
class EndpointInfo:
    """A live endpoint; `key` is a secret (kept out of repr and of `public_dict`)."""

    name: str
    kind: Literal["serverless", "managed_online"]
    scoring_uri: str
    model_id: str
    key: str = field(repr=False)

    @property
    def base_url(self) -> str:
        """What an OpenAI-style client appends `/v1/chat/completions` to (serverless endpoints)."""
        return self.scoring_uri.rstrip("/")

    def public_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "scoring_uri": self.scoring_uri, "base_url": self.base_url, "model_id": self.model_id}


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
    return EndpointInfo(endpoint_name, "serverless", endpoint.scoring_uri, model_id, key=keys.primary_key)


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


def endpoints_using_model(az: AzureClients, model_name: str, version: str) -> list[str]:
    """Serverless endpoints of the workspace that serve this model version."""
    suffix = f"/models/{model_name}/versions/{version}".lower()
    with azure_errors("list serverless endpoints"):
        return [e.name for e in az.ml.serverless_endpoints.list() if str(e.model_id or "").lower().endswith(suffix)]


def delete_model(az: AzureClients, model_name: str, version: str) -> None:
    """Delete a fine-tuned model version from the workspace; refused while an endpoint serves it."""
    from azure.core.exceptions import ResourceExistsError

    users = endpoints_using_model(az, model_name, version)
    if users:
        raise ModelInUseError(
            f"model {model_name}:{version} is still deployed at serverless endpoint(s) {', '.join(users)}: delete the endpoint(s) first"
        )
    try:
        with azure_errors(f"delete model {model_name}:{version}"):
            az.arm.request("DELETE", f"{az.workspace_path}/models/{model_name}/versions/{version}", MODEL_API)
    except AzureError as err:
        if isinstance(err.__cause__, ResourceExistsError):
            raise ModelInUseError(f"Azure refused to delete model {model_name}:{version}: {describe(err.__cause__)}") from err.__cause__
        raise


def deploy_managed_online(
    az: AzureClients,
    endpoint_name: str,
    model_dir: Path,
    model_name: str,
    *,
    deployment_name: str = "blue",
) -> EndpointInfo:
    """Serve a locally fine-tuned MLflow model (a folder with an MLmodel file) on a managed online endpoint.

    The model is registered as an MLflow model asset versioned by its content digest (uploaded
    once); Azure builds the serving image itself (no-code MLflow deployment). The endpoint speaks
    MLflow's scoring protocol at `scoring_uri`, not OpenAI chat.
    """
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import ManagedOnlineDeployment, ManagedOnlineEndpoint, Model
    from azure.core.exceptions import ResourceNotFoundError

    if not (Path(model_dir) / "MLmodel").is_file():
        raise AzureError(f"{model_dir}: not an MLflow model folder (no MLmodel file)")
    version = content_sha256(Path(model_dir))[:DIGEST_CHARS]
    c = az.config
    with azure_errors(f"register {model_dir} as model {model_name}:{version}"):
        try:
            model = az.ml.models.get(model_name, version=version)
        except ResourceNotFoundError:
            model = az.ml.models.create_or_update(
                Model(name=model_name, version=version, path=str(model_dir), type=AssetTypes.MLFLOW_MODEL, tags={"created_by": "phitune"})
            )
    with azure_errors(f"deploy {model_name}:{version} to managed online endpoint {endpoint_name}"):
        endpoint = az.ml.online_endpoints.begin_create_or_update(ManagedOnlineEndpoint(name=endpoint_name, auth_mode="key")).result()
        deployment = ManagedOnlineDeployment(
            name=deployment_name,
            endpoint_name=endpoint_name,
            model=model.id,
            instance_type=c.online_instance_type,
            instance_count=c.online_instance_count,
        )
        az.ml.online_deployments.begin_create_or_update(deployment).result()
        endpoint.traffic = {deployment_name: 100}
        endpoint = az.ml.online_endpoints.begin_create_or_update(endpoint).result()
        keys = az.ml.online_endpoints.get_keys(endpoint_name)
    return EndpointInfo(endpoint_name, "managed_online", endpoint.scoring_uri, model.id, key=keys.primary_key)
