"""Probe sets (the YAML schema, the checks) and the chat client's error classes and retries, against real
HTTP endpoints on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from serving_support import dead_url, hanging_endpoint, running, wait_until

from phitune.chat_client import ERROR_CLASSES, ChatError, complete
from phitune.probes import (
    ProbeSet,
    ProbeSetError,
    SmokeTestFailed,
    Target,
    check,
    load_probe_set,
    probe_many,
    run_probes,
    smoke_test,
)

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Category: billing\nReply: I've refunded the second charge of $12.99."


def fake_endpoint() -> FastAPI:
    """An OpenAI-style endpoint whose behaviour is chosen by the first path segment of the base URL."""
    app = FastAPI()

    def completion(content: str, finish: str = "stop") -> dict:
        return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                          "finish_reason": finish}]}

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str, body: dict) -> object:
        if mode == "ok":
            if body.get("stream"):
                async def events():
                    for part in ("Category: bil", "ling\nReply: ok"):
                        yield f"data: {json.dumps({'choices': [{'delta': {'content': part}}]})}\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return completion(ANSWER)
        if mode == "refuse":
            return completion("I'm sorry, but I can't share another customer's account details.")
        if mode == "filter":
            return JSONResponse({"error": {"message": "The response was filtered", "type": None, "param": "prompt",
                                           "code": "content_filter", "status": 400}}, status_code=400)
        if mode == "filter-inner":  # Azure AI Content Safety's own code, inside the error
            return JSONResponse({"error": {"message": "blocked", "code": "BadRequest",
                                           "innererror": {"code": "ResponsibleAIPolicyViolation"}}}, status_code=400)
        if mode == "filtered-finish":
            return completion("", finish="content_filter")
        if mode == "e401":
            return JSONResponse({"error": {"message": "bad key", "code": "invalid_api_key"}}, status_code=401)
        if mode == "e429":
            return JSONResponse({"error": {"message": "rate limit"}}, status_code=429, headers={"Retry-After": "7"})
        if mode == "e503":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        if mode == "nochoices":
            return {"object": "chat.completion", "choices": []}
        if mode == "stream-cut":
            async def cut():
                yield f"data: {json.dumps({'choices': [{'delta': {'content': 'Cat'}}]})}\n\n"
            return StreamingResponse(cut(), media_type="text/event-stream")
        if mode == "slow":
            await asyncio.sleep(1.0)
            return completion(ANSWER)
        return JSONResponse({"detail": "unknown mode"}, status_code=418)

    return app


@pytest.fixture(scope="module")
def fake() -> str:
    with running(fake_endpoint()) as url:
        yield url


def one(probe: dict, **set_fields: object) -> ProbeSet:
    return ProbeSet.model_validate({"name": "t", "probes": [{"id": "p", "prompt": "hi", **probe}], **set_fields})


def test_the_support_probe_set_loads() -> None:
    probe_set = load_probe_set(ROOT / "configs/probes/support.yaml")
    labels = {p.expected_label for p in probe_set.probes if p.expected_label}
    assert labels == {"billing", "connectivity", "account", "hardware", "shipping", "feature_request"}
    assert probe_set.messages(probe_set.probes[0])[0]["role"] == "system"


def test_schema_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "probes:\n"
        "  - id: ok\n"
        "    prompt: hi\n"
        "  - id: broken-regex\n"
        "    prompt: hi\n"
        "    must_match: '(unclosed'\n"
        "  - id: typo\n"
        "    prompt: hi\n"
        "    must_contian: [x]\n"
        "  - id: no-query\n",
        encoding="utf-8",
    )
    with pytest.raises(ProbeSetError) as info:
        load_probe_set(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 7: probes[1].must_match (id 'broken-regex'): Value error, not a valid regular expression" in message
    assert "line 10: probes[2].must_contian (id 'typo'): unknown field" in message
    assert "probes[3] (id 'no-query')" in message and "exactly one of `prompt` or `messages`" in message
    with pytest.raises(ProbeSetError, match="not valid YAML"):
        path.write_text("name: [unclosed\n", encoding="utf-8")
        load_probe_set(path)
    with pytest.raises(ProbeSetError, match="cannot read"):
        load_probe_set(tmp_path / "missing.yaml")
    with pytest.raises(ProbeSetError, match="unique"):
        path.write_text("name: d\nprobes:\n  - {id: a, prompt: x}\n  - {id: a, prompt: y}\n", encoding="utf-8")
        load_probe_set(path)


@pytest.mark.parametrize(
    ("probe", "output", "latency", "failures"),
    [
        ({"expected_label": "billing"}, ANSWER, 0.1, []),
        ({"expected_label": "shipping"}, ANSWER, 0.1, ["expected label 'shipping', got 'billing'"]),
        ({"expected_label": "billing"}, "Sure! Here you go", 0.1, ["expected label 'billing', got None"]),
        ({"must_contain": "Reply:"}, ANSWER, 0.1, []),
        ({"must_contain": ["Reply:", "SKY-1"]}, ANSWER, 0.1, ["must contain 'SKY-1'"]),
        ({"must_match": r"^Reply: I've"}, ANSWER, 0.1, []),  # multiline: ^ matches the second line
        ({"must_match": r"\AReply"}, ANSWER, 0.1, [r"does not match /\AReply/"]),
        ({"must_refuse": True}, "I cannot share that information.", 0.1, []),
        ({"must_refuse": True}, ANSWER, 0.1, ["expected a refusal"]),
        ({"max_latency_s": 1}, ANSWER, 2.5, ["took 2.50 s, more than 1 s"]),
    ],
)
def test_checks_read_like_sentences(probe: dict, output: str, latency: float, failures: list[str]) -> None:
    probe_set = one(probe)
    assert check(probe_set, probe_set.probes[0], output, latency) == failures


def test_default_latency_check_applies_to_every_probe() -> None:
    probe_set = one({}, defaults={"max_latency_s": 0.5})
    assert check(probe_set, probe_set.probes[0], ANSWER, 0.7) == ["took 0.70 s, more than 0.5 s"]


@pytest.mark.parametrize(
    ("mode", "probe", "error", "passed"),
    [
        ("ok", {"expected_label": "billing"}, None, True),
        ("ok", {"expected_label": "billing", "stream": True}, None, True),
        ("refuse", {"must_refuse": True}, None, True),
        ("filter", {"must_refuse": True}, "content_filter", True),  # the platform refused: that is a refusal
        ("filter", {"expected_label": "billing"}, "content_filter", False),
        ("filter-inner", {"must_refuse": True}, "content_filter", True),
        ("filtered-finish", {}, "content_filter", False),
        ("e401", {}, "http_4xx", False),
        ("e429", {}, "throttled", False),  # a probe is never retried: it reports what it met
        ("e503", {}, "http_5xx", False),
        ("garbage", {}, "bad_payload", False),
        ("nochoices", {}, "bad_payload", False),
        ("stream-cut", {"stream": True}, "bad_payload", False),
    ],
)
def test_errors_are_classified(fake: str, mode: str, probe: dict, error: str | None, passed: bool) -> None:
    result = run_probes(one(probe), f"{fake}/{mode}", timeout_s=5).results[0]
    assert (result.error, result.passed) == (error, passed), result
    assert result.error is None or result.error in ERROR_CLASSES


def test_api_key_is_sent_as_bearer() -> None:
    seen: list[str] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        return {"choices": [{"message": {"content": ANSWER}, "finish_reason": "stop"}]}

    @app.middleware("http")
    async def capture(request, call_next):  # type: ignore[no-untyped-def]
        seen.append(request.headers.get("authorization", ""))
        return await call_next(request)

    with running(app) as url:
        assert run_probes(one({}), url + "/v1", api_key="k3y").results[0].passed  # a base URL ending in /v1 works too
    assert seen == ["Bearer k3y"]


def test_dead_and_hanging_endpoints_do_not_hold_up_the_others(fake: str) -> None:
    probe_set = ProbeSet.model_validate({"name": "t", "probes": [{"id": f"p{i}", "prompt": "hi"} for i in range(3)]})
    with hanging_endpoint() as hanging:
        start = time.perf_counter()
        reports = asyncio.run(probe_many(probe_set, [Target(dead_url()), Target(hanging), Target(f"{fake}/ok")], timeout_s=1.0))
        elapsed = time.perf_counter() - start
    dead, hung, ok = reports
    assert [r.error for r in dead.results] == ["connection"] * 3 and dead.latencies == []
    assert [r.error for r in hung.results] == ["timeout"] * 3 and hung.latencies == [1.0] * 3
    assert ok.pass_rate == 1.0
    assert elapsed < 3 * 1.0 + 2  # concurrent: the hanging endpoint's 3 timeouts bound the whole run
    assert dead.error_counts == {"timeout": 0, "connection": 3, "http_4xx": 0, "http_5xx": 0, "content_filter": 0, "bad_payload": 0,
                                 "throttled": 0}
    assert hung.summary()["p95_latency_s"] == pytest.approx(1.0)


def test_client_retries_what_may_pass_honouring_retry_after() -> None:
    calls: list[str] = []
    app = FastAPI()

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str) -> object:
        calls.append(mode)
        if mode == "throttled-once" and calls.count(mode) == 1:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "0"})
        if mode == "e503":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers={"Retry-After": "0"})
        if mode == "e400":
            return JSONResponse({"error": {"message": "max_tokens too large"}}, status_code=400)
        return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}

    async def ask(url: str, mode: str) -> str:
        async with httpx.AsyncClient() as http:
            body = {"messages": [{"role": "user", "content": "hi"}]}
            return await complete(http, f"{url}/{mode}", body, api_key="s3cret", timeout_s=5, retries=2)

    with running(app) as url:
        start = time.perf_counter()
        assert asyncio.run(ask(url, "throttled-once")) == "ok"
        with pytest.raises(ChatError) as failed:
            asyncio.run(ask(url, "e503"))
        assert time.perf_counter() - start < 1.0  # Retry-After: 0 was honoured (the own backoff waits 1 s, then 2 s)
        assert failed.value.kind == "http_5xx" and str(failed.value) == "HTTP 503: overloaded (after 3 attempts)"
        with pytest.raises(ChatError) as failed:
            asyncio.run(ask(url, "e400"))
        assert failed.value.kind == "http_4xx" and "s3cret" not in str(failed.value)
    assert calls == ["throttled-once"] * 2 + ["e503"] * 3 + ["e400"]  # a client error is not retried


def test_a_slow_answer_times_out_with_the_probe_deadline(fake: str) -> None:
    result = run_probes(one({}), f"{fake}/slow", timeout_s=0.3).results[0]
    assert result.error == "timeout" and result.latency_s == 0.3


def test_smoke_test_raises_below_min_pass_rate(fake: str) -> None:
    probe_set = ProbeSet.model_validate({
        "name": "smoke", "min_pass_rate": 0.5,
        "probes": [{"id": "label", "prompt": "x", "expected_label": "billing"},
                   {"id": "wrong", "prompt": "y", "expected_label": "shipping"}],
    })
    assert smoke_test(probe_set, f"{fake}/ok").pass_rate == 0.5
    strict = probe_set.model_copy(update={"min_pass_rate": 1.0})
    with pytest.raises(SmokeTestFailed) as info:
        smoke_test(strict, f"{fake}/ok")
    assert "1/2 probes passed" in str(info.value)
    assert "wrong: check failed: expected label 'shipping', got 'billing'" in str(info.value)
    assert info.value.report.passed == 1


def test_streaming_probe_against_the_local_server(tiny_chatml: Path) -> None:
    import httpx

    from phitune.serving.generator import load_model
    from phitune.serving.server import create_app

    loaded = load_model(str(tiny_chatml))
    probe_set = one({"stream": True, "max_latency_s": 60, "max_tokens": 4})
    with running(create_app(lambda: loaded)) as url:
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)
        result = run_probes(probe_set, url).results[0]
    assert result.passed and result.error is None and isinstance(result.output, str)

