"""The local OpenAI-compatible server over real HTTP on 127.0.0.1, with tiny random models."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_support import running, wait_until

from phitune.errors import EndpointError
from phitune.serving.generator import LoadedModel, load_model
from phitune.serving.server import ServerSettings, create_app, read_api_key

USER = [{"role": "user", "content": "My Wi-Fi keeps dropping every evening"}]


def _ready(url: str) -> None:
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 200)


@pytest.fixture(scope="module")
def chatml_model(tiny_chatml: Path) -> LoadedModel:
    return load_model(str(tiny_chatml))


@pytest.fixture(scope="module")
def server(chatml_model: LoadedModel) -> str:
    with running(create_app(lambda: chatml_model, ServerSettings(max_batch_size=4, max_new_tokens=32))) as url:
        _ready(url)
        yield url


def _metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as 'name{label=value,...}' -> value."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_openai_client_chats_with_the_server(server: str, chatml_model: LoadedModel) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="any", messages=USER, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(
        model="any", messages=USER, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the stream spells the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    assert [m.id for m in client.models.list()] == [chatml_model.name]


def test_stream_is_server_sent_events_ending_in_done(server: str) -> None:
    body = {"messages": USER, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_max_tokens_and_stop_strings(server: str) -> None:
    def ask(**kw: object) -> dict:
        resp = httpx.post(f"{server}/v1/chat/completions", json={"messages": USER, "temperature": 0, **kw})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]

    full = ask(max_tokens=12)
    assert full["finish_reason"] == "length"
    text = full["message"]["content"]
    cut = text[len(text) // 2:][:2]
    assert cut
    # stop at a string that occurs in the greedy answer: the answer ends right before its first occurrence
    stopped = ask(max_tokens=12, stop=["never in the answer", cut])
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == text[: text.find(cut)]


def passes_with_at_least(metrics: dict[str, float], rows: int) -> float:
    """Forward passes with >= `rows` requests, from the batch-size histogram's cumulative buckets."""
    return metrics["phitune_batch_size_count"] - metrics[f"phitune_batch_size_bucket{{le={rows - 1}.0}}"]


def test_batched_greedy_equals_one_at_a_time(chatml_model: LoadedModel) -> None:
    """Left padding and row pruning must not change what a request gets."""
    prompts = ["hi", "My Wi-Fi keeps dropping every evening, what should I do?", "refund order 1234", "router light"]
    sizes = [3, 9, 5, 7]

    def answers(url: str) -> list[str]:
        def one(i: int) -> str:
            # sampled with a per-request seed: varied text even from a random model, and still reproducible
            body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": sizes[i], "temperature": 1.0,
                    "seed": i}
            return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(4)))

    settings = ServerSettings(max_batch_size=4, batch_wait_s=0.3)
    with running(create_app(lambda: chatml_model, settings)) as url:
        _ready(url)
        batched = answers(url)
        metrics = _metrics(url)
    with running(create_app(lambda: chatml_model, ServerSettings(max_batch_size=1))) as url:
        _ready(url)
        single = answers(url)
    assert batched == single
    # the four requests were generated together: every forward pass until the shortest finished had all 4
    assert passes_with_at_least(metrics, 4) >= 1
    # every row of every pass produced one token of some answer: nothing generated twice or thrown away
    assert metrics["phitune_batch_size_sum"] == metrics["phitune_completion_tokens_total"]


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "missing messages": (json.dumps({"model": "x"}).encode(), 400, "missing_required_parameter"),
    "empty messages": (json.dumps({"messages": []}).encode(), 400, "invalid_value"),
    "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "invalid_value"),
    "content not text": (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "invalid_value"),
    "max_tokens above limit": (json.dumps({"messages": USER, "max_tokens": 10_000}).encode(), 400, "integer_above_max_value"),
    "negative max_tokens": (json.dumps({"messages": USER, "max_tokens": -1}).encode(), 400, "invalid_value"),
    "prompt over context": (
        json.dumps({"messages": [{"role": "user", "content": "router light " * 400}]}).encode(), 400, "context_length_exceeded"),
    "n > 1": (json.dumps({"messages": USER, "n": 2}).encode(), 400, "invalid_value"),
    "too many stops": (json.dumps({"messages": USER, "stop": list("abcde")}).encode(), 400, "invalid_value"),
    "temperature out of range": (json.dumps({"messages": USER, "temperature": 9}).encode(), 400, "invalid_value"),
    "oversized body": (json.dumps({"messages": [{"role": "user", "content": "x" * 50_000}]}).encode(), 413, "request_too_large"),
}


