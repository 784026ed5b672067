"""Batched text generation for the local server: one worker thread, requests that arrive together share a batch.

Why a hand-written decoding loop instead of `model.generate`: every request in a batch has its own
max_tokens, temperature, top_p and stop strings, finishes on its own, and streams its tokens as they
come; `generate` streams only batch 1 and stops a batch as a whole. The loop left-pads the prompts,
prefills them in one forward pass, then decodes one token per step for every unfinished row, and drops
finished rows from the KV cache so a long answer never makes short ones pay for it.

The model runs in a single thread (torch uses its own intra-op threads): two generations at once on a
2-core CPU would only fight over the cores. The thread blocks on the queue, and after the first request
waits `batch_wait_s` (a few ms) for others, up to `max_batch_size`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phitune.errors import ModelNotFoundError
from phitune.modeling import eos_token_ids

log = logging.getLogger("phitune.serving")

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass
class LoadedModel:
    """A model ready to generate, and what it is (for /health, /v1/models and the registry)."""

    model: Any
    tokenizer: Any
    name: str  # the id clients see in /v1/models
    source: str  # what was asked for: a model URI, a folder or 'default'
    version: str | None = None  # registered model version, when loaded from the registry

    def sampling_defaults(self) -> tuple[float, float]:
        """(temperature, top_p) for a request that sets none: the model's generation config (greedy unless it samples)."""
        config = getattr(self.model, "generation_config", None)
        if config is None or not getattr(config, "do_sample", False):
            return 0.0, 1.0
        return float(config.temperature or 1.0), float(config.top_p or 1.0)


