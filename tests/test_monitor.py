"""Monitoring, the SLO-breach automation, rollback and retire, on a real Prefect test server and MLflow store."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter
from serving_support import dead_url, hanging_endpoint, register_tiny_versions, running, wait_until, write_probe_set

from phitune import registry
from phitune.config import PipelineConfig
from phitune.errors import PhituneError
from phitune.monitoring import ENDPOINT_TAG, PROBE_LATENCY, monitoring_experiment
from phitune.serving import endpoints
from phitune.serving.endpoints import Endpoint

MODEL = "watched"

pytestmark = pytest.mark.usefixtures("prefect_harness")


def killed_process_url() -> tuple[str, int]:
    """An endpoint whose process was killed: (its URL, its pid)."""
    url = dead_url()
    port = httpx.URL(url).port
    code = ("import http.server, sys; http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
            "http.server.BaseHTTPRequestHandler).serve_forever()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    wait_until(lambda: _accepts(url))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return url, proc.pid


def _accepts(url: str) -> bool:
    try:
        httpx.get(url, timeout=0.5)
        return True
    except httpx.HTTPError:
        return False


async def _read_events(prefix: str) -> list[tuple[str, str]]:
    async with get_client() as client:
        body = {"filter": EventFilter(event=EventNameFilter(prefix=[prefix])).model_dump(mode="json"), "limit": 50}
        resp = await client.request("POST", "/events/filter", json=body)
        return sorted((e["event"], e["resource"]["prefect.resource.id"]) for e in resp.json()["events"])


def events(prefix: str = "phitune.endpoint.slo", expect: int = 0, including: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """Events persisted by the test server; written asynchronously, so wait for `expect` of them / for `including`."""
    deadline = time.monotonic() + 20
    while True:
        found = asyncio.run(_read_events(prefix))
        if (len(found) >= expect and (including is None or including in found)) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


@dataclass
class Watched:
    cfg: PipelineConfig
    versions: list[str]
    stop_flaky: object


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, tiny_chatml: Path) -> Iterator[Watched]:
    """Four live endpoints in a registry: healthy, flaky (stopped later), a killed process, a hanging socket."""
    from contextlib import ExitStack

    from phitune.serving.generator import load_model
    from phitune.serving.server import ServerSettings, create_app

    root = tmp_path_factory.mktemp("monitor")
    probes = write_probe_set(root / "probes.yaml", [
        {"id": "answers-1", "prompt": "hello", "max_latency_s": 60},
        {"id": "answers-2", "prompt": "my router light is red", "max_latency_s": 60},
        {"id": "impossible-latency", "prompt": "hi", "max_latency_s": 0.000001},  # one probe always fails
    ])
    cfg = PipelineConfig.model_validate({
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts"), "model_name": MODEL},
        "monitoring": {"probes_file": probes, "timeout_s": 1.5, "slo_pass_rate": 0.5, "slo_p95_latency_s": 30,
                       "window_runs": 3, "experiment": "monitor-test"},
    })
    client = registry.configure(cfg.registry).client
    client.create_registered_model(MODEL)
    versions = [str(client.create_model_version(MODEL, source=str(root / f"v{i}")).version) for i in range(4)]
    loaded = load_model(str(tiny_chatml))
    with ExitStack() as stack:
        healthy = stack.enter_context(running(create_app(lambda: loaded, ServerSettings(max_new_tokens=8))))
        flaky_stack = ExitStack()
        flaky = flaky_stack.enter_context(running(create_app(lambda: loaded, ServerSettings(max_new_tokens=8))))
        stack.callback(flaky_stack.close)
        hanging = stack.enter_context(hanging_endpoint())
        dead, pid = killed_process_url()
        for url in (healthy, flaky):
            wait_until(lambda url=url: _accepts(f"{url}/health") and httpx.get(f"{url}/health").status_code == 200)
        for (name, url, pid_), version in zip(
            [("healthy", healthy, None), ("flaky", flaky, None), ("dead", dead, pid), ("hanging", hanging, None)], versions
        ):
            endpoints.record(client, MODEL, version, Endpoint(name, MODEL, version, url, "local", pid_))
        yield Watched(cfg, versions, flaky_stack.close)


def test_monitor_records_every_endpoint_and_alerts_only_on_a_window_breach(watched: Watched) -> None:
    from flows.monitor import monitor

    def run() -> dict[str, dict]:
        start = time.perf_counter()
        result = monitor(watched.cfg)
        assert time.perf_counter() - start < 30  # the hanging endpoint costs its timeouts, not more
        return {row["endpoint"]: row for row in result["endpoints"]}

    first = run()
    assert set(first) == {"healthy", "flaky", "dead", "hanging"}
    assert first["healthy"]["passed"] == 2 and first["healthy"]["slo"] == "ok"  # one failed probe is no breach
    assert first["dead"]["errors_connection"] == 3 and first["dead"]["pass_rate"] == 0
    assert first["hanging"]["errors_timeout"] == 3 and first["hanging"]["p95_latency_s"] == 1.5
    assert first["dead"]["slo"] == first["hanging"]["slo"] == "BREACHED"
    assert first["hanging"]["version"] == watched.versions[3]
    assert events(expect=2) == [("phitune.endpoint.slo-breached", "phitune.endpoint.dead"),
                                ("phitune.endpoint.slo-breached", "phitune.endpoint.hanging")]

    second = run()
    assert second["flaky"]["slo"] == "ok" and second["dead"]["slo"] == "BREACHED"
    watched.stop_flaky()  # flaky goes down: 2/3 + 2/3 + 0/3 over the window = 44% < 50%
    third = run()
    assert third["flaky"]["errors_connection"] == 3 and third["flaky"]["window_runs"] == 3
    assert third["flaky"]["slo"] == "BREACHED" and "pass rate 44% < 50% over 3 run(s)" in third["flaky"]["reasons"]
    # still-breached endpoints are not announced again; flaky is announced once; healthy never
    assert [e for e in events(expect=3) if e[0].endswith("breached")] == [
        ("phitune.endpoint.slo-breached", "phitune.endpoint.dead"),
        ("phitune.endpoint.slo-breached", "phitune.endpoint.flaky"),
        ("phitune.endpoint.slo-breached", "phitune.endpoint.hanging"),
    ]

    # MLflow: one run per endpoint per monitoring run, with per-probe latencies for the rolling window
    client = registry.configure(watched.cfg.registry).client
    experiment_id = monitoring_experiment(watched.cfg)
    runs = client.search_runs([experiment_id], f"tags.`{ENDPOINT_TAG}` = 'hanging'")
    assert len(runs) == 3 and runs[0].data.metrics["errors_timeout"] == 3
    assert runs[0].data.tags["phitune.model_version"] == watched.versions[3]
    healthy = client.search_runs([experiment_id], f"tags.`{ENDPOINT_TAG}` = 'healthy'")[0]
    assert len(client.get_metric_history(healthy.info.run_id, PROBE_LATENCY)) == 3
    assert healthy.data.metrics["slo_breached"] == 0 and healthy.data.metrics["pass_rate"] == pytest.approx(2 / 3)

    async def artifact_keys() -> set[str]:
        async with get_client() as c:
            return {a.key for a in await c.read_artifacts()}

    assert "endpoint-health" in asyncio.run(artifact_keys())


def test_the_automation_runs_the_rollback_deployment_on_a_breach(watched: Watched) -> None:
    import deployments.automations as automations
    from flows.monitor import monitor
    from flows.rollback import rollback

    async def make_deployment() -> None:
        async with get_client() as c:
            await c.create_deployment(flow_id=await c.create_flow(rollback), name="on-breach")

    async def automations_named() -> list:
        async with get_client() as c:
            return await c.read_automations_by_name(automations.AUTOMATION_NAME)

    async def rollback_runs() -> list[dict]:
        async with get_client() as c:
            return [r.parameters for r in await c.read_flow_runs() if r.parameters.get("breached_version")]

    asyncio.run(make_deployment())
    automations.create_automations(watched.cfg)
    automations.create_automations(watched.cfg)  # idempotent
    assert len(asyncio.run(automations_named())) == 1
    time.sleep(2)  # let the server's trigger service load the new automation

    client = registry.configure(watched.cfg.registry).client
    mv = client.create_model_version(MODEL, source="/nowhere")
    url, pid = killed_process_url()
    endpoints.record(client, MODEL, str(mv.version), Endpoint("late", MODEL, str(mv.version), url, "local", pid))
    monitor(watched.cfg)
    wait_until(lambda: asyncio.run(rollback_runs()), timeout=30, interval=0.5)
    assert asyncio.run(rollback_runs()) == [{"endpoint": "late", "model_name": MODEL, "breached_version": str(mv.version)}]

    automations.create_automations(watched.cfg.model_copy(update={"monitoring": watched.cfg.monitoring.model_copy(update={"on_breach": "none"})}))
    assert asyncio.run(automations_named()) == []


def test_retire_flow_refuses_a_served_version(watched: Watched) -> None:
    from flows.retire import retire

    client = registry.configure(watched.cfg.registry).client
    version = watched.versions[2]  # the dead endpoint's version: still recorded as served
    with pytest.raises(PhituneError, match="still served by dead"):
        retire(MODEL, version, watched.cfg)
    endpoints.stop(watched.cfg, "dead")  # its process is gone already; this clears the registry record
    assert "retired watched version" in retire(MODEL, version, watched.cfg)
    assert version not in {v.version for v in client.search_model_versions(f"name='{MODEL}'")}


def test_killed_endpoint_is_rolled_back_and_redeployed(tmp_path: Path, tiny_chatml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end story: champion v2 serves; its process dies; the monitor alerts; rollback serves v1."""
    from flows.monitor import monitor
    from flows.rollback import rollback

    monkeypatch.setenv("PHITUNE_HOME", str(tmp_path / "home"))
    cfg, (v1, v2) = register_tiny_versions(tmp_path, tiny_chatml, 2, model_name="tiny")
    probes = write_probe_set(tmp_path / "probes.yaml", [{"id": "answers", "prompt": "hi", "max_latency_s": 60}])
    cfg = cfg.model_copy(update={
        "deployment": cfg.deployment.model_copy(update={"probes_file": probes, "endpoint_name": "e2e"}),
        "monitoring": cfg.monitoring.model_copy(update={"probes_file": probes, "timeout_s": 60, "experiment": "e2e-monitor"}),
    })
    client = registry.configure(cfg.registry).client
    client.set_registered_model_alias("tiny", "previous", v1)
    client.set_registered_model_alias("tiny", "champion", v2)
    try:
        deployed = endpoints.deploy(cfg, "models:/tiny@champion")
        assert deployed["version"] == v2
        os.kill(deployed["pid"], signal.SIGKILL)
        row = monitor(cfg)["endpoints"][0]
        assert row["endpoint"] == "e2e" and row["errors_connection"] == 1 and row["slo"] == "BREACHED"
        breach = ("phitune.endpoint.slo-breached", "phitune.endpoint.e2e")
        assert breach in events(including=breach)

        result = rollback(cfg, endpoint="e2e", model_name="tiny", breached_version=v2)
        assert result["rolled_back"] and result["version"] == v1 and result["replaced"] == v2
        assert str(client.get_model_version_by_alias("tiny", "champion").version) == v1
        assert httpx.get(f"{result['base_url']}/health").json()["version"] == v1
        again = rollback(cfg, endpoint="e2e", model_name="tiny", breached_version=v2)  # a duplicate event
        assert again == {"endpoint": "e2e", "version": v1, "rolled_back": False, "redeploy": False}
    finally:
        for endpoint in endpoints.list_endpoints(client):
            endpoints.stop(cfg, endpoint.name)
