"""Helpers for tests against a real stack: free ports, a stack in a temp folder, PostgreSQL databases,
flow runs created the way the Prefect UI creates them, and small support-desk data."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from deployments.stack import StackConfig, down, up
from phitune.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
PG = "postgres@127.0.0.1:5432"
LABELS = ("billing", "connectivity", "account", "hardware")
QUESTIONS = {
    "billing": ["I was charged twice this month", "refund for order {n} please", "why is my bill higher"],
    "connectivity": ["Wi-Fi drops every evening", "router light is red {n}", "no internet since morning"],
    "account": ["reset my password", "change the email on account {n}", "cannot log in to the app"],
    "hardware": ["the router is overheating", "power adapter {n} broke", "the extender makes noise"],
}


def write_support_jsonl(path: Path, count: int, offset: int = 0) -> Path:
    """Chat JSONL in the support-desk shape: 'Category: <label>' then 'Reply: ...'."""
    lines = []
    for i in range(offset, offset + count):
        label = LABELS[i % len(LABELS)]
        question = QUESTIONS[label][i % 3].format(n=1000 + i)
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "Answer as 'Category: <label>' then 'Reply: <answer>'."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"Category: {label}\nReply: We are on it, ticket {i}."},
        ]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def stack_config(tmp: Path, prefect_file: Path = ROOT / "prefect.yaml", **sections: Any) -> StackConfig:
    """A stack entirely under `tmp` on free ports; `sections` override fields (prefect=..., mlflow=...)."""
    tree: dict[str, Any] = {
        "state_dir": str(tmp / "stack"),
        "prefect_file": str(prefect_file),
        "prefect": {"port": free_port(), "settings": {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}},
        "mlflow": {"port": free_port(), "backend_store_uri": f"sqlite:///{tmp}/mlflow.db", "artifacts_destination": str(tmp / "mlartifacts")},
        "workers": {"cpu": 1, "gpu": 0, "poll_seconds": 1},
    }
    for key, value in sections.items():
        tree[key] = {**tree[key], **value} if isinstance(value, dict) and isinstance(tree.get(key), dict) else value
    return StackConfig.model_validate(tree)


@contextmanager
def running_stack(cfg: StackConfig) -> Iterator[dict[str, Any]]:
    """`up` for real, `down` afterwards whatever happens; yields the state (urls, timings)."""
    try:
        state = up(cfg, out=lambda line: print(line))
        yield state
    finally:
        down(cfg, out=lambda line: print(line))


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 (trust auth), dropped afterwards; yields its name."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {exc}")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def prefect(api_url: str, coro_fn: Any, *args: Any) -> Any:
    """Run `await coro_fn(client, *args)` with a Prefect client on `api_url`."""
    from prefect.client.orchestration import PrefectClient

    async def main() -> Any:
        async with PrefectClient(api=api_url) as client:
            return await coro_fn(client, *args)

    return asyncio.run(main())


async def create_run(client: Any, deployment: str, parameters: dict[str, Any]) -> Any:
    """What the UI's "Run" button does: POST /deployments/{id}/create_flow_run with the form's parameters."""
    dep = await client.read_deployment_by_name(deployment)
    return await client.create_flow_run_from_deployment(dep.id, parameters=parameters)


async def wait_final(client: Any, flow_run_id: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        await asyncio.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not final after {timeout} s (state {run.state.name if run.state else None})")
