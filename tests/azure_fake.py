"""A fake Azure for tests: a requests adapter that answers ARM, Azure ML and Blob Storage calls from a
route table with realistic JSON, keeps state between calls, and records every request.

Why an adapter and not mocks: azure-ai-ml then runs its real HTTP layer (serialisation, api-versions,
retry and LRO policies), so tests assert on what the SDK really sends. Mount it with
`MLClient(cred, sub, rg, ws, transport=fake.transport())`. Nothing here opens a socket.

Scripting a test: set `job_script` (statuses the job goes through, one per GET), `job_error`,
`providers`, `permissions`, `location`, `registry_model_tags`, or queue one-shot replies with
`inject(method, pattern, Reply(...))` (e.g. a 429 before the real answer).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import BaseAdapter

ARM = "management.azure.com"
REGION_API = "{location}.api.azureml.ms"
STORAGE_ACCOUNT = "phitunestore"
BLOB_HOST = f"{STORAGE_ACCOUNT}.blob.core.windows.net"
REGISTRY_HOST = "cert-eastus.experiments.azureml.net"

# The actions of the built-in "Azure AI Developer" role (as documented), which is what the pre-flight expects.
AZURE_AI_DEVELOPER = {
    "actions": [
        "Microsoft.Authorization/*/read",
        "Microsoft.MachineLearningServices/workspaces/*/read",
        "Microsoft.MachineLearningServices/workspaces/*/action",
        "Microsoft.MachineLearningServices/workspaces/*/delete",
        "Microsoft.MachineLearningServices/workspaces/*/write",
        "Microsoft.MachineLearningServices/locations/*/read",
        "Microsoft.Resources/deployments/*",
        "Microsoft.Resources/subscriptions/resourceGroups/read",
    ],
    "notActions": [
        "Microsoft.MachineLearningServices/workspaces/delete",
        "Microsoft.MachineLearningServices/workspaces/write",
        "Microsoft.MachineLearningServices/workspaces/computes/*/write",
        "Microsoft.MachineLearningServices/workspaces/computes/*/delete",
        "Microsoft.MachineLearningServices/workspaces/computes/listKeys/action",
        "Microsoft.MachineLearningServices/workspaces/listKeys/action",
        "Microsoft.MachineLearningServices/workspaces/hubs/write",
        "Microsoft.MachineLearningServices/workspaces/hubs/delete",
    ],
    "dataActions": [],
    "notDataActions": [],
}
READER = {"actions": ["*/read"], "notActions": [], "dataActions": [], "notDataActions": []}


class FakeCredential:
    """A TokenCredential that hands out a fixed token, or fails like an expired `az login` session."""

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        if self.error:
            raise ClientAuthenticationError(self.error)
        return AccessToken("fake-access-token", int(time.time()) + 3600)


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raises: BaseException | None = None
    """Raised from the transport instead of answering (a dropped connection, a signal to the process)."""


@dataclass
class Recorded:
    method: str
    url: str
    host: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes | None

    @property
    def api_version(self) -> str | None:
        return self.query.get("api-version")

    def json(self) -> Any:
        return json.loads(self.body or b"null")


Handler = Callable[[Recorded, re.Match[str]], Reply]


def _error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


class _Adapter(BaseAdapter):
    def __init__(self, fake: FakeAzure) -> None:
        super().__init__()
        self.fake = fake

    def send(self, request: requests.PreparedRequest, **_: Any) -> requests.Response:  # type: ignore[override]
        body = request.body
        if hasattr(body, "read"):
            body = body.read()
        if isinstance(body, str):
            body = body.encode()
        parts = urlsplit(request.url or "")
        rec = Recorded(
            method=request.method or "GET",
            url=request.url or "",
            host=parts.hostname or "",
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers=dict(request.headers),
            body=body,
        )
        self.fake.requests.append(rec)
        reply = self.fake.dispatch(rec)
        if reply.raises is not None:
            raise reply.raises
        resp = requests.Response()
        resp.status_code = reply.status
        resp.url = rec.url
        resp.request = request
        resp.reason = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content"}.get(reply.status, "Error")
        raw = b"" if reply.body is None else reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        headers = {"x-ms-request-id": str(uuid.uuid4()), **reply.headers}
        if reply.body is not None and not isinstance(reply.body, bytes):
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        headers["Content-Length"] = str(len(raw))
        resp.headers.update(headers)
        resp.raw = io.BytesIO(raw)
        return resp

    def close(self) -> None:
        pass


class FakeAzure:
    """State of one fake subscription with one hub-based project (workspace)."""

    def __init__(
        self,
        subscription_id: str = "00000000-0000-0000-0000-000000000001",
        resource_group: str = "rg-phitune",
        workspace: str = "phitune-project",
        location: str = "eastus2",
    ) -> None:
        self.subscription_id = subscription_id
        self.resource_group = resource_group
        self.workspace = workspace
        self.location = location
        self.workspace_guid = "6f2b8f1e-0000-4000-8000-00000000abcd"
        self.requests: list[Recorded] = []
        self.credential = FakeCredential()
        # scripted behaviour
        self.job_script: list[str] = ["NotStarted", "Queued", "Running", "Running", "Finalizing", "Completed"]
        self.job_error: tuple[str, str] | None = None
        self.providers: dict[str, str] = {"Microsoft.Network": "Registered", "Microsoft.MachineLearningServices": "Registered"}
        self.permissions: list[dict[str, Any]] = [AZURE_AI_DEVELOPER]
        self.registry_model_tags: dict[str, str] = {
            "task": "chat-completion",
            "maas-finetuning-deploy-regions": "['eastus2']",
            "finetune_compute_allow_list": "['Standard_NC24ads_A100_v4']",
        }
        self.endpoint_state_script: list[str] = ["Creating", "Succeeded"]
        self.endpoint_error: tuple[str, str] | None = None
        # resources
        self.blobs: dict[str, bytes] = {}
        self.blob_metadata: dict[str, dict[str, str]] = {}
        self.data_versions: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.job_polls: dict[str, int] = {}
        self.models: dict[tuple[str, str], dict[str, Any]] = {}
        self.serverless: dict[str, dict[str, Any]] = {}
        self.marketplace: dict[str, dict[str, Any]] = {}
        self._operations: dict[str, list[Reply]] = {}
        self._injected: list[tuple[str, re.Pattern[str], Reply, list[int]]] = []  # [times left, skips left]
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._install_routes()

    # ------------------------------------------------------------------ plumbing
    def session(self) -> requests.Session:
        s = requests.Session()
        adapter = _Adapter(self)
        s.mount("https://", adapter)
        s.mount("http://", adapter)
        return s

    def transport(self) -> RequestsTransport:
        return RequestsTransport(session=self.session(), session_owner=False)

    @property
    def ws_path(self) -> str:
        return (
            f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{self.workspace}"
        )

    def inject(self, method: str, pattern: str, reply: Reply, times: int = 1, after: int = 0) -> None:
        """Answer `times` matching requests with `reply` instead of the route table, once `after` have passed."""
        self._injected.append((method.upper(), re.compile(pattern, re.I), reply, [times, after]))

    def sent(self, method: str | None = None, pattern: str = "") -> list[Recorded]:
        """Requests recorded so far, filtered by method and a regex on host+path."""
        rx = re.compile(pattern, re.I)
        return [r for r in self.requests if (method is None or r.method == method.upper()) and rx.search(r.host + r.path)]

    def dispatch(self, rec: Recorded) -> Reply:
        target = rec.host + rec.path
        for method, rx, reply, left in self._injected:
            if left[0] > 0 and method == rec.method and rx.search(target):
                if left[1] > 0:
                    left[1] -= 1
                    continue
                left[0] -= 1
                return reply
        for method, rx, handler in self._routes:
            m = rx.fullmatch(target)
            if m and method == rec.method:
                return handler(rec, m)
        return _error(404, "NoRoute", f"the fake Azure has no route for {rec.method} {target}")

    def _route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern, re.I), handler))

    def _lro(self, final: Reply, *, status_code: int = 201, body: Any = None, location: bool = False) -> Reply:
        """An ARM long-running operation: an Azure-AsyncOperation (or Location) URL that reports success."""
        op = uuid.uuid4().hex
        self._operations[op] = [final]
        url = f"https://{ARM}/subscriptions/{self.subscription_id}/providers/Microsoft.MachineLearningServices/locations/{self.location}/mfeOperationResults/{op}?api-version=2024-10-01-preview"
        headers = {"Retry-After": "0", ("Location" if location else "Azure-AsyncOperation"): url}
        return Reply(status_code, body, headers)

    # ------------------------------------------------------------------ resources
    def workspace_json(self) -> dict[str, Any]:
        return {
            "id": self.ws_path,
            "name": self.workspace,
            "type": "Microsoft.MachineLearningServices/workspaces",
            "location": self.location,
            "kind": "Project",
            "tags": {},
            "sku": {"name": "Basic", "tier": "Basic"},
            "identity": {"type": "SystemAssigned", "principalId": str(uuid.uuid4()), "tenantId": str(uuid.uuid4())},
            "properties": {
                "friendlyName": self.workspace,
                "workspaceId": self.workspace_guid,
                "provisioningState": "Succeeded",
                "discoveryUrl": f"https://{REGION_API.format(location=self.location)}/discovery",
                "mlFlowTrackingUri": f"azureml://{REGION_API.format(location=self.location)}/mlflow/v1.0{self.ws_path}",
                "hubResourceId": self.ws_path.rsplit("/", 1)[0] + "/phitune-hub",
                "storageAccount": f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}/providers/Microsoft.Storage/storageAccounts/{STORAGE_ACCOUNT}",
                "publicNetworkAccess": "Enabled",
            },
            "systemData": {"createdAt": _now(), "createdBy": "someone@example.com", "createdByType": "User"},
        }

    def add_model(self, name: str, version: str = "1", **properties: str) -> dict[str, Any]:
        body = {
            "id": f"{self.ws_path}/models/{name}/versions/{version}",
            "name": version,
            "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
            "properties": {
                "modelType": "custom_model",
                "flavors": {},
                "modelUri": f"azureml://locations/{self.location}/workspaces/{self.workspace_guid}/models/{name}/versions/{version}",
                "properties": {"maas-finetuning": "true", "hasDeltaWeights": "true", **properties},
                "tags": {},
                "isArchived": False,
            },
            "systemData": {"createdAt": _now()},
        }
        self.models[(name, version)] = body
        return body

    def _job_json(self, name: str) -> dict[str, Any]:
        job = self.jobs[name]
        job["properties"]["status"] = job["_status"]
        return {k: v for k, v in job.items() if not k.startswith("_")}

    # ------------------------------------------------------------------ routes
    def _install_routes(self) -> None:  # noqa: C901 - one table, read top to bottom
        ws = r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/workspaces/(?P<ws>[^/]+)"
        arm = re.escape(ARM)
        region = r"[a-z0-9]+\.api\.azureml\.ms"

        # --- subscription level: providers, permissions, LRO status
        def provider(rec: Recorded, m: re.Match[str]) -> Reply:
            ns = m["ns"]
            state = next((v for k, v in self.providers.items() if k.lower() == ns.lower()), "NotRegistered")
            return Reply(200, {"id": f"/subscriptions/{self.subscription_id}/providers/{ns}", "namespace": ns, "registrationState": state, "resourceTypes": []})

        self._route("GET", arm + r"/subscriptions/[^/]+/providers/(?P<ns>[A-Za-z.]+)", provider)
        self._route("GET", arm + ws + r"/providers/Microsoft\.Authorization/permissions", lambda r, m: Reply(200, {"value": self.permissions}))

        def operation(rec: Recorded, m: re.Match[str]) -> Reply:
            final = self._operations.get(m["op"], [Reply(200, {"status": "Succeeded"})])[0]
            return final

        self._route("GET", arm + r"/subscriptions/[^/]+/providers/Microsoft\.MachineLearningServices/locations/[^/]+/mfeOperationResults/(?P<op>\w+)", operation)

        # --- workspace, discovery, datastore
        def workspace(rec: Recorded, m: re.Match[str]) -> Reply:
            if m["ws"] != self.workspace:
                return _error(404, "ResourceNotFound", f"The Resource 'Microsoft.MachineLearningServices/workspaces/{m['ws']}' under resource group '{self.resource_group}' was not found.")
            return Reply(200, self.workspace_json())

        self._route("GET", arm + ws, workspace)
        self._route("GET", region + r"/discovery", lambda r, m: Reply(200, {k: f"https://{r.host}" for k in ("api", "catalog", "experimentation", "history", "modelmanagement", "pipelines", "studio")}))

        def datastore(rec: Recorded, m: re.Match[str]) -> Reply:
            return Reply(200, {
                "id": f"{self.ws_path}/datastores/workspaceblobstore",
                "name": "workspaceblobstore",
                "type": "Microsoft.MachineLearningServices/workspaces/datastores",
                "properties": {
                    "datastoreType": "AzureBlob", "isDefault": True, "accountName": STORAGE_ACCOUNT,
                    "containerName": f"azureml-blobstore-{self.workspace_guid}", "endpoint": "core.windows.net",
                    "protocol": "https", "credentials": {"credentialsType": "AccountKey"},
                },
            })

        self._route("GET", arm + ws + r"/datastores/workspaceblobstore", datastore)
        self._route("GET", arm + ws + r"/datastores", lambda r, m: Reply(200, {"value": [datastore(r, m).body]}))
        self._route("POST", arm + ws + r"/datastores/workspaceblobstore/listSecrets",
                    lambda r, m: Reply(200, {"secretsType": "AccountKey", "key": base64.b64encode(b"fake-storage-key").decode()}))

        # --- blob storage (reached only when a test routes the SDK's BlobServiceClient here)
        def blob_head(rec: Recorded, m: re.Match[str]) -> Reply:
            key = m["blob"]
            if key not in self.blobs:
                return Reply(404, None, {"x-ms-error-code": "BlobNotFound"})
            meta = {f"x-ms-meta-{k}": v for k, v in self.blob_metadata.get(key, {}).items()}
            return Reply(200, None, {"Content-Length": str(len(self.blobs[key])), "x-ms-blob-type": "BlockBlob", "ETag": '"0x1"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT", **meta})

        def blob_put(rec: Recorded, m: re.Match[str]) -> Reply:
            key = m["blob"]
            if rec.query.get("comp") == "metadata":
                self.blob_metadata[key] = {k[len("x-ms-meta-"):]: v for k, v in rec.headers.items() if k.lower().startswith("x-ms-meta-")}
            else:
                self.blobs[key] = rec.body or b""
            return Reply(201 if rec.query.get("comp") != "metadata" else 200, None, {"ETag": '"0x2"', "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT"})

        self._route("HEAD", re.escape(BLOB_HOST) + r"/(?P<blob>.+)", blob_head)
        self._route("PUT", re.escape(BLOB_HOST) + r"/(?P<blob>.+)", blob_put)

        # --- data assets
        def data_get(rec: Recorded, m: re.Match[str]) -> Reply:
            found = self.data_versions.get((m["name"], m["version"]))
            return Reply(200, found) if found else _error(404, "UserError", f"Could not find asset with ID: azureml:{m['name']}:{m['version']}")

        def data_put(rec: Recorded, m: re.Match[str]) -> Reply:
            body = rec.json()
            body.update({
                "id": f"{self.ws_path}/data/{m['name']}/versions/{m['version']}",
                "name": m["version"],
                "type": "Microsoft.MachineLearningServices/workspaces/data/versions",
                "systemData": {"createdAt": _now()},
            })
            self.data_versions[(m["name"], m["version"])] = body
            return Reply(201, body)

        self._route("GET", arm + ws + r"/data/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", data_get)
        self._route("PUT", arm + ws + r"/data/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", data_put)

        # --- registry (the base model's tags)
        self._route("GET", r"[a-z0-9]+\.api\.azureml\.ms/registrymanagement/v1\.0/registries/(?P<reg>[^/]+)/discovery", lambda r, m: Reply(200, {
            "registryName": m["reg"], "primaryRegion": "eastus", "regions": ["eastus", "eastus2"],
            "subscriptionId": "00000000-aaaa-0000-0000-000000000000", "resourceGroup": "registry-builtin-prod",
            "primaryRegionResourceProviderUri": f"https://{REGISTRY_HOST}/",
        }))

        def registry_model(rec: Recorded, m: re.Match[str]) -> Reply:
            return Reply(200, {
                "id": f"azureml://registries/{m['reg']}/models/{m['name']}/versions/{m['version']}",
                "name": m["version"],
                "properties": {
                    "modelType": "mlflow_model", "tags": self.registry_model_tags, "properties": {}, "description": m["name"],
                    "flavors": {"python_function": {"data": {"loader_module": "mlflow.transformers"}}},
                    "modelUri": f"azureml://registries/{m['reg']}/models/{m['name']}/versions/{m['version']}",
                },
            })

        self._route("GET", re.escape(REGISTRY_HOST) + r"/mferp/managementfrontend/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/registries/(?P<reg>[^/]+)/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", registry_model)

        # --- jobs
        def job_put(rec: Recorded, m: re.Match[str]) -> Reply:
            name = m["name"]
            body = rec.json()
            props = body["properties"]
            props["services"] = {"Studio": {"jobServiceType": "Studio", "endpoint": f"https://ml.azure.com/runs/{name}?wsid={self.ws_path}"}}
            self.jobs[name] = {
                "id": f"{self.ws_path}/jobs/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/jobs",
                "properties": props,
                "systemData": {"createdAt": _now(), "createdBy": "someone@example.com", "createdByType": "User"},
                "_status": self.job_script[0],
            }
            self.job_polls[name] = 0
            return Reply(201, self._job_json(name))

        def job_get(rec: Recorded, m: re.Match[str]) -> Reply:
            name = m["name"]
            if name not in self.jobs:
                return _error(404, "UserError", f"Job {name} not found")
            job = self.jobs[name]
            # azure-ai-ml reads a fine-tuning job twice per jobs.get (2024-01-01-preview to learn its type,
            # then 2024-10-01-preview); only the second counts as a poll so the script advances once per get.
            if job["_status"] not in ("CancelRequested", "Canceled") and rec.api_version != "2024-01-01-preview":
                self.job_polls[name] += 1
                job["_status"] = self.job_script[min(self.job_polls[name], len(self.job_script) - 1)]
            if job["_status"] == "Completed" and not any(k[0] == self.output_model_name(name) for k in self.models):
                self.add_model(self.output_model_name(name), "1", baseModelId=job["properties"]["fineTuningDetails"]["model"]["uri"].rsplit("/versions/", 1)[0])
            return Reply(200, self._job_json(name))

        def job_list(rec: Recorded, m: re.Match[str]) -> Reply:
            tag = rec.query.get("tag")
            values = [self._job_json(n) for n, j in self.jobs.items() if tag is None or tag in (j["properties"].get("tags") or {})]
            return Reply(200, {"value": values})

        def job_cancel(rec: Recorded, m: re.Match[str]) -> Reply:
            name = m["name"]
            if name not in self.jobs:
                return _error(404, "UserError", f"Job {name} not found")
            self.jobs[name]["_status"] = "CancelRequested"
            return self._lro(Reply(200, None), status_code=202, location=True)

        self._route("PUT", arm + ws + r"/jobs/(?P<name>[^/]+)", job_put)
        self._route("GET", arm + ws + r"/jobs/(?P<name>[^/]+)", job_get)
        self._route("GET", arm + ws + r"/jobs", job_list)
        self._route("POST", arm + ws + r"/jobs/(?P<name>[^/]+)/cancel", job_cancel)

        def run_get(rec: Recorded, m: re.Match[str]) -> Reply:
            name = m["name"]
            if name not in self.jobs:
                return _error(404, "UserError", f"Run {name} not found")
            status = self.jobs[name]["_status"]
            run: dict[str, Any] = {
                "runId": name, "status": status, "startTimeUtc": "2024-05-01T10:00:00.000Z",
                "endTimeUtc": "2024-05-01T10:42:30.000Z", "computeDuration": "00:40:12.5",
                "properties": {"registered_ft_model_name": self.output_model_name(name)} if status == "Completed" else {},
                "tags": self.jobs[name]["properties"].get("tags") or {},
            }
            if status == "Failed" and self.job_error:
                code, message = self.job_error
                run["error"] = {"error": {"code": code, "message": message}, "time": _now(), "componentName": "FineTuning"}
            return Reply(200, run)

        self._route("GET", region + r"/history/v1\.0" + ws + r"/runs/(?P<name>[^/]+)", run_get)

        # --- models
        def model_versions(rec: Recorded, m: re.Match[str]) -> Reply:
            return Reply(200, {"value": [v for (n, _), v in self.models.items() if n == m["name"]]})

        def model_get(rec: Recorded, m: re.Match[str]) -> Reply:
            found = self.models.get((m["name"], m["version"]))
            return Reply(200, found) if found else _error(404, "UserError", f"Model container with name: {m['name']} not found.")

        def model_put(rec: Recorded, m: re.Match[str]) -> Reply:
            body = rec.json()
            body.update({"id": f"{self.ws_path}/models/{m['name']}/versions/{m['version']}", "name": m["version"],
                         "type": "Microsoft.MachineLearningServices/workspaces/models/versions", "systemData": {"createdAt": _now()}})
            body["properties"].setdefault("flavors", {})
            self.models[(m["name"], m["version"])] = body
            return Reply(201, body)

        self._route("PUT", arm + ws + r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", model_put)
        self._route("GET", arm + ws + r"/models/(?P<name>[^/]+)/versions", model_versions)
        self._route("GET", arm + ws + r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", model_get)

        # --- serverless endpoints and marketplace subscriptions
        def se_json(name: str) -> dict[str, Any]:
            e = self.serverless[name]
            polls = e.pop("_polls", 0)
            e["properties"]["provisioningState"] = self.endpoint_state_script[min(polls, len(self.endpoint_state_script) - 1)]
            e["_polls"] = polls + 1
            return {k: v for k, v in e.items() if not k.startswith("_")}

        def se_put(rec: Recorded, m: re.Match[str]) -> Reply:
            name = m["name"]
            body = rec.json()
            self.serverless[name] = {
                "id": f"{self.ws_path}/serverlessEndpoints/{name}",
                "name": name,
                "type": "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints",
                "location": self.location,
                "sku": body.get("sku", {"name": "Consumption"}),
                "properties": {
                    **body["properties"],
                    "inferenceEndpoint": {"uri": f"https://{name}.{self.location}.models.ai.azure.com", "headers": {}},
                    "endpointState": "Online",
                },
                "systemData": {"createdAt": _now()},
            }
            if self.endpoint_error:
                code, message = self.endpoint_error
                self.serverless[name]["properties"]["provisioningState"] = "Failed"
                return self._lro(Reply(200, {"status": "Failed", "error": {"code": code, "message": message}}), body=se_json(name))
            return self._lro(Reply(200, {"status": "Succeeded"}), body=se_json(name))

        def se_get(rec: Recorded, m: re.Match[str]) -> Reply:
            return Reply(200, se_json(m["name"])) if m["name"] in self.serverless else _error(404, "NotFound", f"Serverless endpoint {m['name']} not found.")

        def se_delete(rec: Recorded, m: re.Match[str]) -> Reply:
            if self.serverless.pop(m["name"], None) is None:
                return Reply(204)
            return self._lro(Reply(200, {"status": "Succeeded"}), status_code=202, location=True)

        self._route("PUT", arm + ws + r"/serverlessEndpoints/(?P<name>[^/]+)", se_put)
        self._route("GET", arm + ws + r"/serverlessEndpoints/(?P<name>[^/]+)", se_get)
        self._route("GET", arm + ws + r"/serverlessEndpoints", lambda r, m: Reply(200, {"value": [se_json(n) for n in list(self.serverless)]}))
        self._route("DELETE", arm + ws + r"/serverlessEndpoints/(?P<name>[^/]+)", se_delete)
        self._route("POST", arm + ws + r"/serverlessEndpoints/(?P<name>[^/]+)/listKeys",
                    lambda r, m: Reply(200, {"primaryKey": f"pk-{m['name']}-secret", "secondaryKey": f"sk-{m['name']}-secret"}))

        def ms_put(rec: Recorded, m: re.Match[str]) -> Reply:
            body = rec.json()
            self.marketplace[m["name"]] = {
                "id": f"{self.ws_path}/marketplaceSubscriptions/{m['name']}", "name": m["name"],
                "properties": {**body["properties"], "provisioningState": "Succeeded", "status": "Subscribed",
                               "marketplacePlan": {"publisherId": "mistralai", "offerId": "x", "planId": "y"}},
            }
            return self._lro(Reply(200, {"status": "Succeeded"}), body=self.marketplace[m["name"]])

        def ms_get(rec: Recorded, m: re.Match[str]) -> Reply:
            found = self.marketplace.get(m["name"])
            return Reply(200, found) if found else _error(404, "NotFound", f"Marketplace subscription {m['name']} not found.")

        self._route("PUT", arm + ws + r"/marketplaceSubscriptions/(?P<name>[^/]+)", ms_put)
        self._route("GET", arm + ws + r"/marketplaceSubscriptions/(?P<name>[^/]+)", ms_get)

    def output_model_name(self, job_name: str) -> str:
        """The name Azure registers the fine-tuned model under: the job's `registered_model` output name."""
        outputs = self.jobs[job_name]["properties"].get("outputs") or {}
        return (outputs.get("registered_model") or {}).get("assetName") or f"{job_name}-model"


def route_blob_uploads(monkeypatch: Any, fake: FakeAzure) -> None:
    """Send azure-ai-ml's blob uploads to `fake` too.

    The SDK uploads data through its own BlobServiceClient, built without a transport argument; this
    patches only that construction (the SDK's upload boundary) to add the fake's transport, so the real
    storage client still sends the HEAD/PUT requests that tests then read from `fake.requests`.
    """
    from azure.ai.ml._artifacts import _blob_storage_helper
    from azure.storage.blob import BlobServiceClient

    def build(account_url: str, credential: Any = None, **kwargs: Any) -> BlobServiceClient:
        return BlobServiceClient(account_url, credential=credential, transport=fake.transport(), **kwargs)

    monkeypatch.setattr(_blob_storage_helper, "BlobServiceClient", build)


def write_chat_jsonl(path: Any, n: int, *, start: int = 0) -> Any:
    """A small valid chat JSONL file (n examples)."""
    lines = [
        json.dumps({"messages": [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": f"My order {i} has not arrived."},
            {"role": "assistant", "content": f"Sorry about order {i}; I have reshipped it."},
        ]})
        for i in range(start, start + n)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