@pytest.fixture(scope="module")
def small_body_server(chatml_model: LoadedModel) -> str:
    settings = ServerSettings(max_batch_size=2, max_new_tokens=32, max_request_bytes=20_000)
    with running(create_app(lambda: chatml_model, settings)) as url:
        _ready(url)
        yield url


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_stays_up(small_body_server: str, case: str) -> None:
    body, status, code = BAD_REQUESTS[case]
    resp = httpx.post(f"{small_body_server}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(f"{small_body_server}/health").status_code == 200


def test_oversized_chunked_body_without_content_length(small_body_server: str) -> None:
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    resp = httpx.post(f"{small_body_server}/v1/chat/completions", content=chunks())
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_unknown_path_and_method_are_openai_errors(small_body_server: str) -> None:
    assert httpx.get(f"{small_body_server}/v1/nope").json()["error"]["code"] == "not_found"
    resp = httpx.get(f"{small_body_server}/v1/chat/completions")
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_sees_bad_request_errors(small_body_server: str) -> None:
    client = openai.OpenAI(base_url=f"{small_body_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "tool", "content": "hi"}])
    assert info.value.param == "messages[0].role"


def test_api_key_is_enforced(chatml_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHITUNE_TEST_KEY", "s3cret")
    settings = ServerSettings(max_new_tokens=4, api_key=read_api_key("PHITUNE_TEST_KEY"))
    with running(create_app(lambda: chatml_model, settings)) as url:
        _ready(url)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER}, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).chat.completions.create(model="x", messages=USER)
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="x", messages=USER, max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key (load balancers probe it)
    monkeypatch.delenv("PHITUNE_TEST_KEY")
    with pytest.raises(EndpointError, match="PHITUNE_TEST_KEY"):
        read_api_key("PHITUNE_TEST_KEY")


def test_health_is_503_until_the_model_is_loaded(chatml_model: LoadedModel) -> None:
    gate = threading.Event()

    def slow_loader() -> LoadedModel:
        gate.wait(20)
        return chatml_model

    with running(create_app(slow_loader)) as url:
        resp = httpx.get(f"{url}/health")
        assert resp.status_code == 503 and resp.json()["status"] == "loading"
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER})
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_not_ready"
        gate.set()
        _ready(url)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_failed_load_is_reported_by_health(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    app = create_app(lambda: load_model(str(tmp_path / "missing")), on_load_error=errors.append)
    with running(app) as url:
        wait_until(lambda: errors)
        resp = httpx.get(f"{url}/health")
        assert resp.status_code == 503 and resp.json()["status"] == "failed"
        assert "missing" in resp.json()["error"]


def test_metrics_count_requests_errors_tokens(chatml_model: LoadedModel) -> None:
    with running(create_app(lambda: chatml_model, ServerSettings(max_new_tokens=16))) as url:
        _ready(url)
        for _ in range(3):
            httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "temperature": 0})
        httpx.post(f"{url}/v1/chat/completions", content=b"{")
        m = _metrics(url)
    assert m["phitune_requests_total{path=/v1/chat/completions,status=200}"] == 3
    assert m["phitune_requests_total{path=/v1/chat/completions,status=400}"] == 1
    assert m["phitune_request_errors_total{type=invalid_request_error}"] == 1
    assert 3 <= m["phitune_completion_tokens_total"] <= 15
    assert m["phitune_prompt_tokens_total"] > 0
    assert m["phitune_request_latency_seconds_count{path=/v1/chat/completions}"] == 4
    assert m["phitune_batch_size_sum"] == m["phitune_completion_tokens_total"]  # one row per token generated
    assert m["phitune_model_ready"] == 1


