"""Serverless and managed online endpoints, model deletion and error classification against the fake Azure."""

from __future__ import annotations

from pathlib import Path

import pytest
from azure_fake import FakeAzure, Reply, route_blob_uploads

from phitune.azure.client import AzureClients, connect
from phitune.azure.endpoints import delete_model, delete_serverless_endpoint, deploy_managed_online, deploy_serverless, marketplace_model_id
from phitune.azure.errors import AzureError, ModelInUseError, classify_azure_error
from phitune.config import AzureConfig

PHI3 = "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeAzure:
    fake = FakeAzure()
    route_blob_uploads(monkeypatch, fake)
    return fake


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


def test_delete_model_is_refused_while_deployed_then_allowed(fake: FakeAzure, az: AzureClients) -> None:
    name = "phitune-phi-3-mini-4k-instruct-0123456789"
    deploy_serverless(az, "phitune-ep", fine_tuned_model(fake, name))

    with pytest.raises(ModelInUseError, match=f"model {name}:1 is still deployed at serverless endpoint\\(s\\) phitune-ep: delete the endpoint"):
        delete_model(az, name, "1")
    assert not fake.sent("DELETE")

    assert delete_serverless_endpoint(az, "phitune-ep") is True
    (ep_delete,) = fake.sent("DELETE", "/serverlessEndpoints/phitune-ep$")
    assert ep_delete.api_version == "2024-01-01-preview"
    assert delete_serverless_endpoint(az, "phitune-ep") is False  # idempotent

    delete_model(az, name, "1")
    (model_delete,) = fake.sent("DELETE", "/models/")
    assert model_delete.path == f"{fake.ws_path}/models/{name}/versions/1" and model_delete.api_version == "2024-10-01"
    assert model_delete.headers["Authorization"] == "Bearer fake-access-token"
    assert (name, "1") not in fake.models


def test_azure_refusing_a_delete_is_model_in_use(fake: FakeAzure, az: AzureClients) -> None:
    fine_tuned_model(fake, "m1")
    fake.inject("DELETE", "/models/m1/versions/1$", Reply(409, {"error": {"code": "Conflict", "message": "Model is in use by an endpoint in another project."}}))

    with pytest.raises(ModelInUseError, match="Azure refused to delete model m1:1: HTTP 409 Conflict: Model is in use by an endpoint in another project"):
        delete_model(az, "m1", "1")


def test_managed_online_endpoint_for_a_local_mlflow_model(fake: FakeAzure, az: AzureClients, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors:\n  transformers: {task: llm/v1/chat}\n")
    (model_dir / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    info = deploy_managed_online(az, "phitune-online", model_dir, "phitune-local")

    (model_put,) = fake.sent("PUT", "/models/phitune-local/versions/")
    version = model_put.path.rsplit("/", 1)[1]
    assert len(version) == 12 and model_put.json()["properties"]["modelType"] == "mlflow_model"
    assert {r.path.rsplit("/", 1)[1] for r in fake.sent("PUT", r"\.blob\.core\.windows\.net/.*/model/")} == {"MLmodel", "adapter_model.safetensors"}
    endpoint_puts = fake.sent("PUT", "/onlineEndpoints/phitune-online$")
    assert endpoint_puts[0].json()["properties"]["authMode"] == "Key"
    assert endpoint_puts[-1].json()["properties"]["traffic"] == {"blue": 100}
    (dep,) = fake.sent("PUT", "/onlineEndpoints/phitune-online/deployments/blue$")
    body = dep.json()
    assert body["properties"]["model"] == f"{fake.ws_path}/models/phitune-local/versions/{version}"
    assert body["properties"]["instanceType"] == "Standard_NC6s_v3" and body["sku"]["capacity"] == 1
    assert body["properties"]["endpointComputeType"] == "Managed"
    assert "environmentId" not in body["properties"]  # MLflow no-code deployment: Azure builds the image
    assert info.kind == "managed_online" and info.scoring_uri.endswith("/score") and info.key == "pk-phitune-online-secret"

    fake.requests.clear()
    deploy_managed_online(az, "phitune-online", model_dir, "phitune-local")
    assert not fake.sent("PUT", "/models/") and not fake.sent("PUT", r"\.blob\.")  # same weights: not uploaded again


def test_classify_azure_error() -> None:
    blocked = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
            "type": None, "param": "prompt", "code": "content_filter", "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {"violence": {"filtered": True, "severity": "high"}}},
        }
    }
    assert classify_azure_error(400, blocked) == "content_filter"
    assert classify_azure_error(400, b'{"error": {"code": "content_filter", "message": "blocked"}}') == "content_filter"
    assert classify_azure_error(400, {"error": {"code": "invalid_request", "message": "max_tokens too large"}}) == "bad_request"
    assert classify_azure_error(401, "not json") == "auth"
    assert classify_azure_error(429, {"error": {"code": "429"}}) == "throttled"
    assert classify_azure_error(503, None) == "server_error"
    assert classify_azure_error(200, {}) == "ok"
