"""The Azure branch of the `finetune` flow (`training.backend: azure`): what a user of Azure AI Foundry's
fine-tuning wizard does, without the portal, ending in the same registry and the same promotion gate
as a local run.

    pre-flight (cost drivers on the MLflow run) -> data assets -> serverless fine-tuning job
    -> a model version in the MLflow registry (source: the Azure model URI, tag phitune.location=azure)
    -> a serverless endpoint for it (the challenger, recorded in the registry at once)
    -> evaluation: the candidate through its endpoint; the base model (and a local champion) here when
       model.base_model can be loaded; an Azure champion through its own endpoint
    -> the promotion gate
    -> promoted: smoke test with the probe set, then the replaced champion's Azure endpoint is deleted
       not promoted (or any failure): the challenger's endpoint is deleted

Why one endpoint per version (`<deployment.endpoint_name>-v<version>`): a serverless endpoint serves
one model and cannot be switched to another, so blue/green on Azure is a new endpoint next to the old
one. A fine-tuned model's serverless deployment is billed by the hour while it exists, so an endpoint
that is not the champion's never outlives the flow run; it is in the registry from its first minute,
so `phitune endpoints` shows (and `phitune endpoint stop` removes) one a killed run left behind.

Keys: each endpoint's key goes to a Prefect Secret block (tasks.azure.azure_deploy) and is read
from there inside the tasks that query the endpoint; it is never a task parameter or result, and
never reaches MLflow or a log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency

from phitune import registry
from phitune.azure.finetune import AzureFinetuneResult
from phitune.azure.preflight import PreflightReport
from phitune.config import PipelineConfig
from phitune.endpoint_eval import NOT_MEASURED, evaluate_endpoint
from phitune.errors import ConfigError, ModelNotFoundError
from phitune.evaluation import evaluate_files, example_rows, load_examples
from phitune.probes import SmokeTestFailed, load_probe_set, smoke_test
from phitune.registry import tags as T
from phitune.registry.external import AZURE_TAG_PREFIX, log_to_run, record_version_metrics, register_external_version
from phitune.registry.promotion import LOCK_TIMEOUT_S
from phitune.registry.runs import set_run_tags
from phitune.serving.endpoints import Endpoint, clear, list_endpoints, record
from tasks.azure import azure_delete_endpoint, azure_deploy, azure_finetune, azure_preflight, azure_upload_data, secret_block_name
from tasks.register import PROMOTION_LIMIT, ensure_limit
from tasks.smoke import publish

MAX_ENDPOINT_NAME = 32
_ENDPOINT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
REMOTE_METRICS = ("label_accuracy", "macro_f1", "rougeL")


@dataclass
class _PassedContract:
    """validate_data's verdict in the shape the pre-flight reads: the data already passed, don't validate it twice."""

    stats: dict[str, Any]
    valid: bool = True
    errors: list[Any] = field(default_factory=list)


def endpoint_name_for(base: str, version: str) -> str:
    """`<base>-v<version>`, cut to Azure's 32 characters (letters, digits, '-'; starting with a letter)."""
    suffix = f"-v{version}"
    return base[: MAX_ENDPOINT_NAME - len(suffix)].rstrip("-") + suffix


def check_azure_config(config: PipelineConfig) -> None:
    """What would only fail after money was spent: the serving target, the gate's metric, endpoint name, probe set."""
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


def _with_endpoint(config: PipelineConfig, name: str) -> PipelineConfig:
    return config.model_copy(update={"deployment": config.deployment.model_copy(update={"endpoint_name": name})})


# ---------------------------------------------------------------- MLflow records

@task(name="azure-record-preflight")
def record_preflight(config: PipelineConfig, run_id: str, report: PreflightReport) -> None:
    """The cost drivers as run metrics, each check's outcome as a param, the whole report as an artifact."""
    params: dict[str, Any] = {f"azure_preflight.{c.name.replace(' ', '_')}": c.status for c in report.checks}
    params["azure_workspace_location"] = report.workspace_location
    metrics: dict[str, float] = {}
    if report.cost:
        params["azure_tokens_approximate"] = report.cost.tokens_approximate
        metrics = report.cost.as_metrics()
    log_to_run(config, run_id, params=params, metrics=metrics, json_artifacts={"azure/preflight.json": report.to_dict()})


