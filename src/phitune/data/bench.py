"""`phitune bench validate`: the contract against the plain way, on a generated 100k-example file.

Baseline ("the plain way"): `pandas.read_json(lines=True)` and `apply_chat_template(tokenize=True)`
per example, counting those over `max_seq_length`. It checks far less than the contract (no
encoding, structure, duplicate or overlap checks; it crashes on the first bad line) but it is what
the token-length check usually looks like. Each measurement runs in a fresh subprocess, so peak
RSS (getrusage) and import costs are its own; both count tokens, and the totals are compared.

Run: `phitune bench validate` (100,000 examples) or `phitune bench validate --quick` (10,000).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "support" / "train.jsonl"
FULL, QUICK = 100_000, 10_000
MAX_SEQ_LENGTH = 512

_FALLBACK = {
    "system": ["You are a helpful support assistant. Answer with 'Category: <label>' then 'Reply: <answer>'."],
    "user": ["My router keeps dropping the connection every evening.", "I was charged twice for my subscription this month.",
             "How do I change the e-mail address on my account?", "The status light is blinking red since this morning."],
    "assistant": ["Category: connectivity\nReply: Please restart the router, wait two minutes, then run Network Check in the app.",
                  "Category: billing\nReply: I'm sorry about the double charge; the duplicate payment will be refunded within five days.",
                  "Category: account\nReply: Open Settings > Account > E-mail in the app and confirm the new address from your inbox."],
}


def _pools() -> dict[str, list[str]]:
    """Message texts by role from the sample data when it exists (else a few built-in ones)."""
    if not SAMPLE.is_file():
        return _FALLBACK
    pools: dict[str, set[str]] = {"system": set(), "user": set(), "assistant": set()}
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            pools[m["role"]].add(m["content"])
    return {role: sorted(texts) for role, texts in pools.items()}


def make_file(path: Path, n: int, seed: int = 0) -> int:
    """Write `n` distinct chat examples in the sample data's shape (~500 bytes each); returns the size in bytes."""
    rng = random.Random(seed)
    pools = _pools()
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            messages = [{"role": "system", "content": rng.choice(pools["system"])}]
            for turn in range(1 + (rng.random() < 0.1)):
                user = " ".join(rng.sample(pools["user"], rng.randint(1, min(2, len(pools["user"])))))
                messages.append({"role": "user", "content": f"{user} (ticket {i}-{turn})"})
                answer = "\n".join(rng.sample(pools["assistant"], 1 + (rng.random() < 0.3)))
                messages.append({"role": "assistant", "content": f"{answer} Ref {i}-{turn}."})  # every turn unique
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _tokenizer_source(tmp: Path) -> tuple[str, str]:
    """(folder, description): the embedded default model's tokenizer when provisioned, else the tiny ChatML one."""
    from phitune.default_model import default_model_path, is_ready
    from phitune.tiny_tokenizer import chatml_tokenizer

    if is_ready():
        return str(default_model_path()), "SmolLM2-135M-Instruct (embedded default)"
    folder = tmp / "tiny-chatml"
    chatml_tokenizer().save_pretrained(folder)
    return str(folder), "tiny ChatML tokenizer (embedded default not provisioned: `phitune model pull-default`)"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _child(kind: str, data: str, tokenizer_dir: str) -> dict[str, Any]:
    """One measurement, in its own process: load the tokenizer, then time `kind` on `data`."""
    import pandas as pd  # noqa: F401  (both sides pay for pandas before the clock starts)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rss_before = _rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    if kind == "phitune":
        from phitune.config import PipelineConfig
        from phitune.data.contract import validate_files

        cfg = PipelineConfig.model_validate({"training": {"max_seq_length": MAX_SEQ_LENGTH}})
        report = validate_files(Path(data), None, cfg, tokenizer=tok)
        result = {"examples": report.stats["examples"], "tokens": report.stats["tokens"],
                  "too_many_tokens": sum(e.code == "too_many_tokens" for e in report.errors), "errors": len(report.errors),
                  "timings": report.stats["timings"]}
    else:
        frame = pd.read_json(data, lines=True)
        lengths = [len(tok.apply_chat_template(m, tokenize=True)["input_ids"]) for m in frame["messages"]]
        result = {"examples": len(frame), "tokens": sum(lengths), "too_many_tokens": sum(n > MAX_SEQ_LENGTH for n in lengths)}
    result.update(
        seconds=round(time.perf_counter() - wall, 2),
        cpu_seconds=round(time.process_time() - cpu, 2),
        peak_rss_mb=round(_rss_mb(), 1),
        rss_growth_mb=round(_rss_mb() - rss_before, 1),
    )
    return result


def _measure(kind: str, data: Path, tokenizer_dir: str) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "phitune.data.bench", kind, str(data), tokenizer_dir], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    """Generate the file, measure the contract and the baseline, print a table; returns the figures."""
    n = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as tmp:
        data = Path(tmp) / "chat.jsonl"
        size = make_file(data, n)
        tokenizer_dir, tokenizer_name = _tokenizer_source(Path(tmp))
        print(f"validate: {n:,} examples, {size / 1e6:.1f} MB; tokenizer: {tokenizer_name}; load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {"phitune": _measure("phitune", data, tokenizer_dir), "baseline": _measure("baseline", data, tokenizer_dir)}
    ours, base = results["phitune"], results["baseline"]
    rows = [("phitune validate_files", ours), ("baseline: pandas + apply_chat_template", base)]
    # cores = cpu s / wall s: how much CPU the run actually got; on a shared machine wall time mostly measures the neighbours.
    print(f"{'':40} {'wall s':>8} {'cpu s':>8} {'cores':>6} {'peak RSS MB':>12} {'RSS growth MB':>14} {'tokens':>12}")
    for name, r in rows:
        cores = r["cpu_seconds"] / r["seconds"] if r["seconds"] else 0.0
        print(f"{name:40} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {cores:6.2f} {r['peak_rss_mb']:12.0f} {r['rss_growth_mb']:14.0f} {r['tokens']:12,}")
    print("where phitune's time goes (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in ours["timings"].items()))
    speedup = base["seconds"] / ours["seconds"] if ours["seconds"] else float("inf")
    cpu_ratio = base["cpu_seconds"] / ours["cpu_seconds"] if ours["cpu_seconds"] else float("inf")
    print(f"speed-up: {speedup:.1f}x wall, {cpu_ratio:.1f}x CPU; token totals agree: {ours['tokens'] == base['tokens']}", flush=True)
    return {
        "examples": n, "megabytes": round(size / 1e6, 1), "tokenizer": tokenizer_name, "load_average": round(os.getloadavg()[0], 1),
        "phitune": ours, "baseline": base, "speedup": round(speedup, 2), "cpu_ratio": round(cpu_ratio, 2), "tokens_agree": ours["tokens"] == base["tokens"],
    }


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:4])))
