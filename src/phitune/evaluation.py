"""Evaluate the base model, the candidate adapter and the champion adapter on the same held-out chats.

Per model: loss, perplexity and mean token accuracy on the assistant tokens (the quantity training
optimises), and generation metrics against the reference reply (the last assistant turn): for the
sample task the label accuracy and macro-F1 of the generated `Category: <label>` line, plus ROUGE-L.

The base model is loaded once; the adapters are attached to it with peft and switched in place
(`set_adapter`, `disable_adapter` for the base model). Three models then cost one model's memory and
one load, and every model sees bit-identical base weights.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phitune.chat import collate, encode_chat, prompt_ids
from phitune.config import EvaluationConfig, PipelineConfig
from phitune.errors import DataError
from phitune.loss import assistant_loss
from phitune.modeling import eos_token_ids

_LABEL_LINE = re.compile(r"^\s*category\s*:\s*(.+?)\s*$", re.IGNORECASE)


@dataclass
class Example:
    messages: list[dict[str, Any]]
    reference: str  # content of the last assistant turn
    label: str | None  # parsed from the reference; None when the reply has no category line


@dataclass
class EvaluationResult:
    metrics: dict[str, dict[str, float]]  # model name ("base", "candidate", ...) -> metric -> value
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per example, all models side by side
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why (sentences)
    not_measured: dict[str, list[str]] = field(default_factory=dict)  # model -> metrics it has not


@dataclass(frozen=True)
class Served:
    """A model reachable only through an OpenAI-compatible endpoint (an Azure serverless fine-tune)."""

    name: str  # the endpoint's, for notes
    base_url: str
    api_key: str | None = field(default=None, repr=False)


def load_examples(path: str | Path, max_examples: int | None = None) -> list[Example]:
    """Held-out chats from JSONL; each must end with the assistant reply generation is scored against."""
    examples = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{path}:{lineno}: the last message must be the assistant reply to evaluate against")
            reference = messages[-1]["content"]
            examples.append(Example(messages, reference, parse_label(reference)))
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise DataError(f"{path}: no examples to evaluate on")
    return examples


def parse_label(text: str) -> str | None:
    """The label of a reply whose first line is `Category: <label>` (case-insensitive), else None."""
    first = text.strip().split("\n", 1)[0]
    match = _LABEL_LINE.match(first)
    if match is None:
        return None
    return match.group(1).rstrip(".").strip().casefold() or None


def label_metrics(references: Sequence[str | None], predictions: Sequence[str | None]) -> dict[str, float]:
    """Accuracy and macro-F1 over the labels found in the references; empty when no reference has one.

    An unparseable prediction (None) or one outside the reference label set is simply wrong: it costs
    recall of the true class and, not being a class, adds no false positive to any.
    """
    from sklearn.metrics import f1_score

    pairs = [(ref, pred) for ref, pred in zip(references, predictions, strict=True) if ref is not None]
    if not pairs:
        return {}
    labels = sorted({ref for ref, _ in pairs})
    y_true = [ref for ref, _ in pairs]
    y_pred = [pred if pred is not None else "\0unparsed" for _, pred in pairs]
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / len(pairs)
    macro_f1 = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {"label_accuracy": accuracy, "macro_f1": float(macro_f1)}


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per pair (rouge-score's tokenizer: lower-cased alphanumeric words)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions, strict=True)]


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def loss_metrics(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int) -> dict[str, float]:
    """Token-weighted mean loss over all assistant tokens, its perplexity, and mean token accuracy."""
    encoded = [encode_chat(tokenizer, ex.messages) for ex in examples]
    # Similar lengths together: less padding, same result (padding is masked).
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    device = next(model.parameters()).device
    total_loss, tokens, correct = 0.0, 0, 0
    with torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], tokenizer.pad_token_id).items()}
            result = assistant_loss(model, batch)
            total_loss += float(result.loss) * result.tokens
            tokens += result.tokens
            correct += result.correct
    if tokens == 0:
        raise DataError("the held-out set has no assistant tokens to evaluate")
    eval_loss = total_loss / tokens
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0)), "token_accuracy": correct / tokens}


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, batched; each cut before its first stop token.

    Prompts are left-padded so every row's next token follows its own last prompt token; the cut is
    needed because a finished row keeps receiving padding while the others continue.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    continuations: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for idx in _batches(order, batch_size):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(prompts[i])
                input_ids[row, width - n :] = torch.tensor(prompts[i])
                attention_mask[row, width - n :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=stops or None, pad_token_id=pad_id,
            )
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                continuations[i] = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
    return continuations


def generate(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy replies to each example's prompt (its history without the final assistant turn)."""
    prompts = [prompt_ids(tokenizer, ex.messages) for ex in examples]
    return [
        tokenizer.decode(ids, skip_special_tokens=True).strip()
        for ids in generate_ids(model, tokenizer, prompts, batch_size, max_new_tokens)
    ]


def generation_metrics(examples: Sequence[Example], replies: Sequence[str]) -> dict[str, float]:
    """Label accuracy and macro-F1 of the `Category:` line, and mean ROUGE-L, of replies to `examples`.

    Shared with endpoint evaluation (phitune.endpoint_eval), where only the replies are available.
    """
    metrics = label_metrics([ex.label for ex in examples], [parse_label(r) for r in replies])
    scores = rouge_l([ex.reference for ex in examples], replies)
    metrics["rougeL"] = sum(scores) / len(scores)
    return metrics


