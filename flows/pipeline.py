"""The `finetune` flow: validate -> train -> register -> evaluate -> gate -> deploy (smoke test included).

The flow only wires stages; each stage is one task module over one core module (docs/architecture.md):

    validate   tasks/validate.py   the data contract, the automatic validation split
    train      tasks/train.py      the candidate from training.backend: local LoRA (here or on the GPU pool) or Azure
    register   tasks/register.py   the candidate as a model version; later the promotion gate
    evaluate   tasks/evaluate.py   base, candidate and champion on the held-out set, as weights or through an endpoint
    deploy     tasks/deploy.py     blue/green on deployment.target, smoke test, the replaced endpoint stopped

A candidate that exists only on Azure can be evaluated only through an endpoint, so it is deployed
as the challenger before evaluation; an endpoint that does not end up serving the champion never
outlives the run. One pipeline run is one MLflow run; stages hand each other references (file paths,
the MLflow run id, model URIs), so any stage can run on another machine and a retried flow run picks
up where it stopped: completed tasks are cached and training resumes from its last checkpoint.

Run it:  python flows/pipeline.py --config configs/demo-cpu.yaml [key.sub=value ...]
Deploy:  see prefect.yaml (finetune/on-demand, finetune/nightly).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.report import print_summary, run_cli
from phitune.config import PipelineConfig
from tasks.azure import cancel_azure_job_on_cancel
from tasks.deploy import deploy_challenger, deploy_champion, ensure_served, remove_endpoint
from tasks.evaluate import evaluate_models
from tasks.register import close_run, open_run, promotion_gate, register_candidate, unchanged_champion
from tasks.train import train_candidate
from tasks.validate import validate_data


def _work_dir(config: PipelineConfig) -> str:
    """A folder per flow run, stable across retries of that run (checkpoints and splits live there)."""
    path = Path(config.training.output_dir) / str(flow_run.get_id() or "adhoc")
    path.mkdir(parents=True, exist_ok=True)
    return str(path.resolve())


# Cancelling or crashing the flow run must not leave a paid Azure job running.
@flow(name="finetune", log_prints=True, on_cancellation=[cancel_azure_job_on_cancel], on_crashed=[cancel_azure_job_on_cancel])
def finetune(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """Fine-tune the base model on the chat data, evaluate against base and champion, register, deploy."""
    work_dir = _work_dir(config)
    data = validate_data(config, work_dir)
    run_id = open_run(config, data)
    summary: dict[str, Any] = {"mlflow_run_id": run_id, "data_digest": data["digest"]}
    serve = config.deployment.target != "none"
    try:
        if config.registry.skip_if_unchanged and (version := unchanged_champion(config, data["digest"])):
            summary.update(skipped=True, champion_version=version)
            if serve:  # skipping training is not skipping serving: the champion must be live
                summary["endpoint"] = ensure_served(config, version)
            close_run(config, run_id, "FINISHED", note=f"skipped: unchanged since champion v{version}")
            return summary
        candidate = train_candidate(config, data, run_id, work_dir)
        registered = register_candidate(config, run_id, candidate, data["digest"])
        challenger = deploy_challenger(config, registered) if serve and candidate["location"] == "azure" else None
        try:
            evaluation = evaluate_models(config, data, candidate, run_id, endpoint=challenger)
            registered = promotion_gate(config, run_id, registered, evaluation)
            endpoint = deploy_champion(config, registered) if serve and registered["promoted"] else None
        except BaseException:
            if challenger is not None:  # a failed clean-up is logged by its task and must not hide this failure
                remove_endpoint(config, challenger, return_state=True)
            raise
        if challenger is not None and endpoint is None:
            remove_endpoint(config, challenger)
        summary.update(candidate=candidate, registered=registered, evaluation=evaluation)
        if endpoint is not None:
            summary["endpoint"] = endpoint
    except BaseException:
        close_run(config, run_id, "FAILED")
        raise
    close_run(config, run_id, "FINISHED")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(finetune, print_summary, "Run the phitune fine-tuning pipeline in-process (a local Prefect run)."))
