"""`phitune bench serve`: the local server batched vs one request at a time, side by side in one run.

The same server code on the same model (the embedded default, served from its folder) runs as two real
endpoint processes: one with max_batch_size=1 (requests queue and are generated one at a time), one
with max_batch_size=8. Both get the same support-desk chats from data/support (validation, then
train) from 8 concurrent clients, greedy, so both generate the very same tokens. Reported per
configuration: completion tokens per second (wall clock and per CPU-second of the server), requests
per second, p50/p95 request latency and the mean batch size the server formed (from its /metrics);
and the throughput ratio (goal: >= 3x).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from phitune.config import DeploymentConfig
from phitune.errors import ModelNotFoundError
from phitune.probes import percentile
from phitune.serving.endpoints import free_port, start_process, stop_process, wait_healthy

CLIENTS = 8
DATA = Path(__file__).resolve().parents[3] / "data" / "support"


def _prompts(n: int) -> list[list[dict[str, str]]]:
    """The first n conversations of the sample data (validation, then train), without their final answer."""
    chats = []
    for name in ("validation.jsonl", "train.jsonl"):
        for line in (DATA / name).read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            chats.append(messages[:-1] if messages[-1]["role"] == "assistant" else messages)
            if len(chats) == n:
                return chats
    return chats


async def _load(url: str, chats: list[list[dict[str, str]]], max_tokens: int) -> tuple[int, list[float]]:
    """CLIENTS concurrent clients, each sending its share of `chats` one after another: (tokens, latencies)."""
    latencies: list[float] = []
    tokens = 0

    async def client(share: list[list[dict[str, str]]], http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for messages in share:
            start = time.perf_counter()
            resp = await http.post(f"{url}/v1/chat/completions",
                                   json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
            resp.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += resp.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
        await asyncio.gather(*(client(chats[i::CLIENTS], http) for i in range(CLIENTS)))
    return tokens, latencies


def _mean_batch(url: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in f.samples}
    count = samples.get("phitune_batch_size_count")
    return round(samples["phitune_batch_size_sum"] / count, 2) if count else None


class _Server:
    """One endpoint process of the bench, with what it has served so far."""

    def __init__(self, model: Path, max_batch_size: int, max_tokens: int, threads: int | None, log_dir: Path) -> None:
        self.max_batch_size = max_batch_size
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log_dir / f"serve-batch{max_batch_size}.log"
        cmd = [sys.executable, "-m", "phitune.serving.server", "--model", str(model), "--port", self.url.rsplit(":", 1)[1],
               "--max-batch-size", str(max_batch_size), "--max-new-tokens", str(max_tokens)]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = start_process(cmd, self.log)
        self.tokens, self.wall, self.cpu, self.latencies = 0, 0.0, 0.0, []

    def measure(self, chats: list[list[dict[str, str]]], max_tokens: int) -> None:
        process = psutil.Process(self.proc.pid)
        cpu, start = sum(process.cpu_times()[:2]), time.perf_counter()
        tokens, latencies = asyncio.run(_load(self.url, chats, max_tokens))
        self.wall += time.perf_counter() - start
        self.cpu += sum(process.cpu_times()[:2]) - cpu
        self.tokens += tokens
        self.latencies += latencies

    def result(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size, "requests": len(self.latencies), "completion_tokens": self.tokens,
            "wall_s": round(self.wall, 2), "tokens_per_s": round(self.tokens / self.wall, 2),
            "tokens_per_cpu_s": round(self.tokens / self.cpu, 2), "requests_per_s": round(len(self.latencies) / self.wall, 3),
            "p50_latency_s": round(percentile(self.latencies, 50) or 0, 2),
            "p95_latency_s": round(percentile(self.latencies, 95) or 0, 2), "mean_batch_size": _mean_batch(self.url),
        }


def run(quick: bool = False, threads: int | None = DeploymentConfig().num_threads) -> dict[str, Any]:
    """Measure both configurations on the default model; print and return the figures and the ratio.

    Both servers run side by side (an idle one costs no CPU) and are measured in alternating phases (in
    each, CLIENTS clients send 4 requests each, one after another; --quick: one phase of 2 each, shorter
    answers), so a change in the machine's load during the run hits both alike.
    Tokens per CPU-second of the server process are reported too: on a shared machine they vary less
    than wall-clock throughput. `threads`: the servers' CPU threads (default: deployment.num_threads).
    """
    from phitune.default_model import default_model_path, is_ready

    if not is_ready():
        raise ModelNotFoundError("the serve bench needs the default model: run `phitune model pull-default` first")
    model = default_model_path()
    phases, per_client, max_tokens = (1, 2, 32) if quick else (2, 4, 64)
    per_phase = CLIENTS * per_client
    chats = _prompts(per_phase * phases)
    with tempfile.TemporaryDirectory(prefix="phitune-bench-serve-") as tmp:
        servers = [_Server(model, size, max_tokens, threads, Path(tmp)) for size in (1, CLIENTS)]
        try:
            for server in servers:
                wait_healthy(server.url, server.proc, 600, server.log)
                asyncio.run(_load(server.url, chats[:1], 4))  # warm-up (first-call allocations), not measured
            for phase in range(phases):
                part = chats[phase * per_phase:(phase + 1) * per_phase]
                for server in servers if phase % 2 == 0 else servers[::-1]:
                    server.measure(part, max_tokens)
            single, batched = (server.result() for server in servers)
        finally:
            for server in servers:
                stop_process(server.proc.pid)
    speedup = round(batched["tokens_per_s"] / single["tokens_per_s"], 2)
    cpu_speedup = round(batched["tokens_per_cpu_s"] / single["tokens_per_cpu_s"], 2)
    print(f"serve bench: {model.name}, {CLIENTS} concurrent clients, {len(chats)} requests each way in {phases} "
          f"alternating phase(s), max_tokens {max_tokens}, greedy, {threads or 'all'} CPU thread(s) per server")
    for name, r in (("one at a time", single), (f"batched (<= {CLIENTS})", batched)):
        print(f"  {name:<16} {r['tokens_per_s']:>7.1f} tok/s  {r['tokens_per_cpu_s']:>7.1f} tok/cpu-s  "
              f"p50 {r['p50_latency_s']:>6.2f} s  p95 {r['p95_latency_s']:>6.2f} s  mean batch {r['mean_batch_size']}")
    print(f"  throughput ratio: {speedup}x wall-clock, {cpu_speedup}x per CPU-second (goal >= 3x)")
    return {"model": str(model), "clients": CLIENTS, "max_tokens": max_tokens, "phases": phases, "threads": threads,
            "one_at_a_time": single, "batched": batched, "speedup": speedup, "cpu_speedup": cpu_speedup,
            "goal_met": speedup >= 3}
