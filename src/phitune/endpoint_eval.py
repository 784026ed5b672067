"""Evaluate a model served behind an OpenAI-compatible endpoint on the held-out set.

Why: a model fine-tuned on Azure serverless cannot be downloaded; it can only be seen through its
endpoint. Its replies are scored by the same metric functions as local models (phitune.evaluation),
so the promotion gate compares like with like. An endpoint returns text, not the model's logits on
the reference reply, so the token-level metrics (NOT_MEASURED) cannot be computed remotely.

Requests are greedy (temperature 0) with the evaluation's max_new_tokens, a few at a time; throttling
(429) and transient server errors are retried with backoff (honouring Retry-After), as Azure asks. A
prompt the platform's content filter blocks (HTTP 400 error.code content_filter, or finish_reason
content_filter) is scored as an empty reply and counted; any other error stops the evaluation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from phitune.azure.errors import classify_azure_error
from phitune.errors import EndpointError
from phitune.evaluation import Example, generation_metrics
from phitune.probes import chat_url

NOT_MEASURED = ("eval_loss", "perplexity", "token_accuracy")
"""Metrics that need the model's logits on the reference reply: not available through a chat endpoint."""
RETRIED = ("throttled", "server_error", "connection")
MAX_RETRY_WAIT_S = 60.0


@dataclass
class EndpointEvaluation:
    metrics: dict[str, float]
    replies: list[str]
    filtered: list[int]
    """Indices of the examples whose prompt or reply the platform's content filter blocked (scored as empty)."""
    seconds: float


def _retry_after(resp: httpx.Response | None, attempt: int) -> float:
    header = resp.headers.get("retry-after") if resp is not None else None
    try:
        wait = float(header) if header is not None else 2.0**attempt
    except ValueError:
        wait = 2.0**attempt
    return min(max(wait, 0.0), MAX_RETRY_WAIT_S)


def _reply(client: httpx.Client, url: str, body: dict, headers: dict[str, str], retries: int) -> str | None:
    """The assistant text, or None when the content filter blocked it; EndpointError on anything else."""
    attempt = 0
    while True:
        resp = None
        try:
            resp = client.post(url, json=body, headers=headers)
            kind, detail = classify_azure_error(resp.status_code, resp.content), f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.TransportError as exc:
            kind, detail = "connection", f"{type(exc).__name__}: {exc}"
        if kind == "ok":
            try:
                choice = resp.json()["choices"][0]
                return None if choice.get("finish_reason") == "content_filter" else str(choice["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError):
                raise EndpointError(f"{url}: not a chat.completion: {resp.text[:200]!r}") from None
        if kind == "content_filter":
            return None
        if kind not in RETRIED or attempt == retries:
            raise EndpointError(f"{url}: {detail}" + (f" (after {attempt + 1} attempts)" if attempt else ""))
        time.sleep(_retry_after(resp, attempt))
        attempt += 1


def evaluate_endpoint(
    examples: Sequence[Example],
    base_url: str,
    *,
    api_key: str | None,
    max_new_tokens: int,
    model: str | None = None,
    timeout_s: float = 60.0,
    concurrency: int = 4,
    retries: int = 4,
) -> EndpointEvaluation:
    """Ask the endpoint for a greedy reply to each example's prompt and score the replies.

    `base_url` as the probes take it (`.../v1/chat/completions` is appended, or `/chat/completions`
    after a `/v1`); the key goes in `Authorization: Bearer`, never into a log or an error message.
    """
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()

    failed = threading.Event()

    def ask(ex: Example) -> str | None:
        if failed.is_set():  # after a failure, send none of the requests still queued
            raise EndpointError(f"{url}: not sent, an earlier request failed")
        body = {"messages": ex.messages[:-1], "max_tokens": max_new_tokens, "temperature": 0, **({"model": model} if model else {})}
        try:
            return _reply(client, url, body, headers, retries)
        except EndpointError:
            failed.set()
            raise

    # pool.map raises the first failure in example order; requests started after it have later indices.
    with httpx.Client(timeout=httpx.Timeout(timeout_s)) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(ask, examples))
    replies = [(a or "").strip() for a in answers]
    filtered = [i for i, a in enumerate(answers) if a is None]
    return EndpointEvaluation(generation_metrics(examples, replies), replies, filtered, time.perf_counter() - start)