def _resolve_registered(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/3` -> (uri pinned to the version, name, version).

    The alias is resolved once, before loading, so the version reported is exactly the one served even
    if the alias moves while the weights load.
    """
    if not uri.startswith("models:/"):
        return uri, None, None
    from mlflow import MlflowClient

    from phitune.registry.versions import get_version

    mv = get_version(MlflowClient(), uri)
    return f"models:/{mv.name}/{mv.version}", mv.name, str(mv.version)


def load_model(source: str, tracking_uri: str | None = None) -> LoadedModel:
    """Load what `--model` names: an MLflow model URI, a local Hugging Face folder, 'default' or a hub id.

    A registered PEFT model (logged with `mlflow.transformers.log_model(..., base_model_path=...)`) comes
    back as a PeftModel on its base; the adapter is merged into the weights, which makes generation as
    fast as the base model's.
    """
    if source.startswith(MLFLOW_SCHEMES):
        import mlflow
        from mlflow.exceptions import MlflowException

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            pinned, name, version = _resolve_registered(source)
            parts = mlflow.transformers.load_model(pinned, return_type="components")
        except (MlflowException, OSError) as exc:
            raise ModelNotFoundError(f"cannot load {source} (tracking URI {mlflow.get_tracking_uri()}): {exc}") from None
        model, tokenizer = parts["model"], parts["tokenizer"]
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        name = name or source.rstrip("/").rsplit("/", 1)[-1]
    else:
        from phitune.modeling import load_base_model, load_tokenizer

        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().is_dir():
            raise ModelNotFoundError(f"--model {source}: no such model folder")
        tokenizer = load_tokenizer(source)
        model = load_base_model(source)
        name, version = Path(source).name if Path(source).expanduser().is_dir() else source, None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, version=version)


# Events a job's `emit` receives, in the worker thread: ("delta", text), then ("done", finish_reason,
# completion_tokens) or ("error", message). `emit` must be thread-safe (the server hops to its event loop).
Event = tuple[Any, ...]


@dataclass
class Job:
    """One chat completion request, as the generator sees it."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    cancelled: bool = False  # set by the server when the client goes away
    finished: bool = False  # set once "done" has been emitted


@dataclass
class _Row:
    """Decoding state of one job: tokens so far and how much text has been sent."""

    job: Job
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    rng: torch.Generator | None = None

    def push(self, token: int, tokenizer: Any, eos: frozenset[int]) -> bool:
        """Take one generated token, emit the text that is now final; True when the row is finished."""
        job = self.job
        if token in eos:
            return self._finish("stop", self._text(tokenizer), extra_tokens=1)
        self.tokens.append(token)
        text = self._text(tokenizer)
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            return self._finish("stop", text[: min(hits)])
        if len(self.tokens) >= job.max_tokens:
            return self._finish("length", text)
        # Hold back what could still become a stop string, and a half-decoded multi-byte character.
        safe = len(text) - (max(map(len, job.stop)) - 1 if job.stop else 0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > self.sent:
            job.emit(("delta", text[self.sent: safe]))
            self.sent = safe
        return False

    def _text(self, tokenizer: Any) -> str:
        return tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _finish(self, reason: str, text: str, extra_tokens: int = 0) -> bool:
        if len(text) > self.sent:
            self.job.emit(("delta", text[self.sent:]))
        self.job.emit(("done", reason, len(self.tokens) + extra_tokens))
        self.job.finished = True
        return True


def _pick(logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else a sample (temperature, top_p, per-row seed)."""
    picked = logits.argmax(dim=-1)
    for i, row in enumerate(rows):
        job = row.job
        if job.temperature <= 0:
            continue
        probs = torch.softmax(logits[i].float().cpu() / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > job.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        picked[i] = torch.multinomial(probs, 1, generator=row.rng).item()
    return picked


class _Batch:
    """The rows being decoded together: their KV cache, attention mask, last positions and next input tokens.

    New jobs join between steps (continuous batching): they are prefilled on their own, then their cache
    is left-padded to the batch's length (or the batch's to theirs) and concatenated along the batch
    dimension. Finished rows are dropped, and columns that only padding still occupies are trimmed.
    """

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, eos: frozenset[int], on_pass: Callable[[int], None]) -> None:
        self.model, self.tokenizer, self.pad_id, self.eos, self.on_pass = model, tokenizer, pad_id, eos, on_pass
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask = self.positions = self.tokens = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        """Joining pads and concatenates plain KV layers; other cache types (or a full sliding window) finish first."""
        return all(_editable(layer) for layer in self.cache.layers) if self.rows else True

    def admit(self, jobs: list[Job]) -> None:
        """Prefill `jobs`, take each one's first token, and merge the unfinished into the batch.

        Prompts of similar length are prefilled together, others apart: prefill is compute-bound, so
        batching it gains nothing, while left-padding a 50-token prompt to 130 would double its cost.
        """
        for group in _length_groups(jobs):
            self._admit(group)

    def _admit(self, jobs: list[Job]) -> None:
        device = self.model.device
        width = max(len(job.prompt) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: every row's next token goes in the same column
            ids[i, width - len(job.prompt):] = torch.tensor(job.prompt)
            mask[i, width - len(job.prompt):] = 1
        ids, mask = ids.to(device), mask.to(device)
        self.on_pass(len(jobs))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1)
        rows = [_Row(job, rng=_rng(job.seed)) for job in jobs]
        tokens = _pick(out.logits[:, -1, :], rows)
        keep = self._push(rows, tokens)
        if not keep:
            return
        index = torch.tensor(keep, device=device)
        cache = out.past_key_values
        if len(keep) < len(rows):
            cache.batch_select_indices(index)
        new_mask, new_positions = mask[index], torch.tensor([len(jobs[k].prompt) - 1 for k in keep], device=device)
        if not self.rows:
            self.cache, self.mask, self.positions, self.tokens = cache, new_mask, new_positions, tokens[index]
        else:
            length = max(self.mask.shape[1], new_mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                for name in ("keys", "values"):
                    setattr(mine, name, torch.cat([_left_pad(getattr(mine, name), length, -2),
                                                   _left_pad(getattr(theirs, name), length, -2)], dim=0))
                if mine.is_sliding:
                    mine.cumulative_length = length
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(new_mask, length, 1)], dim=0)
            self.positions = torch.cat([self.positions, new_positions])
            self.tokens = torch.cat([self.tokens, tokens[index]])
        self.rows += [rows[k] for k in keep]

    def step(self) -> None:
        """Decode one token for every row; drop the rows that finished."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        self.on_pass(len(self.rows))
        out = self.model(input_ids=self.tokens[:, None], attention_mask=self.mask, position_ids=self.positions[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.tokens = _pick(out.logits[:, -1, :], self.rows)
        keep = self._push(self.rows, self.tokens)
        if len(keep) < len(self.rows):
            self._select(keep)

    def _push(self, rows: list[_Row], tokens: torch.Tensor) -> list[int]:
        """Hand each row its token; the indices of the rows still going."""
        return [i for i, row in enumerate(rows)
                if not row.job.cancelled and not row.push(int(tokens[i]), self.tokenizer, self.eos)]

    def _select(self, keep: list[int]) -> None:
        self.rows = [self.rows[k] for k in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        # columns where every remaining row is padding cost attention time for nothing
        unused = int((self.mask.sum(0) == 0).cumprod(0).sum())
        if unused and self.can_join():
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
                if layer.is_sliding:
                    layer.cumulative_length = layer.keys.shape[-2]


def _length_groups(jobs: list[Job], waste: float = 0.25) -> list[list[Job]]:
    """Jobs grouped by prompt length so that left padding adds at most `waste` to a group's prefill."""
    groups: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: len(j.prompt)):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * len(job.prompt) <= (1 + waste) * (sum(len(j.prompt) for j in group) + len(job.prompt)):
            group.append(job)
        else:
            groups.append([job])
    return groups


def _editable(layer: Any) -> bool:
    """A layer whose keys/values hold exactly the whole sequence (so padding them is meaningful)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(layer) is DynamicLayer:
        return True
    return type(layer) is DynamicSlidingWindowLayer and layer.keys.shape[-2] == layer.cumulative_length < layer.sliding_window - 1


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `length` (masked positions: their values never matter)."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchingGenerator:
    """Owns the model's worker thread; `submit` queues a job, the thread batches and generates.

    `on_step(rows)` is called before every forward pass with the number of requests in it (the server
    exports it as a histogram: the proof that requests are generated together).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.on_step = on_step or (lambda rows: None)
        self.eos = frozenset(eos_token_ids(loaded.model, loaded.tokenizer))
        self.pad_id = loaded.tokenizer.pad_token_id
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="phitune-generator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running batch, fail what is still queued, end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(("error", "the server is shutting down"))

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _take(self, limit: int, wait_s: float = 0.0) -> list[Job]:
        """Up to `limit` queued jobs, waiting at most `wait_s` for each next one; notes a stop request."""
        jobs: list[Job] = []
        deadline = time.monotonic() + wait_s
        while len(jobs) < limit and not self._stopping:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if wait_s else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
            elif not job.cancelled:
                jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self._stopping:
            first = self._queue.get()
            if first is None:
                return
            owned = [first, *self._take(self.max_batch_size - 1, self.batch_wait_s)]
            try:
                with torch.inference_mode():
                    self._run(owned)
            except Exception as exc:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for job in owned:
                    if not job.finished:
                        job.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _run(self, owned: list[Job]) -> None:
        """Generate `owned` (the jobs of this batch; jobs that join later are appended to it)."""
        batch = _Batch(self.loaded.model, self.loaded.tokenizer, self.pad_id, self.eos, self.on_step)
        if jobs := [job for job in owned if not job.cancelled]:
            batch.admit(jobs)
        while batch:
            room = self.max_batch_size - len(batch)
            if room and self._queue.qsize() and batch.can_join() and (joining := self._take(room)):
                owned += joining
                batch.admit(joining)
            batch.step()


def _rng(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
