"""The `finetune` flow: validate -> train -> evaluate -> register (gate) -> deploy -> smoke test.

One pipeline run is one MLflow run; stages hand each other references (file paths, the MLflow run
id, model URIs), so any stage can run on another machine (training on a GPU work pool) and a
retried flow run picks up where it stopped: completed tasks are cached by their inputs and the
training task resumes from its last checkpoint in the run's working folder.

Run it:  python flows/pipeline.py --config configs/demo-cpu.yaml [key.sub=value ...]
Deploy:  see prefect.yaml (finetune/on-demand, finetune/nightly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.azure import finetune_on_azure
from flows.report import print_summary
from flows.train import train_on_deployment
from phitune.config import PipelineConfig, load_config
from phitune.errors import PhituneError
from tasks.azure import cancel_azure_job_on_cancel
from tasks.deploy import deploy_champion
from tasks.evaluate import evaluate_models
from tasks.register import close_run, open_run, register_and_promote, unchanged_champion
from tasks.train import train_adapter
from tasks.validate import validate_data


def _work_dir(config: PipelineConfig) -> str:
    """A folder per flow run, stable across retries of that run (checkpoints and splits live there)."""
    run_key = flow_run.get_id() or "adhoc"
    path = Path(config.training.output_dir) / str(run_key)
    path.mkdir(parents=True, exist_ok=True)
    return str(path.resolve())


# Cancelling or crashing the flow run must not leave a paid Azure job running.
@flow(
    name="finetune",
    log_prints=True,
    on_cancellation=[cancel_azure_job_on_cancel],
    on_crashed=[cancel_azure_job_on_cancel],
)
def finetune(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Fine-tune the base model on the chat data, evaluate against base and champion, register, deploy."""
    logger = get_run_logger()
    work_dir = _work_dir(config)
    data = validate_data(config, work_dir)
    run_id = open_run(config, data)
    summary: dict[str, Any] = {"mlflow_run_id": run_id, "data_digest": data["digest"]}
    try:
        if config.registry.skip_if_unchanged and (version := unchanged_champion(config, data["digest"])):
            logger.info("Champion v%s was trained on the same data and config: nothing to do.", version)
            close_run(config, run_id, "FINISHED", note=f"skipped: unchanged since champion v{version}")
            return {**summary, "skipped": True, "champion_version": version}
        if config.training.backend == "azure":
            summary.update(finetune_on_azure(config, data, run_id))
        else:
            summary.update(_finetune_locally(config, data, run_id, work_dir))
    except BaseException:
        close_run(config, run_id, "FAILED")
        raise
    close_run(config, run_id, "FINISHED")
    return summary


def _finetune_locally(config: PipelineConfig, data: dict[str, Any], run_id: str, work_dir: str) -> dict[str, Any]:
    """LoRA here (or on the GPU work pool), evaluation here, then the gate and a local/vLLM deployment."""
    if config.training.deployment:
        trained = train_on_deployment(config, data, run_id, work_dir)
    else:
        trained = train_adapter(config, data, run_id, work_dir)
    evaluation = evaluate_models(config, data, trained["adapter_dir"], run_id)
    registered = register_and_promote(config, run_id, trained, evaluation, data["digest"])
    result: dict[str, Any] = {"registered": registered, "evaluation": evaluation}
    if config.deployment.target != "none" and registered["promoted"]:
        result["endpoint"] = deploy_champion(config, f"models:/{config.registry.model_name}@champion")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the phitune fine-tuning pipeline in-process (a local Prefect run).")
    parser.add_argument("--config", "-c", help="pipeline config YAML (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.epochs=1")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        result = finetune(config)
    except PhituneError as err:
        print(f"phitune: error: {err}", file=sys.stderr)
        return err.exit_code
    print_summary(config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