@task(name="azure-register-version")
def register_azure_version(config: PipelineConfig, run_id: str, job: AzureFinetuneResult, digest: str) -> dict[str, Any]:
    """The Azure fine-tune as a new version of registry.model_name; the job's params and metrics on the run and the version."""
    log_to_run(config, run_id, params=job.params, metrics=job.metrics, json_artifacts={"azure/finetune-job.json": job.to_dict()})
    facts = {**job.params, **{k: repr(v) for k, v in job.metrics.items()}, "azure_model_name": job.model_name,
             "azure_model_version": job.model_version, "azure_model_asset_id": job.model_asset_id, "azure_studio_url": job.studio_url or ""}
    tags = {AZURE_TAG_PREFIX + k.removeprefix("azure_"): str(v) for k, v in facts.items()}
    mv = register_external_version(config, run_id, job.model_uri, data_digest=digest, location="azure",
                                   base_model=job.base_model_id, tags=tags)
    name, version = mv.name, str(mv.version)
    get_run_logger().info("registered %s v%s from Azure model %s:%s (%s)", name, version, job.model_name, job.model_version, job.model_uri)
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "source": job.model_uri}


@task(name="azure-record-endpoint", cache_policy=NONE)  # registry state: never answered from a cache
def record_endpoint(config: PipelineConfig, registered: dict[str, Any], deployed: dict[str, Any]) -> None:
    """`endpoint.<name>.*` tags on the version it serves, as for local deployments (target azure)."""
    client = registry.configure(config.registry).client
    record(client, registered["name"], registered["version"],
           Endpoint(deployed["name"], registered["name"], registered["version"], deployed["base_url"], target="azure"))


@task(name="azure-forget-endpoint", cache_policy=NONE)
def forget_endpoint(config: PipelineConfig, model_name: str, version: str, endpoint_name: str) -> None:
    clear(registry.configure(config.registry).client, model_name, version, endpoint_name)


def remove_endpoint(config: PipelineConfig, model_name: str, version: str, endpoint_name: str) -> None:
    """Delete the Azure endpoint and its Secret block, then its registry tags (so a failed delete stays visible)."""
    azure_delete_endpoint(config, endpoint_name)
    forget_endpoint(config, model_name, version, endpoint_name)


# ---------------------------------------------------------------- evaluation and gate

def _azure_endpoint_of(config: PipelineConfig, version: str) -> Endpoint | None:
    client = registry.configure(config.registry).client
    name = config.registry.model_name
    return next((e for e in list_endpoints(client) if e.model_name == name and e.version == str(version) and e.target == "azure"), None)


def _endpoint_key(endpoint_name: str) -> str:
    return str(Secret.load(secret_block_name(endpoint_name)).get())


