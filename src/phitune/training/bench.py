"""`phitune bench train`: phitune's LoRA loop against a stock trl SFTTrainer recipe, same data and steps, one run.

The baseline is what a user would otherwise write: trl's SFTTrainer with a typical recipe (fp32,
lora_dropout 0.05, randomly drawn batches padded to their longest example), fed the very same token
ids and assistant-only labels as phitune, with the same LoRA rank/alpha/targets, batch size,
learning rate, schedule, steps and thread count. Each variant runs in a fresh process (so its peak
RSS is its own); throughput counts real (non-pad) tokens over steps 2..N (step 1 builds the kernels),
timed between consecutive step ends, so data loading is included on both sides.

Fraction of peak: the machine's matmul GFLOP/s in the precision phitune trains in (bf16 where the
CPU has it natively, else fp32: emulated bf16 is slower than fp32, and measuring it takes minutes),
measured in the same run and converted to a token ceiling at 4 x (model parameters) FLOPs per token
(forward 2N, backward through the frozen weights 2N; LoRA's own cost is ~1%). Timings are
reported, never asserted.

On a CPU shared with other jobs, wall-clock figures swing by 10x (OpenMP threads wait on each other
when preempted). Each figure is therefore also given per CPU-second of the process, and
`OMP_NUM_THREADS=1 phitune bench train` makes those close to what one idle core would give.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

BATCH_SIZE = 8
STEPS = {False: 25, True: 4}  # full: one epoch of the 200-example sample data
VALIDATION_EXAMPLES = 16  # phitune's gates need a validation set; its evaluation is not timed
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _steady(ends: list[tuple[float, float]], cumulative: list[int]) -> dict[str, float]:
    """Real tokens per second (and per CPU-second of this process) over steps 2..N.

    `ends`: (wall, process CPU) times at each step's end; `cumulative`: real tokens so far at each step.
    With one thread, tokens per CPU-second is close to what an idle machine would give, whatever else
    runs on it; with more threads it also counts OpenMP's busy waiting.
    """
    if len(ends) < 2:
        return {"tokens_per_second": 0.0, "tokens_per_cpu_second": 0.0}
    tokens = cumulative[-1] - cumulative[0]
    return {
        "tokens_per_second": tokens / (ends[-1][0] - ends[0][0]),
        "tokens_per_cpu_second": tokens / (ends[-1][1] - ends[0][1]),
    }


def matmul_gflops(dtype_name: str, size: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-`repeats` GFLOP of a square matmul per second and per CPU-second, in this process's thread setting."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: oneDNN picks and builds its kernel
    wall = cpu = float("inf")
    for _ in range(repeats):
        start = _now()
        a @ b
        end = _now()
        wall, cpu = min(wall, end[0] - start[0]), min(cpu, end[1] - start[1])
    flop = 2 * size**3 / 1e9
    return {"per_second": flop / wall, "per_cpu_second": flop / cpu}


def _baseline(model_dir: str, train_file: str, steps: int, learning_rate: float, warmup_ratio: float, seed: int, threads: int) -> dict[str, Any]:
    """trl SFTTrainer, fp32, lora_dropout 0.05, padded random batches; same tokens and labels as phitune."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from phitune.training.data import load_chats

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_chats(Path(train_file), tokenizer, 4096)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ends: list[tuple[float, float]] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ends.append(_now())

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=BATCH_SIZE, max_steps=steps, learning_rate=learning_rate,
            lr_scheduler_type="linear", warmup_steps=math.ceil(warmup_ratio * steps), seed=seed, bf16=False, fp16=False, use_cpu=True,
            gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
            max_length=None, disable_tqdm=True,
        )
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[StepEnds()])
        trainer.train()
    logs = [h for h in trainer.state.log_history if "num_tokens" in h and "loss" in h]
    cumulative = [int(h["num_tokens"]) for h in logs]
    return {
        **_steady(ends, cumulative),
        "train_tokens": cumulative[-1],
        "final_loss": sum(h["loss"] for h in logs[-5:]) / len(logs[-5:]),
        "peak_rss_gb": _peak_rss_gb(),
    }


def _phitune(train_file: str, validation_file: str, work_dir: str, steps: int, threads: int) -> dict[str, Any]:
    """phitune's loop with its defaults (which is what `make run` trains with)."""
    from phitune.config import PipelineConfig
    from phitune.training.local import train

    cfg = PipelineConfig.model_validate({"training": {"max_steps": steps, "batch_size": BATCH_SIZE, "checkpoint_every_steps": 10_000, "num_threads": threads}})
    ends: list[tuple[float, float]] = []
    cumulative: list[int] = []
    losses: list[float] = []

    def record(step: dict[str, Any]) -> None:
        ends.append(_now())
        cumulative.append(step["tokens"])
        losses.append(step["loss"])

    result = train(cfg, Path(train_file), Path(validation_file), Path(work_dir), on_step=record)
    m = result.metrics
    return {
        **_steady(ends, cumulative),
        "train_tokens": m["train_tokens"],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "padding_fraction": m["padding_fraction"],
        "precision": m["precision"],
        "threads": m["threads"],
        "peak_rss_gb": _peak_rss_gb(),
    }


