"""Prefect task: evaluate base model, candidate and champion on the held-out set; log metrics and the table."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from phitune.config import PipelineConfig
from phitune.evaluation import evaluate_files
from phitune.registry import champion_adapter, log_evaluation


@task(name="evaluate-models")
def evaluate_models(config: PipelineConfig, data: dict[str, Any], adapter_dir: str, run_id: str) -> dict[str, Any]:
    """{"base": {...}, "candidate": {...}, "champion": {...} (when evaluated), "champion_version": str | None}.

    Logs base_*/candidate_*/champion_* metrics and the per-example table (evaluation/examples.json) to
    the MLflow run, and the same table as a Prefect artifact.
    """
    logger = get_run_logger()
    adapters: dict[str, str | None] = {"base": None, "candidate": adapter_dir}
    champion = champion_adapter(config) if config.evaluation.compare_champion else None
    if champion is not None:
        logger.info(champion.note)
        if champion.adapter_dir is not None:
            adapters["champion"] = str(champion.adapter_dir)
    result = evaluate_files(config, data["validation_file"], adapters)
    log_evaluation(config, run_id, result.metrics, result.rows)
    create_table_artifact(
        table=result.rows,
        key="evaluation-examples",
        description=f"Held-out replies of {', '.join(adapters)} ({len(result.rows)} examples, greedy, "
        f"max {config.evaluation.max_new_tokens} new tokens).",
    )
    for name, metrics in result.metrics.items():
        logger.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {**result.metrics, "champion_version": champion.version if champion else None}
