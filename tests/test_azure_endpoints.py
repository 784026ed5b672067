"""Serverless endpoints (deploy, marketplace subscription, delete) against the fake Azure."""

from __future__ import annotations

import pytest
from azure_fake import FakeAzure

from phitune.azure.client import AzureClients, connect
from phitune.azure.endpoints import delete_serverless_endpoint, deploy_serverless, marketplace_model_id
from phitune.azure.errors import AzureError
from phitune.config import AzureConfig

PHI3 = "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"


@pytest.fixture
def fake() -> FakeAzure:
    return FakeAzure()


@pytest.fixture
def az(fake: FakeAzure) -> AzureClients:
    cfg = AzureConfig(subscription_id=fake.subscription_id, resource_group=fake.resource_group, workspace=fake.workspace)
    return connect(cfg, credential=fake.credential, transport=fake.transport())


def fine_tuned_model(fake: FakeAzure, name: str = "phitune-phi-3-mini-4k-instruct-0123456789") -> str:
    return fake.add_model(name, "1")["properties"]["modelUri"]


def test_deploy_serverless_waits_and_reads_the_key(fake: FakeAzure, az: AzureClients) -> None:
    model_id = fine_tuned_model(fake)

    info = deploy_serverless(az, "phitune-ep", model_id, base_model_id=PHI3)

    (put,) = fake.sent("PUT", "/serverlessEndpoints/phitune-ep$")
    assert put.api_version == "2024-01-01-preview"
    assert put.json() == {"properties": {"modelSettings": {"modelId": model_id}}, "sku": {"name": "Consumption"}, "location": "eastus2"}
    assert fake.sent("GET", "/mfeOperationResults/")  # the LRO was followed
    (keys,) = fake.sent("POST", "/serverlessEndpoints/phitune-ep/listKeys$")
    assert keys.api_version == "2024-01-01-preview"
    assert not fake.sent("PUT", "marketplaceSubscriptions")  # Phi models are Microsoft's own: no subscription
    assert info.scoring_uri == "https://phitune-ep.eastus2.models.ai.azure.com"
    assert info.base_url + "/v1/chat/completions" == "https://phitune-ep.eastus2.models.ai.azure.com/v1/chat/completions"
    assert info.key == "pk-phitune-ep-secret"
    assert "secret" not in repr(info) and "secret" not in str(info.public_dict())


def test_third_party_base_model_gets_a_marketplace_subscription_first(fake: FakeAzure, az: AzureClients) -> None:
    base = "azureml://registries/azureml-mistral/models/Ministral-3B/versions/3"

    deploy_serverless(az, "ministral-ep", fine_tuned_model(fake, "ministral-ft"), base_model_id=base)
    deploy_serverless(az, "ministral-ep2", fine_tuned_model(fake, "ministral-ft2"), base_model_id=base)

    (sub,) = fake.sent("PUT", "/marketplaceSubscriptions/")  # created once, found the second time
    assert sub.path.endswith("/marketplaceSubscriptions/Ministral-3B-sub")
    assert sub.json() == {"properties": {"modelId": "azureml://registries/azureml-mistral/models/Ministral-3B"}}
    methods = [r.method + " " + r.path.rsplit("/", 1)[-1] for r in fake.requests if "marketplace" in r.path or "serverlessEndpoints" in r.path]
    assert methods.index("PUT Ministral-3B-sub") < methods.index("PUT ministral-ep")
    assert marketplace_model_id(PHI3) is None


def test_failed_deployment_surfaces_azures_message(fake: FakeAzure, az: AzureClients) -> None:
    fake.endpoint_error = ("QuotaExceeded", "Serverless deployments of fine-tuned models are limited to 1 per model.")

    with pytest.raises(AzureError, match="deploy .* to serverless endpoint phitune-ep: .*Serverless deployments of fine-tuned models are limited") as info:
        deploy_serverless(az, "phitune-ep", fine_tuned_model(fake))
    assert "\n" not in str(info.value)
    assert not fake.sent("POST", "listKeys")


def test_delete_serverless_endpoint_is_idempotent(fake: FakeAzure, az: AzureClients) -> None:
    deploy_serverless(az, "phitune-ep", fine_tuned_model(fake))

    assert delete_serverless_endpoint(az, "phitune-ep") is True
    (ep_delete,) = fake.sent("DELETE", "/serverlessEndpoints/phitune-ep$")
    assert ep_delete.api_version == "2024-01-01-preview"
    assert delete_serverless_endpoint(az, "phitune-ep") is False