def evaluate_model(model: Any, tokenizer: Any, examples: Sequence[Example], cfg: EvaluationConfig) -> tuple[dict[str, float], list[str]]:
    """All metrics of one model (as currently configured) and its generated replies."""
    metrics = loss_metrics(model, tokenizer, examples, cfg.batch_size)
    replies = generate(model, tokenizer, examples, cfg.batch_size, cfg.max_new_tokens)
    metrics.update(generation_metrics(examples, replies))
    return metrics, replies


def _switcher(base_model: Any, adapters: Mapping[str, str | None]) -> tuple[Any, Callable[[str], AbstractContextManager[Any]]]:
    """Attach every adapter to the one base model; return the model and a context that activates one by name."""
    named = {name: path for name, path in adapters.items() if path is not None}
    if not named:
        return base_model, lambda _name: nullcontext()
    from peft import PeftModel

    (first, first_path), *rest = named.items()
    model = PeftModel.from_pretrained(base_model, first_path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    model.eval()

    def use(name: str) -> AbstractContextManager[Any]:
        if adapters[name] is None:
            return model.disable_adapter()
        model.set_adapter(name)
        return nullcontext()

    return model, use


def evaluate_models(
    base_model: Any, tokenizer: Any, examples: Sequence[Example], adapters: Mapping[str, str | None], cfg: EvaluationConfig
) -> EvaluationResult:
    """Evaluate each named model: None is the base model itself, a path a PEFT adapter folder on top of it.

    `base_model` is modified in place (adapter layers are injected); don't reuse it afterwards.
    """
    model, use = _switcher(base_model, adapters)
    metrics: dict[str, dict[str, float]] = {}
    replies: dict[str, list[str]] = {}
    for name in adapters:
        with use(name):
            metrics[name], replies[name] = evaluate_model(model, tokenizer, examples, cfg)
    return EvaluationResult(metrics, example_rows(examples, replies))


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA in bf16 where available; else the CPU in fp32 (bf16 generation is slower than fp32 on CPUs)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def evaluate_files(cfg: PipelineConfig, validation_file: str | Path, adapters: Mapping[str, str | None]) -> EvaluationResult:
    """Load the held-out file and the base model once (through phitune.modeling) and evaluate every model."""
    return _evaluate_local(cfg, load_examples(validation_file, cfg.evaluation.max_examples), adapters)


def _evaluate_local(cfg: PipelineConfig, examples: Sequence[Example], adapters: Mapping[str, str | None]) -> EvaluationResult:
    from phitune.modeling import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    device, dtype = pick_device()
    base_model = load_base_model(cfg.model, dtype=dtype, device=device)
    return evaluate_models(base_model, tokenizer, examples, adapters, cfg.evaluation)


def evaluate_all(
    cfg: PipelineConfig, validation_file: str | Path, local: Mapping[str, str | None], served: Mapping[str, Served]
) -> EvaluationResult:
    """Every model on the same held-out examples, each where it can be run: the evaluation stage's core.

    `local`: name -> None (the base model) or a PEFT adapter folder, evaluated here with every metric.
    `served`: name -> an endpoint, scored on its replies with the same generation metrics (an endpoint
    returns no logits, so the loss metrics are listed in `not_measured`). When the candidate is served
    and the base model cannot be loaded here, that is a note, not a failure: the gate then says the
    candidate could not be shown to beat the base model.
    """
    from phitune.endpoint_eval import NOT_MEASURED, evaluate_endpoint
    from phitune.errors import ModelNotFoundError

    examples = load_examples(validation_file, cfg.evaluation.max_examples)
    metrics: dict[str, dict[str, float]] = {}
    replies: dict[str, list[str]] = {}
    notes: list[str] = []
    not_measured: dict[str, list[str]] = {}
    try:
        result = _evaluate_local(cfg, examples, local)
    except ModelNotFoundError as exc:
        if "candidate" in local:  # it was just trained on this base model: a real failure
            raise
        notes.append(f"base model not evaluated: model.base_model {cfg.model.base_model!r} cannot be loaded here ({exc})")
    else:
        metrics.update(result.metrics)
        replies.update({name: [row[f"{name}_generated"] for row in result.rows] for name in local})
    for name, endpoint in served.items():
        got = evaluate_endpoint(examples, endpoint.base_url, api_key=endpoint.api_key, max_new_tokens=cfg.evaluation.max_new_tokens,
                                timeout_s=cfg.monitoring.timeout_s)
        metrics[name], replies[name], not_measured[name] = got.metrics, got.replies, list(NOT_MEASURED)
        notes.append(f"{name} evaluated through endpoint {endpoint.name} in {got.seconds:.1f} s: generation metrics only "
                     f"({', '.join(NOT_MEASURED)} need the model's logits, which an endpoint does not return)")
        if got.filtered:
            notes.append(f"{name}: {len(got.filtered)} of {len(examples)} held-out prompts were blocked by the content filter "
                         "(scored as empty replies)")
    return EvaluationResult(metrics, example_rows(examples, replies), notes, not_measured)


def example_rows(examples: Sequence[Example], replies: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The per-example table: prompt, reference and each model's reply and label, side by side."""
    rows = []
    for i, ex in enumerate(examples):
        user = next((m["content"] for m in reversed(ex.messages[:-1]) if m.get("role") == "user"), "")
        row: dict[str, Any] = {"prompt": user, "reference": ex.reference, "reference_label": ex.label}
        for name, texts in replies.items():
            row[f"{name}_generated"] = texts[i]
            row[f"{name}_label"] = parse_label(texts[i])
        rows.append(row)
    return rows