def test_phi3_template_and_eos_list(tiny_phi3: Path) -> None:
    """Phi-3 ends a turn with <|end|>, one of several eos ids; a system message goes through its template."""
    loaded = load_model(str(tiny_phi3))
    with running(create_app(lambda: loaded)) as url:
        _ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="x", messages=[{"role": "system", "content": "Be brief."}, *USER], max_tokens=6, temperature=0.7, seed=1,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_requests_join_a_running_batch_and_get_the_same_answers(chatml_model: LoadedModel) -> None:
    """Continuous batching: a request arriving mid-generation joins the batch (its cache padded in) and
    still gets exactly what it gets alone."""
    # greedy, the tiny model repeats one token and never stops early: a long generation to join
    first = {"messages": USER, "max_tokens": 400, "temperature": 0}
    late = {"messages": [{"role": "user", "content": "refund order 1234"}], "max_tokens": 6, "temperature": 1.0, "seed": 2}

    def ask(url: str, body: dict) -> str:
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        return resp.json()["choices"][0]["message"]["content"]

    with running(create_app(lambda: chatml_model, ServerSettings(max_batch_size=1, max_new_tokens=400))) as url:
        _ready(url)
        alone = [ask(url, first), ask(url, late)]
    with running(create_app(lambda: chatml_model, ServerSettings(max_batch_size=4, max_new_tokens=400))) as url:
        _ready(url)
        with ThreadPoolExecutor(2) as pool:
            long_answer = pool.submit(ask, url, first)
            wait_until(lambda: _metrics(url)["phitune_batch_size_count"] >= 3)  # the first one is decoding
            together = [long_answer, pool.submit(ask, url, late)]
            answers = [f.result() for f in together]
        m = _metrics(url)
    assert answers == alone
    assert passes_with_at_least(m, 2) >= 1  # the late request was decoded alongside the first


def test_default_model_answers_the_same_alone_batched_and_joining(default_model_dir: Path) -> None:
    """On the real SmolLM2 (greedy): requests that start together or join mid-generation get the solo answer."""
    import time

    from phitune.chat import prompt_ids
    from phitune.serving.generator import BatchingGenerator, Job

    loaded = load_model(str(default_model_dir))
    prompts = ["What is the capital of France?", "My Wi-Fi keeps dropping every evening, what should I do?", "hi"]
    sizes = [12, 10, 6]

    def generate(max_batch_size: int, delays: list[float]) -> list[str]:
        steps: list[int] = []
        generator = BatchingGenerator(loaded, max_batch_size, on_step=steps.append)
        generator.start()
        outputs: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
        done = threading.Semaphore(0)

        def emit_for(i: int):
            def emit(event: tuple) -> None:
                if event[0] == "delta":
                    outputs[i].append(event[1])
                else:
                    done.release()
            return emit

        start = time.monotonic()
        for i, delay in enumerate(delays):
            while time.monotonic() - start < delay:
                time.sleep(0.001)
            ids = prompt_ids(loaded.tokenizer, [{"role": "user", "content": prompts[i]}])
            generator.submit(Job(ids, sizes[i], emit_for(i), temperature=0))
        for _ in prompts:
            done.acquire(timeout=300)
        generator.stop()
        assert max_batch_size == 1 or max(steps) > 1
        return ["".join(outputs[i]) for i in range(len(prompts))]

    alone = generate(1, [0, 0, 0])
    assert generate(3, [0, 0, 0]) == alone
    assert generate(3, [0, 0.2, 0.4]) == alone


def test_unset_temperature_follows_the_models_generation_config(chatml_model: LoadedModel) -> None:
    """The tiny model (like SmolLM2) does not sample by default: without a temperature, answers are greedy."""
    assert chatml_model.sampling_defaults() == (0.0, 1.0)
    with running(create_app(lambda: chatml_model, ServerSettings(max_new_tokens=8))) as url:
        _ready(url)
        answers = {httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": 8}).json()
                   ["choices"][0]["message"]["content"] for _ in range(3)}
    assert len(answers) == 1