@task(name="azure-evaluate")
def evaluate_on_azure(config: PipelineConfig, data: dict[str, Any], run_id: str, candidate: dict[str, Any] | None) -> dict[str, Any]:
    """Base, candidate and champion on the held-out set, each where it can be run; what could not be measured is said.

    Returns the evaluation stage's dict ({"base", "candidate", "champion"?, "champion_version"}) plus
    "notes" (sentences) and "not_measured" (model -> metrics); logs base_*/candidate_*/champion_*
    metrics and the per-example table to the run.
    """
    logger = get_run_logger()
    ev = config.evaluation
    examples = load_examples(data["validation_file"], ev.max_examples)
    metrics: dict[str, dict[str, float]] = {}
    replies: dict[str, list[str]] = {}
    notes: list[str] = []
    not_measured: dict[str, list[str]] = {}

    champion = registry.champion_adapter(config) if ev.compare_champion else None
    local: dict[str, str | None] = {"base": None}
    if champion is not None and champion.adapter_dir is not None:
        local["champion"] = str(champion.adapter_dir)
    try:
        result = evaluate_files(config, data["validation_file"], local)
    except ModelNotFoundError as exc:
        notes.append(f"base model not evaluated: model.base_model {config.model.base_model!r} cannot be loaded here ({exc})")
    else:
        metrics.update(result.metrics)
        replies.update({name: [row[f"{name}_generated"] for row in result.rows] for name in local})

    def through_endpoint(who: str, endpoint_name: str, base_url: str) -> None:
        got = evaluate_endpoint(examples, base_url, api_key=_endpoint_key(endpoint_name), max_new_tokens=ev.max_new_tokens,
                                timeout_s=config.monitoring.timeout_s)
        metrics[who], replies[who] = got.metrics, got.replies
        not_measured[who] = list(NOT_MEASURED)
        notes.append(f"{who} evaluated through serverless endpoint {endpoint_name} in {got.seconds:.1f} s: generation metrics only "
                     f"({', '.join(NOT_MEASURED)} need the model's logits, which an endpoint does not return)")
        if got.filtered:
            notes.append(f"{who}: {len(got.filtered)} of {len(examples)} held-out prompts were blocked by the content filter "
                         "(scored as empty replies)")

    if candidate is not None:
        through_endpoint("candidate", candidate["endpoint"], candidate["base_url"])
    else:
        metrics["candidate"] = {}
        notes.append("candidate not evaluated: deployment.target is 'none', and an Azure serverless fine-tune can only be queried through an endpoint")
    if champion is not None:
        if champion.adapter_dir is None and (live := _azure_endpoint_of(config, champion.version)):
            through_endpoint("champion", live.name, live.url)
        elif "champion" not in metrics:
            notes.append(f"champion v{champion.version} not re-evaluated ({champion.note}): the gate uses its recorded metrics")
    metrics.setdefault("base", {})

    rows = example_rows(examples, replies)
    registry.log_evaluation(config, run_id, metrics, rows)
    log_to_run(config, run_id, json_artifacts={"evaluation/notes.json": {"notes": notes, "not_measured": not_measured}})
    create_table_artifact(table=rows, key="evaluation-examples",
                          description=f"Held-out replies of {', '.join(replies)} ({len(rows)} examples, greedy, max {ev.max_new_tokens} new tokens).")
    for line in notes:
        logger.info(line)
    for name, values in metrics.items():
        logger.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "not evaluated")
    return {**metrics, "champion_version": champion.version if champion else None, "notes": notes, "not_measured": not_measured}


