"""The evaluation stage: base model, candidate and champion on the same held-out set, wherever each can run.

A model with local weights (the base, a LoRA adapter) is evaluated here with every metric; a model
reachable only through an endpoint (an Azure serverless fine-tune, as candidate or champion) is
scored on its replies (phitune.evaluation.evaluate_all). Metrics and the per-example table go to the
MLflow run, the table also to a Prefect artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from phitune import registry
from phitune.config import PipelineConfig
from phitune.evaluation import Served, evaluate_all
from phitune.registry.external import log_to_run
from phitune.serving.endpoints import Endpoint, list_endpoints
from tasks.deploy import endpoint_key


def _served(config: PipelineConfig, endpoint: Endpoint) -> Served:
    return Served(endpoint.name, endpoint.url, endpoint_key(config, endpoint))


@task(name="evaluate-models")
def evaluate_models(
    config: PipelineConfig, data: dict[str, Any], candidate: dict[str, Any], run_id: str, endpoint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """{"base": {...}, "candidate": {...}, "champion": {...} (when evaluated), "champion_version", "notes", "not_measured"}.

    `candidate` is the training stage's reference; `endpoint` the challenger endpoint of a candidate
    that has no local weights. Logs base_*/candidate_*/champion_* metrics and the per-example table
    (evaluation/examples.json) to the MLflow run `run_id`.
    """
    logger = get_run_logger()
    local: dict[str, str | None] = {"base": None}
    served: dict[str, Served] = {}
    notes: list[str] = []
    if candidate.get("adapter_dir"):
        local["candidate"] = candidate["adapter_dir"]
    elif endpoint is not None:
        served["candidate"] = _served(config, Endpoint(endpoint["endpoint"], endpoint["model_name"], endpoint["version"],
                                                       endpoint["base_url"], target=endpoint["target"]))
    else:
        notes.append("candidate not evaluated: it has no local weights and no endpoint (deployment.target is 'none')")

    champion = registry.champion_adapter(config) if config.evaluation.compare_champion else None
    if champion is not None:
        client = registry.configure(config.registry).client
        live = next((e for e in list_endpoints(client) if e.model_name == config.registry.model_name and e.version == champion.version), None)
        if champion.adapter_dir is not None:
            local["champion"] = str(champion.adapter_dir)
        elif live is not None:
            served["champion"] = _served(config, live)
        else:
            notes.append(f"champion v{champion.version} not re-evaluated ({champion.note}): the gate uses its recorded metrics")

    result = evaluate_all(config, data["validation_file"], local, served)
    metrics = {"base": {}, "candidate": {}, **result.metrics}
    notes += result.notes
    registry.log_evaluation(config, run_id, metrics, result.rows)
    if notes:
        log_to_run(config, run_id, json_artifacts={"evaluation/notes.json": {"notes": notes, "not_measured": result.not_measured}})
    create_table_artifact(
        table=result.rows,
        key="evaluation-examples",
        description=f"Held-out replies of {', '.join(m for m in metrics if metrics[m])} ({len(result.rows)} examples, greedy, "
        f"max {config.evaluation.max_new_tokens} new tokens).",
    )
    for line in notes:
        logger.info(line)
    for name, values in metrics.items():
        logger.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "not evaluated")
    return {**metrics, "champion_version": champion.version if champion else None, "notes": notes, "not_measured": result.not_measured}
