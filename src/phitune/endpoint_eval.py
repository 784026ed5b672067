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

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from phitune.chat_client import ChatError, chat_url, complete
from phitune.errors import EndpointError
from phitune.evaluation import Example, generation_metrics

NOT_MEASURED = ("eval_loss", "perplexity", "token_accuracy")
"""Metrics that need the model's logits on the reference reply: not available through a chat endpoint."""


@dataclass
class EndpointEvaluation:
    metrics: dict[str, float]
    replies: list[str]
    filtered: list[int]
    """Indices of the examples whose prompt or reply the platform's content filter blocked (scored as empty)."""
    seconds: float


async def _replies(
    examples: Sequence[Example], base_url: str, api_key: str | None, max_new_tokens: int, model: str | None,
    timeout_s: float, concurrency: int, retries: int,
) -> list[str | None]:
    """Each example's reply (None: the content filter blocked it); the first other error cancels the rest."""
    slots = asyncio.Semaphore(concurrency)

    async def ask(http: httpx.AsyncClient, ex: Example) -> str | None:
        body = {"messages": ex.messages[:-1], "max_tokens": max_new_tokens, "temperature": 0, **({"model": model} if model else {})}
        async with slots:
            try:
                return await complete(http, base_url, body, api_key=api_key, timeout_s=timeout_s, retries=retries)
            except ChatError as exc:
                if exc.kind == "content_filter":
                    return None
                raise EndpointError(f"{chat_url(base_url)}: {exc}") from None

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as http:
        try:
            async with asyncio.TaskGroup() as group:  # a failure cancels the requests still queued or running
                tasks = [group.create_task(ask(http, ex)) for ex in examples]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


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
    `timeout_s` bounds each request; `retries` applies to throttling, server errors, timeouts and
    connection errors.
    """
    start = time.perf_counter()
    answers = asyncio.run(_replies(examples, base_url, api_key, max_new_tokens, model, timeout_s, concurrency, retries))
    replies = [(a or "").strip() for a in answers]
    filtered = [i for i, a in enumerate(answers) if a is None]
    return EndpointEvaluation(generation_metrics(examples, replies), replies, filtered, time.perf_counter() - start)
