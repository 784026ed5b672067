"""The one client of OpenAI-compatible chat endpoints, and the one taxonomy of what goes wrong there.

Probes, smoke tests, the monitor and endpoint evaluation all ask through `complete`, so everywhere a
dead endpoint (connection), a hanging one (timeout), a broken one (http_5xx, bad_payload), a throttled
one (HTTP 429) and a filtered prompt (content_filter: HTTP 400 with error.code "content_filter", as
Azure answers, or finish_reason "content_filter") are told apart the same way.

Why httpx rather than the official `openai` client: that client hands back a 200 answer that is not
JSON as a plain string and ends a stream cut off before `data: [DONE]` silently, where both are a
bad_payload here; it wants an API key even for a local endpoint and otherwise reads OPENAI_API_KEY from
the environment (which would send that key to whatever endpoint is probed); and its timeouts are per
read, so a server that trickles bytes could stretch them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

ERROR_CLASSES = ("timeout", "connection", "http_4xx", "http_5xx", "content_filter", "bad_payload", "throttled")
RETRIED = ("timeout", "connection", "http_5xx", "throttled")
"""Error classes worth another attempt: the same request may well succeed a moment later."""
MAX_RETRY_WAIT_S = 60.0
_FILTER_CODES = {"content_filter", "responsibleaipolicyviolation"}  # Azure's code, and its inner code


class ChatError(Exception):
    """Why a request got no usable answer; `kind` is one of ERROR_CLASSES. The message never holds the API key."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if it said


def chat_url(base_url: str) -> str:
    """`http://host:port` or `.../v1` (as the openai client takes it) -> the chat completions URL."""
    base = base_url.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def _error_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        error = resp.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):  # absent, or an HTTP date: back off on our own schedule
        return None


def _error_from_response(resp: httpx.Response) -> ChatError:
    """The ChatError of an answer that is not HTTP 200."""
    error = _error_object(resp)
    inner = error.get("innererror")
    codes = {str(error.get("code", "")).lower(), str(inner.get("code", "")).lower() if isinstance(inner, dict) else ""}
    message = error.get("message") or resp.text[:200]
    status = resp.status_code
    if 400 <= status < 500 and codes & _FILTER_CODES:
        return ChatError("content_filter", f"HTTP {status} content_filter: {message}", status)
    if status == 429:
        return ChatError("throttled", f"HTTP 429: {message}", status, _retry_after(resp))
    if 400 <= status < 500:
        return ChatError("http_4xx", f"HTTP {status}: {message}", status)
    if status >= 500:
        return ChatError("http_5xx", f"HTTP {status}: {message}", status, _retry_after(resp))
    return ChatError("bad_payload", f"unexpected HTTP {status}", status)


def _content(body: Any) -> str:
    """The assistant text of a chat.completion."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ChatError("bad_payload", f"not a chat.completion: {json.dumps(body)[:200]}", 200) from None
    if choice.get("finish_reason") == "content_filter":
        raise ChatError("content_filter", "finish_reason content_filter", 200)
    if not isinstance(text, str):
        raise ChatError("bad_payload", "message.content is not a string", 200)
    return text


async def _read_stream(resp: httpx.Response) -> str:
    """Assemble a server-sent-event stream of chat.completion.chunk; it must end with `data: [DONE]`."""
    parts: list[str] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return "".join(parts)
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ChatError("bad_payload", f"a stream event is not JSON: {data[:100]!r}", 200) from None
        if "error" in chunk:
            raise ChatError("http_5xx", f"error in stream: {chunk['error']}", 200)
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason") == "content_filter":
                raise ChatError("content_filter", "finish_reason content_filter", 200)
            parts.append((choice.get("delta") or {}).get("content") or "")
    raise ChatError("bad_payload", "the stream ended without `data: [DONE]`", 200)


async def _send(http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> str:
    if not body.get("stream"):
        resp = await http.post(url, json=body, headers=headers)
        if resp.status_code != 200:
            raise _error_from_response(resp)
        try:
            return _content(resp.json())
        except ValueError:
            raise ChatError("bad_payload", f"the answer is not JSON: {resp.text[:200]!r}", 200) from None
    async with http.stream("POST", url, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise _error_from_response(resp)
        return await _read_stream(resp)


async def _attempt(http: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> str:
    """One request under a hard deadline (asyncio.timeout: a server that trickles bytes cannot stretch it)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _send(http, url, body, headers)
    except (TimeoutError, httpx.TimeoutException):
        raise ChatError("timeout", f"no answer within {timeout_s:g} s") from None
    except httpx.TransportError as exc:
        raise ChatError("connection", f"{type(exc).__name__}: {exc}") from None


async def complete(
    http: httpx.AsyncClient, base_url: str, body: dict[str, Any], *,
    api_key: str | None = None, timeout_s: float = 30.0, retries: int = 0,
) -> str:
    """The assistant's reply to one chat request (`body` as OpenAI's API takes it), or ChatError.

    Errors of a RETRIED class are retried up to `retries` times, after the server's Retry-After when it
    sends one, else after 1, 2, 4 ... s (at most MAX_RETRY_WAIT_S). The key goes in `Authorization: Bearer`.
    """
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    attempt = 0
    while True:
        try:
            return await _attempt(http, url, body, headers, timeout_s)
        except ChatError as exc:
            if exc.kind not in RETRIED or attempt == retries:
                if attempt:
                    raise ChatError(exc.kind, f"{exc} (after {attempt + 1} attempts)", exc.status) from None
                raise
            wait = exc.retry_after if exc.retry_after is not None else 2.0**attempt
        await asyncio.sleep(min(max(wait, 0.0), MAX_RETRY_WAIT_S))
        attempt += 1
