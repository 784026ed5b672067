"""Pre-flight: everything that can be checked before a byte is uploaded or a cent is spent.

Each item ends as pass / warn / fail / skipped with a reason, so a user fixes all problems in one go
instead of meeting them one paid step at a time. What is in the data files is judged by phitune's data
contract (`phitune.data`), the one validator; pre-flight adds only Azure's own file rules. The cost
drivers (trained tokens = training tokens x epochs, as the contract counted them) are returned for the
pipeline to record in MLflow.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from phitune.azure.client import ARM_SCOPE, AzureClients
from phitune.azure.errors import AzureError, describe
from phitune.config import PipelineConfig
from phitune.errors import ConfigError, PhituneError

AZURE_MAX_FILE_MB = 512
"""Azure's size limit of a fine-tuning file, in MB of 10^6 bytes like data.max_file_mb (the stricter reading)."""
REGION_TAG = "maas-finetuning-deploy-regions"
"""Tag of a registry model listing the regions where its serverless fine-tunes can be deployed (Azure's own samples read it)."""

DOCUMENTED_REGIONS: dict[str, tuple[str, ...]] = {
    # Serverless fine-tuning + deployment support as documented by Microsoft (azureml-examples, 2025);
    # used only when the registry model carries no region tag.
    "Phi-3-mini-4k-instruct": ("eastus2",),
    "Phi-3-mini-128k-instruct": ("eastus2",),
    "Phi-3-medium-4k-instruct": ("eastus2",),
    "Phi-3-medium-128k-instruct": ("eastus2", "swedencentral"),
    "Phi-3.5-mini-instruct": ("eastus2", "eastus", "northcentralus", "westus3", "westus", "southcentralus"),
    "Phi-3.5-MoE-instruct": ("eastus2", "eastus", "northcentralus", "westus3", "westus", "southcentralus"),
    "Phi-4-mini-instruct": ("eastus2", "eastus", "northcentralus", "westus3", "westus", "southcentralus"),
}

FINETUNE_ACTIONS = (
    "Microsoft.MachineLearningServices/workspaces/data/versions/write",
    "Microsoft.MachineLearningServices/workspaces/datastores/listsecrets/action",
    "Microsoft.MachineLearningServices/workspaces/jobs/read",
    "Microsoft.MachineLearningServices/workspaces/jobs/write",
    "Microsoft.MachineLearningServices/workspaces/models/read",
)
DEPLOY_ACTIONS = (
    "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints/write",
    "Microsoft.MachineLearningServices/workspaces/serverlessEndpoints/listKeys/action",
    "Microsoft.MachineLearningServices/workspaces/marketplaceSubscriptions/write",
)
PROVIDER_API = "2021-04-01"
PERMISSIONS_API = "2022-04-01"

Status = Literal["pass", "warn", "fail", "skipped"]


class ContractReport(Protocol):
    """What pre-flight reads from phitune's data contract (`phitune.data.contract.validate_files`).

    The cost drivers come from `stats["files"]["train"]`: its `valid_examples` and `tokens`.
    """

    valid: bool
    errors: list[Any]
    stats: dict[str, Any]


@dataclass
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class CostDrivers:
    """What Azure bills a fine-tuning job by: tokens trained (training tokens x epochs)."""

    train_examples: int
    train_tokens: int
    epochs: int
    price_per_1k_tokens: float | None = None

    @property
    def trained_tokens(self) -> int:
        return self.train_tokens * self.epochs

    @property
    def estimated_cost(self) -> float | None:
        return None if self.price_per_1k_tokens is None else round(self.trained_tokens / 1000 * self.price_per_1k_tokens, 4)

    def as_metrics(self) -> dict[str, float]:
        """Numbers for MLflow (`mlflow.log_metrics`)."""
        metrics = {
            "azure_train_examples": float(self.train_examples),
            "azure_train_tokens": float(self.train_tokens),
            "azure_epochs": float(self.epochs),
            "azure_trained_tokens": float(self.trained_tokens),
        }
        if self.estimated_cost is not None:
            metrics["azure_estimated_training_cost"] = self.estimated_cost
        return metrics


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    cost: CostDrivers | None = None
    workspace_location: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.status in ("pass", "warn") for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status in ("fail", "skipped")]

    def render(self) -> str:
        lines = [f"[{c.status.upper():7}] {c.name}: {c.detail}" for c in self.checks]
        if self.cost:
            c = self.cost
            line = f"cost drivers: {c.train_examples} examples, {c.train_tokens} tokens x {c.epochs} epochs = {c.trained_tokens} trained tokens"
            if c.estimated_cost is not None:
                line += f", estimated {c.estimated_cost} at {c.price_per_1k_tokens} per 1K"
            lines.append(line)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "workspace_location": self.workspace_location, "checks": [asdict(c) for c in self.checks]}
        out["cost"] = {**asdict(self.cost), "trained_tokens": self.cost.trained_tokens, "estimated_cost": self.cost.estimated_cost} if self.cost else None
        return out