@task(name="azure-promotion-gate")
def promotion_gate(config: PipelineConfig, run_id: str, registered: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The local path's gate on the Azure version: challenger always, champion on merit (same lock and concurrency slot).

    Returns the registration with "aliases", "promoted", "reason" and "replaced" (the champion it
    was judged against, when it won).
    """
    name, version = registered["name"], registered["version"]
    record_version_metrics(config, version, evaluation["candidate"])
    ensure_limit(PROMOTION_LIMIT)
    with concurrency(PROMOTION_LIMIT, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True):
        decision = registry.promote(config.registry, version, evaluation)
    reason = decision.reason
    if not decision.promoted and not (evaluation["base"] and evaluation["candidate"]):
        reason += f" [{'; '.join(n for n in evaluation['notes'] if 'not evaluated' in n)}]"
        registry.configure(config.registry).client.set_model_version_tag(name, version, T.PROMOTION_TAG, reason)
    get_run_logger().info("%s v%s: %s", name, version, reason)
    set_run_tags(config, run_id, {"phitune.registered_version": version, "phitune.promoted": str(decision.promoted).lower()})
    create_markdown_artifact(markdown=registry.comparison_markdown(name, version, evaluation, decision), key="promotion-gate",
                             description=f"{name} v{version}: promotion gate on {decision.metric}")
    return {
        **registered, "aliases": [registry.CHALLENGER] + ([registry.CHAMPION] if decision.promoted else []),
        "promoted": decision.promoted, "reason": reason, "replaced": decision.champion_version if decision.promoted else None,
    }


@task(name="azure-smoke-test")
def azure_smoke_test(config: PipelineConfig, base_url: str, endpoint_name: str) -> dict[str, Any]:
    """The deployment's probe set once against the endpoint, with its key from the Secret block; raises below min_pass_rate."""
    probe_set = load_probe_set(config.deployment.probes_file)
    try:
        report = smoke_test(probe_set, base_url, api_key=_endpoint_key(endpoint_name), timeout_s=config.monitoring.timeout_s)
    except SmokeTestFailed as exc:
        publish(exc.report)
        raise
    publish(report)
    return report.summary()


# ---------------------------------------------------------------- the branch

def finetune_on_azure(config: PipelineConfig, data: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Run the Azure branch inside the `finetune` flow; returns {"registered", "evaluation", "azure_job", "endpoint"?}.

    Raises before anything is uploaded or paid for when the config or the pre-flight says it cannot
    work. The challenger's endpoint is deleted on every path that does not make it the champion's.
    """
    logger = get_run_logger()
    check_azure_config(config)
    report = azure_preflight(config, data["train_file"], data.get("validation_file"), _PassedContract(data.get("stats") or {}))
    record_preflight(config, run_id, report)
    train, validation = azure_upload_data(config, data["train_file"], data.get("validation_file"))
    job = azure_finetune(config, train, validation)
    registered = register_azure_version(config, run_id, job, data["digest"])
    name, version = registered["name"], registered["version"]

    endpoint_name = endpoint_name_for(config.deployment.endpoint_name, version) if config.deployment.target == "azure" else None
    endpoint: dict[str, Any] | None = None
    keep = False
    try:
        if endpoint_name:
            deployed = azure_deploy(_with_endpoint(config, endpoint_name), job.model_uri, job.base_model_id)
            endpoint = {"endpoint": endpoint_name, "version": version, "model_name": name, "target": "azure", **deployed}
            record_endpoint(config, registered, deployed)
        evaluation = evaluate_on_azure(config, data, run_id, endpoint)
        registered = promotion_gate(config, run_id, registered, evaluation)
        if endpoint is not None and registered["promoted"]:
            endpoint["smoke"] = azure_smoke_test(config, endpoint["base_url"], endpoint_name)
            keep = True
    except BaseException:
        if endpoint_name:  # also when the deployment itself failed half-way: Azure may hold a (billed) endpoint
            _remove_quietly(config, name, version, endpoint_name)
        raise
    result: dict[str, Any] = {"registered": registered, "evaluation": evaluation, "azure_job": job.to_dict()}
    if endpoint is None:
        return result
    if not keep:
        logger.info("v%s is not the champion: deleting its endpoint %s", version, endpoint["endpoint"])
        remove_endpoint(config, name, version, endpoint["endpoint"])
        return result
    replaced = _azure_endpoint_of(config, registered["replaced"]) if registered["replaced"] else None
    if replaced is not None:
        logger.info("%s v%s is champion at %s: deleting the replaced champion's endpoint %s", name, version, endpoint["endpoint"], replaced.name)
        remove_endpoint(config, name, replaced.version, replaced.name)
    endpoint["replaced"] = replaced.name if replaced else None
    result["endpoint"] = endpoint
    return result


def _remove_quietly(config: PipelineConfig, model_name: str, version: str, endpoint_name: str) -> None:
    """Clean-up on the way out of a failure: log what could not be removed instead of hiding the failure."""
    try:
        remove_endpoint(config, model_name, version, endpoint_name)
    except Exception as exc:  # noqa: BLE001 - the original error is the one to raise
        get_run_logger().error("could not delete challenger endpoint %s (delete it with `phitune endpoint stop %s`): %s",
                               endpoint_name, endpoint_name, exc)
