"""Test helpers for servers on 127.0.0.1: run an ASGI app in a thread, and endpoints that misbehave."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free port; yields the base URL, stops on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def hanging_endpoint() -> Iterator[str]:
    """A socket that accepts connections and never answers (an endpoint that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        sock.close()


def dead_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def register_tiny_versions(root: Any, base_dir: Any, count: int, model_name: str = "tiny") -> tuple[Any, list[str]]:
    """A sqlite registry under `root` with `count` versions of LoRA adapters on the tiny model `base_dir`,
    logged by the registry helper as the pipeline does (PEFT adapter + base_model_path).

    Returns (PipelineConfig pointing at it, versions). Set PHITUNE_HOME before calling (adapter cache).
    """
    import json
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from phitune.config import PipelineConfig
    from phitune.registry import log_model_version, open_run

    root = Path(root)
    cfg = PipelineConfig.model_validate({
        "model": {"base_model": str(base_dir)},
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts"),
                     "model_name": model_name},
        "deployment": {"log_dir": str(root / "endpoints"), "startup_timeout_s": 240},
    })
    chats = root / "chats.jsonl"
    chats.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "Category: billing\nReply: ok"}]}) + "\n"
        for i in range(4)), encoding="utf-8")
    data = {"train_file": str(chats), "validation_file": str(chats), "digest": "d" * 64, "report_file": None}
    run_id = open_run(cfg, data)
    versions = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        adapter = root / f"adapter-{seed}"
        model.save_pretrained(adapter)
        versions.append(str(log_model_version(cfg, run_id, adapter, data["digest"]).version))
    return cfg, versions


def write_probe_set(path: Any, probes: list[dict], **fields: Any) -> str:
    """A probe-set YAML file; returns its path as str (for config fields)."""
    import yaml

    path.write_text(yaml.safe_dump({"name": "test", "defaults": {"max_tokens": 4}, **fields, "probes": probes}), encoding="utf-8")
    return str(path)