class PreflightError(AzureError):
    """Pre-flight found problems; the message lists every one of them."""

    def __init__(self, report: PreflightReport) -> None:
        items = "\n".join(f"  - {c.name}: {c.detail}" for c in report.problems)
        super().__init__(f"Azure pre-flight failed ({len(report.problems)} problem(s)); nothing was uploaded or submitted:\n{items}")
        self.report = report


@dataclass(frozen=True)
class RegistryModelRef:
    registry: str
    name: str
    version: str | None
    label: str | None

    @property
    def asset_id(self) -> str:
        """The model id without version: what a marketplace subscription refers to."""
        return f"azureml://registries/{self.registry}/models/{self.name}"


_MODEL_ID = re.compile(r"azureml://registries/(?P<reg>[^/]+)/models/(?P<name>[^/]+)(?:/versions/(?P<ver>[^/]+)|/labels/(?P<label>[^/]+))?/?")


def parse_registry_model_id(model_id: str) -> RegistryModelRef:
    m = _MODEL_ID.fullmatch(model_id.strip())
    if not m:
        raise AzureError(
            f"azure.model_id {model_id!r} is not a registry model id like "
            "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"
        )
    return RegistryModelRef(m["reg"], m["name"], m["ver"], m["label"])


def parse_regions(tag_value: str) -> list[str]:
    """Region tags come as "['eastus2', 'westus3']" or "eastus2,westus3"; both give ['eastus2', 'westus3']."""
    try:
        value = ast.literal_eval(tag_value)
    except (ValueError, SyntaxError):
        value = tag_value
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(r).strip().strip("'\"").lower() for r in items if str(r).strip()]


def action_allowed(action: str, permissions: list[dict[str, Any]]) -> bool:
    """Azure RBAC semantics: some permission entry grants the action and the same entry does not exclude it."""

    def matches(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in patterns)

    return any(matches(p.get("actions", [])) and not matches(p.get("notActions", [])) for p in permissions)


def check_azure_file(path: Path, label: str) -> Check:
    """Azure's rules for a fine-tuning file that the data contract does not know: a .jsonl name, at most 512 MB.

    The contract checks the content and the user's own data.max_file_mb; Azure's limit still applies
    when that is set higher for local training.
    """
    from phitune.data.contract import MB

    if not path.is_file():
        return Check(label, "fail", f"{path}: file not found")
    problems = []
    if path.suffix.lower() != ".jsonl":
        problems.append(f"{path.name}: Azure wants a .jsonl file")
    size_mb = path.stat().st_size / MB
    if size_mb > AZURE_MAX_FILE_MB:
        problems.append(f"{path.name}: {size_mb:.1f} MB is over Azure's {AZURE_MAX_FILE_MB} MB limit")
    if problems:
        return Check(label, "fail", "; ".join(problems))
    return Check(label, "pass", f"{path.name}: {size_mb:.2f} MB, .jsonl")


def _check_contract(contract: ContractReport) -> Check:
    if contract.valid:
        return Check("data contract", "pass", "training data passes phitune's data contract")
    shown = "; ".join(f"{getattr(e, 'file', '?')} line {getattr(e, 'line', '?')}: {getattr(e, 'code', '')} {getattr(e, 'message', '')}".strip() for e in contract.errors[:5])
    more = f" (+{len(contract.errors) - 5} more)" if len(contract.errors) > 5 else ""
    return Check("data contract", "fail", f"{len(contract.errors)} problem(s): {shown}{more}")


