"""Local LoRA fine-tuning: one loop for the CPU (embedded default), one GPU, or several GPUs (DDP).

A hand-written loop (transformers + peft + accelerate) rather than trl's SFTTrainer, because the
speed on a small CPU comes from things a stock trainer does not do together (`phitune bench train`
measures the difference on the same data and steps):

- bf16 autocast where the hardware has bf16, with the frozen base weights stored in bf16 (no
  per-step weight casts, half the memory) and the LoRA weights kept in fp32 as the master copy;
- logits and loss only at labelled (assistant) positions (`phitune.loss.assistant_loss`);
- batches of similar length (`data.batch_order`), so little of each batch is padding;
- on the CPU, plain matmul attention for short sequences (PyTorch's fused CPU attention has a slow
  backward), and one thread per CPU unless the CPU is contended (`device.set_cpu_threads`);
- LoRA dropout 0 by default, no KV cache in training passes.

The run lives in `work_dir`: checkpoints every `training.checkpoint_every_steps` steps, the final
adapter in `work_dir/adapter`. When `work_dir` already has a checkpoint, training resumes from it
(adapter, optimizer, scheduler, RNG, step; the data order is a function of seed and epoch) and
ends at the same number of steps. Sanity gates stop a run with a TrainingError: non-finite loss or
gradients, no trainable tokens, and a validation loss no better than the base model's.

Multi-GPU: `training.num_processes > 1` re-launches the run under torchrun (DDP through accelerate's
Accelerator, a no-op on one process); or launch it yourself:
    accelerate launch --multi_gpu --num_processes 2 -m phitune.training.local -c CONFIG --run-id RUN
    torchrun --standalone --nproc-per-node 2 -m phitune.training.local -c CONFIG --run-id RUN
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from phitune.chat import EncodedChat, collate
from phitune.config import PipelineConfig, load_config
from phitune.errors import ConfigError, DataError, ModelNotFoundError, TrainingError
from phitune.loss import assistant_loss
from phitune.training import checkpoint
from phitune.training.data import batch_order, load_chats, padded_fraction
from phitune.training.device import Runtime, pick_runtime, set_cpu_threads

log = logging.getLogger(__name__)

ADAPTER = "adapter"
RESULT_FILE = "training_result.json"
STEPS_FILE = "steps.jsonl"
EAGER_ATTENTION_MAX_TOKENS = 512
StepCallback = Callable[[dict[str, Any]], None]

# Settings that change where or how often a run is saved, not what it computes: a run may resume with other values.
_NOT_IDENTITY = {
    "backend", "device", "precision", "num_processes", "num_threads", "gradient_checkpointing", "checkpoint_every_steps", "output_dir", "deployment",
}


@dataclass
class TrainResult:
    adapter_dir: Path
    base_model: str  # the resolved base: a local folder or a hub id
    metrics: dict[str, Any]


class _AssistantLoss(torch.nn.Module):
    """The model with phitune's loss as its forward, so that DDP (which syncs gradients in forward) wraps the loss."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        result = assistant_loss(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
        return result.loss, result.tokens


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- model


def _init_adapter_dir(cfg: PipelineConfig) -> Path | None:
    """The adapter to continue from: a registered version (fetched from MLflow) or a local folder."""
    ref = cfg.training.init_adapter
    if not ref:
        return None
    if ref.startswith("models:/"):
        from phitune.registry import fetch_adapter

        return Path(fetch_adapter(ref, cfg.registry.tracking_uri))
    path = Path(ref).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"training.init_adapter: {ref!r} is neither a model URI (models:/NAME@alias, models:/NAME/VERSION) "
            "nor a folder with adapter_config.json"
        )
    return path


