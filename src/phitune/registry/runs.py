"""One MLflow run per pipeline run: the lineage of a model version (config, data, code, template).

Everything is written through `MlflowClient` with the run id passed explicitly: Prefect runs tasks in
worker threads, and MLflow's fluent "active run" is per thread, so a run started in one task is not
active in the next.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from phitune.config import PipelineConfig
from phitune.digest import file_sha256
from phitune.registry import tags as T
from phitune.registry.store import configure

# Training settings that change where or how fast a run goes, not the model it produces.
_OPERATIONAL_TRAINING_FIELDS = frozenset({"output_dir", "checkpoint_every_steps", "deployment", "gradient_checkpointing"})
_BATCH = 100  # MLflow's limit of params (and a safe number of metrics) per log_batch


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"training.lora_r": "16", ...}; lists as JSON so they read back unambiguously."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def config_digest(cfg: PipelineConfig, data_digest: str) -> str:
    """sha256 of what determines the trained model: the data, the base model and the training settings."""
    training = {k: v for k, v in cfg.training.model_dump(mode="json").items() if k not in _OPERATIONAL_TRAINING_FIELDS}
    payload = {"data": data_digest, "model": cfg.model.model_dump(mode="json"), "training": training}
    if cfg.training.backend == "azure":  # the base model then is the Azure asset, and the job runs where configured
        payload["azure"] = {"model_id": cfg.azure.model_id, "compute": cfg.azure.compute}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git checkout the pipeline runs from, or None outside one (or before the first commit)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _dataset_input(path: str, name: str, context: str) -> DatasetInput:
    """A chat JSONL as an MLflow dataset input: schema and row count from pandas, digest from the file bytes."""
    import mlflow.data
    import pandas as pd

    file = Path(path).resolve()
    frame = pd.read_json(file, lines=True)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both candidates are the local-file source
        warnings.simplefilter("ignore", UserWarning)
        # MLflow stores at most 36 characters of digest.
        dataset = mlflow.data.from_pandas(frame, source=str(file), name=name, digest=file_sha256(file)[:32])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), _BATCH):
        yield items[i : i + _BATCH]


def open_run(cfg: PipelineConfig, data: Mapping[str, Any], extra_tags: Mapping[str, str] | None = None) -> str:
    """Create the pipeline's MLflow run: config as params, datasets as inputs, lineage tags, validation report.

    `data` is the validation stage's result: train_file, validation_file, digest, report_file.
    """
    from phitune.modeling import chat_template_hash, load_tokenizer

    store = configure(cfg.registry)
    client = store.client
    digest = data["digest"]
    run_tags = {
        T.DATA_DIGEST_TAG: digest,
        T.CONFIG_DIGEST_TAG: config_digest(cfg, digest),
        T.CHAT_TEMPLATE_TAG: chat_template_hash(load_tokenizer(cfg.model)),
        T.BASE_MODEL_TAG: base_model_ref(cfg),
        **(extra_tags or {}),
    }
    if commit := git_commit():
        run_tags[T.GIT_COMMIT_TAG] = commit
    run = client.create_run(store.experiment_id, run_name=f"{cfg.registry.model_name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=run_tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for chunk in _chunks(params):
        client.log_batch(run_id, params=chunk)
    inputs = [_dataset_input(data["train_file"], "train", "training")]
    if data.get("validation_file"):
        inputs.append(_dataset_input(data["validation_file"], "validation", "evaluation"))
    client.log_inputs(run_id, datasets=inputs)
    if data.get("report_file") and Path(data["report_file"]).is_file():
        client.log_artifact(run_id, data["report_file"], "validation")
    return run_id


def close_run(cfg: PipelineConfig, run_id: str, status: str = "FINISHED", note: str | None = None) -> None:
    """End the run (FINISHED, FAILED or KILLED), with an optional description shown in the MLflow UI."""
    client = configure(cfg.registry).client
    if note:
        client.set_tag(run_id, T.NOTE_TAG, note)
    client.set_terminated(run_id, status)


def log_evaluation(cfg: PipelineConfig, run_id: str, metrics: Mapping[str, Mapping[str, float]], rows: list[dict[str, Any]]) -> None:
    """Metrics as `<model>_<metric>` (base_macro_f1, candidate_perplexity, ...) and the per-example table."""
    import pandas as pd

    client = configure(cfg.registry).client
    now = int(time.time() * 1000)
    batch = [Metric(f"{model}_{key}", float(value), now, 0) for model, values in metrics.items() for key, value in values.items()]
    for chunk in _chunks(batch):
        client.log_batch(run_id, metrics=chunk)
    if rows:
        client.log_table(run_id, data=pd.DataFrame(rows), artifact_file="evaluation/examples.json")


def base_model_ref(cfg: PipelineConfig) -> str:
    """The base model as configured (not the local path it resolved to), pinned to its revision if any."""
    ref = cfg.model.base_model
    return f"{ref}@{cfg.model.revision}" if cfg.model.revision else ref


def set_run_tags(cfg: PipelineConfig, run_id: str, tags: Mapping[str, str]) -> None:
    client = configure(cfg.registry).client
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
