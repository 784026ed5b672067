"""The pipeline configuration: one pydantic model per stage, loaded from YAML, overridable on the CLI.

The same models are the Prefect flow parameters, so the Prefect UI renders them as a form with the
descriptions below, and a bad value is rejected with the field named. Every default works on the
embedded default (SmolLM2-135M-Instruct on a 2-core CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phitune.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

DEFAULT_MODEL = "default"
"""The sentinel for the embedded default model (SmolLM2-135M-Instruct, provisioned by `phitune model pull-default`)."""


class _Section(BaseModel):
    # forbid: a misspelt key is an error that names it, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train_file: str = Field("data/support/train.jsonl", description="Training chat JSONL (one `{\"messages\": [...]}` per line).")
    validation_file: str | None = Field(
        "data/support/validation.jsonl",
        description="Held-out chat JSONL used for validation loss and evaluation. Empty: split it off the training file.",
    )
    validation_split: float = Field(0.15, gt=0, lt=1, description="Fraction of the training file held out when no validation file is given.")
    split_seed: int = Field(42, description="Seed of the automatic validation split (same seed, same split).")
    min_examples: int = Field(10, ge=1, description="Fewer valid training examples than this is an error (too_few_examples).")
    max_file_mb: int = Field(512, ge=1, description="Largest accepted file in MB of 10^6 bytes (Azure's fine-tuning limit is 512 MB).")
    docs_dir: str = Field(".phitune/data-docs", description="Where Great Expectations Data Docs of each validation are written.")


class ModelConfig(_Section):
    base_model: str = Field(
        DEFAULT_MODEL,
        description="Base model: 'default' (embedded SmolLM2-135M-Instruct), a Hugging Face hub id "
        "(e.g. microsoft/Phi-3-mini-4k-instruct) or a local folder with config, weights and tokenizer.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) to pin the base model to.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (not needed for Phi-3 on transformers>=4.40).")


class TrainingConfig(_Section):
    backend: Literal["local", "azure"] = Field("local", description="Where fine-tuning runs: 'local' (LoRA here or on an own GPU host) or 'azure' (Azure AI Foundry / Azure ML job).")
    epochs: int = Field(3, ge=1, le=100, description="Number of epochs (passes over the training data).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak learning rate of the LoRA parameters.")
    batch_size: int = Field(8, ge=1, le=1024, description="Examples per optimizer step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. 0 is ~2x faster on CPU and fine for small data.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get LoRA adapters, or [all-linear] for every linear layer but the LM head (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj).",
    )
    max_seq_length: int = Field(512, ge=16, le=131072, description="Longest example in tokens (chat template included); longer is an error (too_many_tokens).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear learning-rate warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: no clipping).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding, faster; order stays seeded-random).")
    seed: int = Field(42, description="Random seed (data order, LoRA initialisation).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="'auto': bf16 on CUDA/CPUs that support it, else fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else CPU.")
    num_threads: int | None = Field(None, ge=1, description="CPU threads per training process. Empty: one per available CPU (fewer helps only on a CPU shared with other jobs, or for tiny models).")
    gradient_checkpointing: bool = Field(False, description="Trade ~20% speed for ~45% less activation memory.")
    checkpoint_every_steps: int = Field(10, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    output_dir: str = Field(".phitune/runs", description="Where checkpoints and adapters are written.")
    init_adapter: str | None = Field(None, description="Continue fine-tuning from this adapter instead of a fresh LoRA: a registered model URI (models:/phitune-support@champion, models:/NAME/VERSION) or a local adapter folder. Its own LoRA shape (r, alpha, target modules) is kept.")
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) for `accelerate launch`; >1 runs data-parallel.")
    deployment: str | None = Field(
        None,
        description="Run training as a run of this Prefect deployment (e.g. 'train/gpu' on the GPU work pool) instead of in-process.",
    )


class EvaluationConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Greedy generation budget per held-out example.")
    batch_size: int = Field(8, ge=1, description="Examples generated together.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on the first N held-out examples only.")
    compare_champion: bool = Field(True, description="Also evaluate the current champion on the same held-out set.")


class RegistryConfig(_Section):
    tracking_uri: str = Field("sqlite:///.phitune/mlflow.db", description="MLflow tracking URI (sqlite, postgresql+psycopg2://..., or http://host:port).")
    artifact_location: str = Field(".phitune/mlartifacts", description="Artifact root of new experiments (a folder or an object-store URI).")
    experiment: str = Field("phitune", description="MLflow experiment of the pipeline runs.")
    model_name: str = Field("phitune-support", description="Registered model name.")
    promotion_metric: Literal["label_accuracy", "macro_f1", "rougeL", "perplexity", "eval_loss", "token_accuracy"] = Field(
        "macro_f1", description="Metric the promotion gate compares (perplexity and eval_loss: lower is better)."
    )
    promotion_margin: float = Field(0.02, ge=0, description="The candidate must beat base and champion by at least this much on the promotion metric.")
    skip_if_unchanged: bool = Field(True, description="Skip training when the data digest and config equal the champion's.")


class DeploymentConfig(_Section):
    target: Literal["local", "azure", "vllm", "none"] = Field("local", description="Where the champion is served: 'local' (phitune serve), 'azure' (serverless endpoint), 'vllm' (GPU host), 'none'.")
    endpoint_name: str = Field("phitune-support", description="Name of the endpoint (recorded on the model version in the registry).")
    host: str = Field("127.0.0.1", description="Interface a local endpoint binds to.")
    port: int = Field(0, ge=0, le=65535, description="Port of a local endpoint; 0 picks a free one (blue/green needs a fresh port per version).")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the endpoint's API key (never the key itself).")
    max_batch_size: int = Field(8, ge=1, description="Requests generated together by the local server.")
    max_new_tokens: int = Field(256, ge=1, description="Upper bound on max_tokens a client may ask for.")
    probes_file: str = Field("configs/probes/support.yaml", description="Probe set (YAML) run as the smoke test after deployment.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body a local endpoint accepts (larger: HTTP 413).")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long a new endpoint may take to load its model and report healthy.")
    log_dir: str = Field(".phitune/endpoints", description="Where local endpoint processes write their logs.")
    num_threads: int | None = Field(
        1, ge=1,
        description="CPU threads of a local endpoint's model. 1: steady on a CPU shared with training or other endpoints "
        "(with more, every operation waits for threads the OS has descheduled: measured 4-25x slower here). "
        "Empty: one per core, for a machine that runs nothing else.",
    )


class MonitoringConfig(_Section):
    probes_file: str = Field("configs/probes/support.yaml", description="Probe set (YAML) sent to every live endpoint.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one probe request.")
    slo_pass_rate: float = Field(0.8, ge=0, le=1, description="Breach when the pass rate over the window falls below this.")
    slo_p95_latency_s: float = Field(20.0, gt=0, description="Breach when p95 latency over the window exceeds this.")
    window_runs: int = Field(3, ge=1, description="Rolling window (monitoring runs) the SLO is judged over.")
    experiment: str = Field("phitune-monitoring", description="MLflow experiment of monitoring runs.")
    on_breach: Literal["rollback", "retrain", "none"] = Field("rollback", description="What the automation does on an SLO breach.")


class AzureConfig(_Section):
    subscription_id: str = Field("", description="Azure subscription id.")
    resource_group: str = Field("", description="Resource group of the hub-based project.")
    workspace: str = Field("", description="Azure AI Foundry project (Azure ML workspace) name.")
    region: str = Field("eastus2", description="Region of the workspace (Phi-3 serverless fine-tuning was documented for East US 2).")
    model_id: str = Field(
        "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15",
        description="Base model asset id in an Azure ML registry.",
    )
    output_model_prefix: str = Field("phitune", description="Prefix of what phitune names in Azure: data assets (<prefix>-train, <prefix>-validation), jobs and fine-tuned models.")
    compute: str | None = Field(None, description="A GPU compute cluster for managed-compute fine-tuning; empty means serverless.")
    experiment: str = Field("phitune", description="Azure ML experiment the fine-tuning jobs are grouped under.")
    poll_interval_s: float = Field(30.0, gt=0, description="First wait between two status reads of the Azure job; grows by 1.5x while the status is unchanged.")
    poll_max_interval_s: float = Field(300.0, gt=0, description="Longest wait between two status reads of the Azure job.")
    job_timeout_h: float = Field(24.0, gt=0, description="Give up waiting for the Azure job after this many hours (the job keeps running; cancel it in the portal or let the flow's cancel hook do it).")
    price_per_1k_training_tokens: float | None = Field(
        None, ge=0, description="Your price per 1,000 trained tokens (tokens x epochs), to turn the pre-flight cost drivers into an estimate in your currency. Empty: drivers only."
    )


class PipelineConfig(_Section):
    """Everything one pipeline run needs; the Prefect form of `finetune/on-demand`."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    azure: AzureConfig = Field(default_factory=AzureConfig)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per bad field: where, what, and (for choices) the allowed values pydantic lists."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}{got_txt}")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values are parsed as YAML scalars/lists (`a,b` is a list)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and "," in value and not raw.strip().startswith(("'", '"')):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _set_dotted(tree, key.strip(), value)
    return tree


def load_model(
    cls: type[Model], path: str | Path | None = None, overrides: list[str] | None = None,
    default_path: str | Path | None = None,
) -> Model:
    """Read a YAML file into `cls`, apply `key.sub=value` overrides, validate; ConfigError naming every bad field.

    `path` must exist; without it `default_path` is read when it exists, else the defaults are the start.
    Every config file goes through here, so each fails the same clear way.
    """
    if path is None and default_path is not None and Path(default_path).exists():
        path = default_path
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping (keys: {', '.join(cls.model_fields)})")
        tree = loaded or {}
    apply_overrides(tree, overrides or [])
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path or "config"))) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline config YAML (or the defaults), apply overrides, validate."""
    return load_model(PipelineConfig, path, overrides)