def _lora_model(base: Any, cfg: PipelineConfig, adapter_dir: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    t = cfg.training
    targets: str | list[str] = "all-linear" if t.target_modules == ["all-linear"] else list(t.target_modules)
    if targets != "all-linear":
        # peft trains whatever subset matches; a name that matches nothing (Llama names on Phi-3) is a config error.
        linear = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [name for name in targets if name not in linear]
        if missing:
            raise ConfigError(
                f"training.target_modules: {missing} are not linear layers of {cfg.model.base_model!r} "
                f"(it has {sorted(linear)}); list some of those, or use all-linear"
            )
    lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def _frozen_weights_to(model: Any, dtype: torch.dtype) -> None:
    """Store frozen linear weights in the autocast dtype: autocast would otherwise cast them at every use.

    Embeddings, norms and the trainable LoRA weights stay fp32; so does an LM head tied to the
    input embeddings (casting it would make the whole residual stream bf16).
    """
    embedding = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and module.weight is not embedding:
            module.to(dtype)


def build_model(cfg: PipelineConfig, runtime: Runtime, longest: int) -> Any:
    """The base model with LoRA adapters (fresh, seeded, or from training.init_adapter), on the CPU.

    `longest`: the longest training example in tokens. On the CPU, short sequences train ~20% faster
    with plain matmul attention than with PyTorch's fused CPU kernel (whose backward is slow);
    beyond EAGER_ATTENTION_MAX_TOKENS its memory (batch x heads x length^2 per layer) is not worth it.
    """
    from phitune.modeling import load_base_model

    # On a GPU the base is loaded in the compute dtype directly (a 3.8B Phi-3 in fp32 would not fit next to it).
    base = load_base_model(cfg.model, dtype=runtime.dtype if runtime.device == "cuda" else torch.float32)
    base.config.use_cache = False  # training passes never reuse keys/values
    if runtime.device == "cpu" and longest <= EAGER_ATTENTION_MAX_TOKENS:
        base.set_attn_implementation("eager")
    if cfg.training.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter_dir = _init_adapter_dir(cfg)
    torch.manual_seed(cfg.training.seed)  # LoRA initialisation
    model = _lora_model(base, cfg, adapter_dir)
    if runtime.precision != "fp32":
        _frozen_weights_to(model, runtime.dtype)
    return model


# ---------------------------------------------------------------- helpers


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_loss(model: Any, examples: list[EncodedChat], batch_size: int, pad_id: int, runtime: Runtime, device: torch.device) -> float:
    """Mean loss per assistant token over the examples (batched by length; the mean does not depend on order)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad(), runtime.autocast():
        for start in range(0, len(order), batch_size):
            batch = _to(collate([examples[i] for i in order[start : start + batch_size]], pad_id), device)
            result = assistant_loss(model, batch)
            total += float(result.loss) * result.tokens
            tokens += result.tokens
    model.train(was_training)
    return total / tokens if tokens else math.nan


def _require_labels(examples: list[EncodedChat], path: Path) -> None:
    if sum(e.trainable_tokens for e in examples) == 0:
        raise TrainingError(
            f"{path}: zero trainable tokens: none of its {len(examples)} conversations has an assistant turn "
            "(the loss is taken on assistant replies only, so there is nothing to learn or to validate on)"
        )


def _identity(cfg: PipelineConfig, train_file: Path, validation_file: Path) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: the computation, the base and the data."""
    from phitune.digest import file_sha256

    return {
        "training": cfg.training.model_dump(mode="json", exclude=_NOT_IDENTITY),
        "model": cfg.model.model_dump(mode="json"),
        "train_sha256": file_sha256(Path(train_file)),
        "validation_sha256": file_sha256(Path(validation_file)),
    }


def _check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if changed:
        raise TrainingError(
            f"{path} is a checkpoint of a different run (changed since: {', '.join(changed)}); "
            "resume with the same config and data, or use another run id / work folder"
        )


def _save_adapter(model: Any, work_dir: Path, result: dict[str, Any]) -> Path:
    """Write the final adapter (and the run's result) to work_dir/adapter atomically."""
    final = work_dir / ADAPTER
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=work_dir))
    try:
        model.save_pretrained(tmp)
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- training