def _parameters(model_dir: str) -> int:
    """Parameters of the saved model (tied embeddings are stored, and counted, once)."""
    from safetensors import safe_open

    with safe_open(f"{model_dir}/model.safetensors", "pt") as weights:
        return sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())


def _in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"    {name}: {r['tokens_per_second']:.0f} real tokens/s ({r['tokens_per_cpu_second']:.0f} per CPU-second), "
        f"peak RSS {r['peak_rss_gb']:.1f} GB, loss over the last 5 steps {r['final_loss']:.3f}"
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Train the embedded default on the sample data with the baseline and with phitune; print and return the figures."""
    from phitune import default_model
    from phitune.config import PipelineConfig
    from phitune.training.device import pick_runtime, set_cpu_threads

    if not default_model.is_ready():
        print("bench train: the embedded default model is not provisioned; run `phitune model pull-default` first.")
        return {"skipped": "default model not provisioned"}
    defaults = PipelineConfig()
    train_file = Path(defaults.data.train_file)
    if not train_file.is_file():
        print(f"bench train: {train_file} not found (run from the repository root).")
        return {"skipped": f"{train_file} not found"}
    t = defaults.training
    steps = STEPS[quick]
    threads = set_cpu_threads()  # the trainer's own choice (OMP_NUM_THREADS, else the CPUs unless they are contended)
    model_dir = str(default_model.default_model_path())
    size = 1024 if quick else 2048
    precision = pick_runtime(t).precision  # what phitune's defaults train in on this machine
    peak = {name: matmul_gflops(name, size) for name in dict.fromkeys((precision, "fp32"))}
    params = _parameters(model_dir)
    flop_per_token = 4 * params
    ceiling = peak[precision]["per_second"] * 1e9 / flop_per_token

    print(f"bench train: SmolLM2-135M-Instruct, {steps} steps x batch {BATCH_SIZE}, {train_file}, {threads} thread(s) each", flush=True)
    print("  baseline: trl SFTTrainer, fp32, lora_dropout 0.05, padded random batches ...", flush=True)
    baseline = _in_fresh_process(_baseline, model_dir, str(train_file), steps, t.learning_rate, t.warmup_ratio, t.seed, threads)
    print(_line("baseline", baseline), flush=True)
    mixed = "bf16 autocast + bf16 frozen weights" if precision == "bf16" else f"{precision} (no native bf16 on this CPU)"
    print(f"  phitune: {mixed}, dropout 0, length-grouped batches, logits only at labels, matmul attention ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        validation = Path(tmp) / "validation.jsonl"
        source = Path(defaults.data.validation_file) if defaults.data.validation_file else train_file
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:VALIDATION_EXAMPLES]
        validation.write_text("\n".join(lines) + "\n", encoding="utf-8")
        ours = _in_fresh_process(_phitune, str(train_file), str(validation), str(Path(tmp) / "run"), steps, threads)
    print(_line("phitune", ours) + f", {ours['precision']}, padding {100 * ours['padding_fraction']:.1f}%", flush=True)

    speedup = ours["tokens_per_second"] / baseline["tokens_per_second"]
    cpu_speedup = ours["tokens_per_cpu_second"] / baseline["tokens_per_cpu_second"]
    fraction = ours["tokens_per_second"] / ceiling
    cpu_fraction = ours["tokens_per_cpu_second"] * flop_per_token / (peak[precision]["per_cpu_second"] * 1e9)
    print(f"  speed-up over the baseline: {speedup:.2f}x ({cpu_speedup:.2f}x per CPU-second); goal >= 2x")
    print(
        f"  matmul peak ({threads} thread(s)): "
        + ", ".join(f"{name} {gflops['per_second']:.0f}" for name, gflops in peak.items()) + " GFLOP/s "
        f"-> ceiling {ceiling:.0f} tokens/s at 4 x {params / 1e6:.0f}M FLOPs/token; phitune at {100 * fraction:.0f}% of it "
        f"({100 * cpu_fraction:.0f}% per CPU-second); goal >= 60%"
    )
    return {
        "steps": steps, "batch_size": BATCH_SIZE, "threads": threads, "baseline": baseline, "phitune": ours,
        "speedup": speedup, "speedup_per_cpu_second": cpu_speedup, "matmul_gflops": peak, "model_parameters": params,
        "peak_precision": precision, "ceiling_tokens_per_second": ceiling, "fraction_of_peak": fraction, "fraction_of_peak_per_cpu_second": cpu_fraction,
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