def _check_credential(az: AzureClients) -> Check:
    try:
        az.credential.get_token(ARM_SCOPE)
    except Exception as exc:  # noqa: BLE001 - any credential failure is this item's failure, reported with its reason
        return Check("credential", "fail", f"cannot get a token for Azure Resource Manager: {describe(exc)} (sign in with `az login` or set AZURE_* variables)")
    return Check("credential", "pass", "got a token for Azure Resource Manager")


def _check_workspace(az: AzureClients) -> tuple[Check, Any]:
    c = az.config
    try:
        ws = az.ml.workspaces.get(c.workspace)
    except Exception as exc:  # noqa: BLE001
        return Check("workspace", "fail", f"workspace {c.workspace!r} in resource group {c.resource_group!r} of subscription {c.subscription_id}: {describe(exc)}"), None
    kind = str(getattr(ws, "_kind", "") or "").lower()
    where = f"workspace {ws.name!r} in {ws.location}"
    if kind == "project":
        return Check("workspace", "pass", f"{where} (hub-based project)"), ws
    if c.compute:
        return Check("workspace", "pass", f"{where} (kind {kind or 'default'}; managed compute {c.compute!r})"), ws
    if kind == "hub":
        return Check("workspace", "fail", f"{where} is a hub; serverless fine-tuning runs in a project of the hub: set azure.workspace to the project"), ws
    return Check("workspace", "warn", f"{where} is kind {kind or 'default'}; serverless fine-tuning is documented for hub-based projects"), ws


def _check_region(az: AzureClients, location: str) -> Check:
    c = az.config
    try:
        ref = parse_registry_model_id(c.model_id)
    except AzureError as exc:
        return Check("region", "fail", str(exc))
    mismatch = f" (note: azure.region says {c.region})" if c.region and c.region.lower() != location.lower() else ""
    if c.compute:
        return Check("region", "pass", f"managed compute {c.compute!r} in {location}: no serverless region restriction{mismatch}")
    source, regions = "", None
    try:
        which = {"version": ref.version} if ref.version else {"label": ref.label or "latest"}
        model = az.registry(ref.registry).models.get(ref.name, **which)
        tag = (model.tags or {}).get(REGION_TAG)
        if tag:
            source, regions = f"tag {REGION_TAG} of {ref.name}", parse_regions(tag)
    except Exception as exc:  # noqa: BLE001
        from azure.core.exceptions import ResourceNotFoundError

        if isinstance(exc, ResourceNotFoundError):
            return Check("region", "fail", f"base model {c.model_id} not found in registry {ref.registry!r}: {describe(exc)}")
        source = f"model tags unreadable ({describe(exc)}); "
    if regions is None and ref.name in DOCUMENTED_REGIONS:
        source, regions = source + f"documented regions of {ref.name}", list(DOCUMENTED_REGIONS[ref.name])
    if regions is None:
        return Check("region", "warn", f"no region information for {ref.name}; Azure rejects the job if {location} does not support it{mismatch}")
    if location.lower() in regions:
        return Check("region", "pass", f"{location} supports serverless fine-tuning of {ref.name} ({source}){mismatch}")
    return Check("region", "fail", f"region {location} does not support serverless fine-tuning of {ref.name}; supported: {', '.join(regions)} ({source}){mismatch}")


def _check_network(az: AzureClients) -> Check:
    path = f"/subscriptions/{az.config.subscription_id}/providers/Microsoft.Network"
    try:
        state = (az.arm.request("GET", path, PROVIDER_API) or {}).get("registrationState", "unknown")
    except Exception as exc:  # noqa: BLE001
        return Check("Microsoft.Network", "fail", f"cannot read the provider's registration: {describe(exc)}")
    if state == "Registered":
        return Check("Microsoft.Network", "pass", "resource provider registered")
    return Check(
        "Microsoft.Network", "fail",
        f"resource provider is {state} in subscription {az.config.subscription_id}: run `az provider register --namespace Microsoft.Network`",
    )