def train(
    cfg: PipelineConfig,
    train_file: Path,
    validation_file: Path,
    work_dir: Path,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on chat JSONL; resume from work_dir's last checkpoint if it has one.

    on_step receives {step, total_steps, epoch, loss, learning_rate, grad_norm, tokens_per_second,
    tokens} after every optimizer step (tokens: real, non-pad tokens so far; tokens_per_second: this
    step's). Raises TrainingError from the sanity gates, DataError/ConfigError for bad inputs.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    from phitune.modeling import load_tokenizer, resolve_base_model

    t = cfg.training
    train_file, validation_file, work_dir = Path(train_file), Path(validation_file), Path(work_dir)
    if t.num_processes > 1 and _world_size() == 1:
        return _launch_distributed(cfg, train_file, validation_file, work_dir, on_step)
    runtime = pick_runtime(t)
    accelerator = Accelerator(cpu=runtime.device == "cpu")
    world, device = accelerator.num_processes, accelerator.device
    if t.batch_size % world:
        raise ConfigError(f"training.batch_size ({t.batch_size}) must be a multiple of the number of processes ({world})")
    threads = set_cpu_threads(t.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if runtime.device == "cpu" else None
    work_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(cfg.model)
    train_set = load_chats(train_file, tokenizer, t.max_seq_length)
    val_set = load_chats(validation_file, tokenizer, t.max_seq_length)
    _require_labels(train_set, train_file)
    _require_labels(val_set, validation_file)
    lengths = [len(e.input_ids) for e in train_set]
    steps_per_epoch = len(batch_order(lengths, t.batch_size, t.seed, 0, t.group_by_length, world))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    identity = _identity(cfg, train_file, validation_file)

    model = build_model(cfg, runtime, max(lengths))
    loss_module = accelerator.prepare_model(_AssistantLoss(model))  # moves to the device; DDP when world > 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(runtime.device, enabled=runtime.precision == "fp16")

    checkpoint.sweep_partial(work_dir)
    resume_from = checkpoint.latest(work_dir)
    if resume_from is not None:
        _check_identity(checkpoint.read_state(resume_from)["identity"], identity, resume_from)
        state = checkpoint.load(resume_from, model, optimizer, scheduler, scaler)
        log.info("resuming from %s (step %d of %d)", resume_from, state["step"], total_steps)
    else:
        with model.disable_adapter():
            base_loss = eval_loss(model, val_set, t.batch_size, tokenizer.pad_token_id, runtime, device)
        if not math.isfinite(base_loss):
            raise TrainingError(f"the base model's validation loss is {base_loss} on {validation_file}: its weights or precision ({runtime.precision}) are broken")
        state = {"identity": identity, "step": 0, "base_eval_loss": base_loss, "train_tokens": 0, "labelled_tokens": 0, "loss_sum": 0.0, "seconds": 0.0}
    start_step = state["step"]
    log.info(
        "training %s on %s/%s (%s thread(s), %d process(es)): steps %d..%d of %d, %d per epoch",
        cfg.model.base_model, runtime.device, runtime.precision, threads, world, start_step + 1, total_steps, total_steps, steps_per_epoch,
    )

    rank = accelerator.process_index
    steps_file = work_dir / STEPS_FILE
    batches, batches_epoch = [], -1
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        began = time.perf_counter()
        epoch, index = divmod(step - 1, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = batch_order(lengths, t.batch_size, t.seed, epoch, t.group_by_length, world), epoch
        local = [train_set[i] for i in batches[index][rank::world]]
        batch = _to(collate(local, tokenizer.pad_token_id), device)
        with runtime.autocast():
            loss, labelled = loss_module(**batch)
        # One reduction gives every process the global token-weighted loss, so all of them stop on a bad one.
        totals = torch.tensor([float(loss.detach()) * labelled, labelled, int(batch["attention_mask"].sum())], dtype=torch.float64, device=device)
        totals = accelerator.reduce(totals, "sum") if world > 1 else totals
        loss_sum, labelled_total, real_tokens = float(totals[0]), int(totals[1]), int(totals[2])
        step_loss = loss_sum / labelled_total if labelled_total else 0.0
        learning_rate = scheduler.get_last_lr()[0]
        if not math.isfinite(step_loss):
            raise TrainingError(
                f"step {step}/{total_steps}: the training loss is {step_loss} (not finite): the run diverged. "
                f"Lower training.learning_rate (now {t.learning_rate:g}){' or use bf16' if runtime.precision == 'fp16' else ''}; "
                f"last checkpoint: {checkpoint.latest(work_dir) or 'none'}"
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm) and runtime.precision != "fp16":  # fp16: the scaler skips the step instead
            raise TrainingError(
                f"step {step}/{total_steps}: the gradient norm is {grad_norm} (not finite) at loss {step_loss:.4g}: the run diverged. "
                f"Lower training.learning_rate (now {t.learning_rate:g})"
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - began

        state.update(
            step=step,
            train_tokens=state["train_tokens"] + real_tokens,
            labelled_tokens=state["labelled_tokens"] + labelled_total,
            loss_sum=state["loss_sum"] + loss_sum,
            seconds=state["seconds"] + seconds,
        )
        record = {
            "step": step, "total_steps": total_steps, "epoch": round(step / steps_per_epoch, 4), "loss": step_loss,
            "learning_rate": learning_rate, "grad_norm": grad_norm, "tokens_per_second": real_tokens / seconds,
            "tokens": state["train_tokens"],
        }
        if accelerator.is_main_process:
            with steps_file.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if on_step is not None:
                on_step(record)
        if step % t.checkpoint_every_steps == 0 or step == total_steps:
            if accelerator.is_main_process:
                checkpoint.save(work_dir, step, model, optimizer, scheduler, scaler, state)
            accelerator.wait_for_everyone()

    final_loss = eval_loss(model, val_set, t.batch_size, tokenizer.pad_token_id, runtime, device)
    metrics = {
        "base_eval_loss": state["base_eval_loss"],
        "eval_loss": final_loss,
        "train_loss": state["loss_sum"] / max(1, state["labelled_tokens"]),
        "steps": total_steps,
        "epochs": round(total_steps / steps_per_epoch, 4),
        "train_tokens": state["train_tokens"],
        "labelled_tokens": state["labelled_tokens"],
        "tokens_per_second": state["train_tokens"] / state["seconds"] if state["seconds"] else 0.0,
        "seconds": state["seconds"],
        "padding_fraction": padded_fraction(lengths, batch_order(lengths, t.batch_size, t.seed, 0, t.group_by_length, world)),
        "resumed_from_step": start_step,
        "device": runtime.device,
        "precision": runtime.precision,
        "num_processes": world,
        "threads": threads,
    }
    base_model = resolve_base_model(cfg.model)
    adapter_dir = work_dir / ADAPTER
    if accelerator.is_main_process:
        _save_adapter(model, work_dir, {"base_model": base_model, "metrics": metrics})
    accelerator.wait_for_everyone()
    if not math.isfinite(final_loss):
        raise TrainingError(f"the validation loss after training is {final_loss} (not finite); the adapter is at {adapter_dir}")
    if final_loss >= state["base_eval_loss"]:
        raise TrainingError(
            f"validation loss did not improve on the base model: {final_loss:.4f} after {total_steps} steps vs "
            f"{state['base_eval_loss']:.4f} before training ({validation_file}). Train longer (training.epochs), "
            f"adjust training.learning_rate (now {t.learning_rate:g}), or check that training and validation data "
            f"are the same task. The adapter is kept at {adapter_dir}"
        )
    return TrainResult(adapter_dir, base_model, metrics)


# ---------------------------------------------------------------- multi-process launch


def _launch_distributed(cfg: PipelineConfig, train_file: Path, validation_file: Path, work_dir: Path, on_step: StepCallback | None) -> TrainResult:
    """Run this training under torchrun with training.num_processes workers; relay the main worker's steps."""
    import yaml

    work_dir.mkdir(parents=True, exist_ok=True)
    launch = cfg.model_copy(deep=True)
    launch.data.train_file, launch.data.validation_file = str(train_file.resolve()), str(validation_file.resolve())
    launch.training.output_dir = str(work_dir.resolve().parent)
    config_file = work_dir / "launch-config.yaml"
    config_file.write_text(yaml.safe_dump(launch.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.training.num_processes}",
           "-m", "phitune.training.local", "--config", str(config_file), "--run-id", work_dir.name]
    log.info("launching: %s", " ".join(cmd))
    steps_file = work_dir / STEPS_FILE
    offset = steps_file.stat().st_size if steps_file.exists() else 0
    errors: list[str] = []

    def echo(stream: Any) -> None:
        for line in stream:
            sys.stderr.write(line)
            if line.startswith("phitune: error:"):
                errors.append(line.removeprefix("phitune: error:").strip())

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=echo, args=(proc.stderr,), daemon=True)
    reader.start()

    def relay() -> None:
        nonlocal offset
        if not steps_file.exists():
            return
        with steps_file.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.splitlines():
            if on_step is not None:
                on_step(json.loads(line))

    while proc.poll() is None:
        relay()
        time.sleep(0.5)
    reader.join()
    relay()
    if proc.returncode != 0:
        raise TrainingError(errors[-1] if errors else f"distributed training ({' '.join(cmd)}) exited with status {proc.returncode}")
    result = json.loads((work_dir / ADAPTER / RESULT_FILE).read_text(encoding="utf-8"))
    return TrainResult(work_dir / ADAPTER, result["base_model"], result["metrics"])


# ---------------------------------------------------------------- CLI


def prepare_data(cfg: PipelineConfig, work_dir: Path, progress: bool = False) -> tuple[Path, Path]:
    """Validate the configured files against the data contract; split off a validation file if none is given."""
    from phitune.data.contract import validate_files
    from phitune.data.split import split_train_validation

    train_file = Path(cfg.data.train_file)
    validation_file = Path(cfg.data.validation_file) if cfg.data.validation_file else None
    report = validate_files(train_file, validation_file, cfg, progress=progress)
    if not report.valid:
        if _is_main():
            print(report.render_table(), file=sys.stderr)
        raise DataError(f"{report.summary()}; fix the data (`phitune validate {train_file}` lists every issue)")
    if validation_file is not None:
        return train_file, validation_file
    # Every process of a multi-process run splits (the split is deterministic) into its own folder and
    # renames the files into place, so none ever reads a half-written file.
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    own = Path(tempfile.mkdtemp(prefix=".split-", dir=data_dir))
    try:
        parts = split_train_validation(train_file, own, cfg.data.validation_split, cfg.data.split_seed)
        for part in parts:
            os.replace(part, data_dir / part.name)
    finally:
        shutil.rmtree(own, ignore_errors=True)
    return data_dir / "train.jsonl", data_dir / "validation.jsonl"


class _ProgressBar:
    """on_step for the CLI: a tqdm bar (steps, loss, learning rate, tokens/s) on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, record: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=record["total_steps"], initial=record["step"] - 1, unit="step", desc="train", dynamic_ncols=True, disable=None)
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", tok_s=f"{record['tokens_per_second']:.0f}", refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cli_train(args: argparse.Namespace) -> int:
    """`phitune train [-c CONFIG] [k=v ...] [--run-id ID]`: validate, split, fine-tune; print the adapter folder."""
    logger = logging.getLogger("phitune")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    cfg = load_config(args.config, args.overrides)
    if _world_size() > 1 and not args.run_id:
        raise ConfigError("--run-id is required under torchrun / accelerate launch, so that all processes share one run folder")
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    work_dir = Path(cfg.training.output_dir) / run_id
    train_file, validation_file = prepare_data(cfg, work_dir, progress=_is_main() and sys.stderr.isatty())
    bar = _ProgressBar()
    try:
        result = train(cfg, train_file, validation_file, work_dir, on_step=bar if _is_main() else None)
    finally:
        bar.close()
    if _is_main():
        m = result.metrics
        print(
            f"trained {m['steps']} steps in {m['seconds']:.0f} s ({m['tokens_per_second']:.0f} tokens/s, {m['device']}/{m['precision']}); "
            f"validation loss {m['base_eval_loss']:.4f} -> {m['eval_loss']:.4f}",
            file=sys.stderr,
        )
        print(result.adapter_dir)
    return 0


if __name__ == "__main__":  # `accelerate launch -m phitune.training.local ...` / `torchrun ... -m phitune.training.local ...`
    from phitune.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