def _check_permissions(az: AzureClients, deploy: bool) -> Check:
    try:
        permissions = (az.arm.request("GET", f"{az.workspace_path}/providers/Microsoft.Authorization/permissions", PERMISSIONS_API) or {}).get("value", [])
    except Exception as exc:  # noqa: BLE001
        return Check("permissions", "fail", f"cannot read your permissions on the workspace: {describe(exc)}")
    needed = FINETUNE_ACTIONS + (DEPLOY_ACTIONS if deploy else ())
    missing = [a for a in needed if not action_allowed(a, permissions)]
    if missing:
        return Check("permissions", "fail", f"missing on workspace {az.config.workspace!r}: {', '.join(missing)} (assign the Azure AI Developer role)")
    return Check("permissions", "pass", f"{len(needed)} needed actions allowed")


def run_preflight(
    az: AzureClients,
    cfg: PipelineConfig,
    train_file: Path,
    validation_file: Path | None,
    contract: ContractReport | None = None,
    *,
    raise_on_failure: bool = True,
) -> PreflightReport:
    """Check credential, workspace, region, Microsoft.Network, permissions and the data; estimate cost drivers.

    `contract` is the data contract's report of these files; when None it is computed with
    `phitune.data.contract.validate_files`. Raises PreflightError listing every problem unless
    `raise_on_failure` is False.
    """
    report = PreflightReport()
    cred = _check_credential(az)
    report.checks.append(cred)
    remote = ("workspace", "region", "Microsoft.Network", "permissions")
    if cred.status == "pass":
        ws_check, ws = _check_workspace(az)
        report.checks.append(ws_check)
        if ws is not None:
            report.workspace_location = ws.location
            report.checks.append(_check_region(az, ws.location))
        else:
            report.checks.append(Check("region", "skipped", "needs the workspace"))
        report.checks.append(_check_network(az))
        report.checks.append(_check_permissions(az, deploy=cfg.deployment.target == "azure"))
    else:
        report.checks.extend(Check(name, "skipped", "needs a working credential") for name in remote)

    report.checks.append(check_azure_file(Path(train_file), "training file"))
    if validation_file is not None:
        report.checks.append(check_azure_file(Path(validation_file), "validation file"))
    if contract is None:
        from phitune.data.contract import validate_files

        try:
            contract = validate_files(Path(train_file), Path(validation_file) if validation_file else None, cfg)
        except PhituneError as exc:  # e.g. the base model's tokenizer cannot be loaded here
            report.checks.append(Check("data contract", "fail", f"could not run the data contract: {exc}"))
    if contract is not None:
        report.checks.append(_check_contract(contract))
        train = contract.stats["files"]["train"]  # the training file only: what Azure trains on
        report.cost = CostDrivers(
            train_examples=int(train["valid_examples"]),
            train_tokens=int(train["tokens"]),
            epochs=cfg.training.epochs,
            price_per_1k_tokens=cfg.azure.price_per_1k_training_tokens,
        )
    if raise_on_failure and not report.ok:
        raise PreflightError(report)
    return report


REMOTE_METRICS = ("label_accuracy", "macro_f1", "rougeL")
"""Metrics the gate can compare for a model reachable only through an endpoint (no logits)."""
_ENDPOINT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


def check_azure_config(config: PipelineConfig) -> None:
    """What would only fail after money was spent: the serving target, the gate's metric, endpoint name, probe set."""
    from phitune.probes import load_probe_set

    if config.deployment.target not in ("azure", "none"):
        raise ConfigError(
            f"deployment.target={config.deployment.target!r} with training.backend=azure: a serverless fine-tune cannot be "
            "downloaded, so it is served on Azure only (deployment.target: azure, or none to register it without serving)"
        )
    if config.registry.promotion_metric not in REMOTE_METRICS:
        raise ConfigError(
            f"registry.promotion_metric={config.registry.promotion_metric!r} needs the model's logits, which an Azure endpoint "
            f"does not return; with training.backend=azure use one of {', '.join(REMOTE_METRICS)}"
        )
    if config.deployment.target == "azure":
        if not _ENDPOINT_NAME.fullmatch(config.deployment.endpoint_name):
            raise ConfigError(f"deployment.endpoint_name={config.deployment.endpoint_name!r}: an Azure endpoint name starts "
                              "with a letter and has only letters, digits and '-'")
        load_probe_set(config.deployment.probes_file)
