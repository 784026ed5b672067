"""Blue/green deployment of real endpoint processes serving registered (PEFT) versions of a tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from serving_support import register_tiny_versions, write_probe_set

from phitune import registry
from phitune.cli import main as cli_main
from phitune.config import PipelineConfig
from phitune.errors import EndpointError, PhituneError
from phitune.registry.tags import endpoint_tag
from phitune.serving import endpoints

NAME = "support-test"


@dataclass
class Setup:
    cfg: PipelineConfig
    versions: list[str]
    passing: str
    failing: str
    root: Path


def with_probes(cfg: PipelineConfig, probes_file: str) -> PipelineConfig:
    deployment = cfg.deployment.model_copy(update={"probes_file": probes_file, "endpoint_name": NAME})
    return cfg.model_copy(update={"deployment": deployment, "monitoring": cfg.monitoring.model_copy(update={"timeout_s": 60})})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_chatml: Path) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("endpoints")
    patch = pytest.MonkeyPatch()
    patch.setenv("PHITUNE_HOME", str(root / "home"))
    cfg, versions = register_tiny_versions(root, tiny_chatml, 2)
    # a random tiny model answers anything quickly, and never with a support label
    passing = write_probe_set(root / "pass.yaml", [{"id": "answers", "prompt": "hi", "max_latency_s": 60}])
    failing = write_probe_set(root / "fail.yaml", [{"id": "label", "prompt": "I was charged twice", "expected_label": "billing"}])
    yield Setup(cfg, versions, passing, failing, root)
    client = registry.configure(cfg.registry).client
    for endpoint in endpoints.list_endpoints(client):  # never leave endpoint processes behind
        endpoints.stop(cfg, endpoint.name)
    patch.undo()


def _tags(cfg: PipelineConfig, version: str) -> dict[str, str]:
    client = registry.configure(cfg.registry).client
    return {k: v for k, v in client.get_model_version("tiny", version).tags.items() if k.startswith("endpoint.")}


def test_blue_green_deploy_failed_smoke_test_and_stop(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    v1, v2 = setup.versions
    good = with_probes(setup.cfg, setup.passing)

    # 1. the first deployment: a process of its own, healthy, serving v1 loaded through MLflow (PEFT merged)
    first = endpoints.deploy(good, f"models:/tiny/{v1}")
    url = first["base_url"]
    assert first["version"] == v1 and first["replaced"] is None and first["smoke"]["pass_rate"] == 1.0
    assert httpx.get(f"{url}/health").json()["version"] == v1
    reply = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert reply.usage.completion_tokens >= 1
    proc = psutil.Process(first["pid"])
    assert proc.cmdline()[proc.cmdline().index("--model") + 1] == f"models:/tiny/{v1}"
    assert proc.pid != psutil.Process().pid and proc.ppid() in (psutil.Process().pid, 1)
    assert _tags(good, v1)[endpoint_tag(NAME)] == url
    assert {f"endpoint.{NAME}.{f}" for f in ("url", "pid", "started", "target", "log")} <= set(_tags(good, v1))
    assert Path(first["log_file"]).is_file() and str(setup.root) in first["log_file"]

    # 2. v2 fails its smoke test: the new process is stopped, v1 keeps serving, the error says why
    with pytest.raises(EndpointError) as info:
        endpoints.deploy(with_probes(setup.cfg, setup.failing), f"models:/tiny/{v2}")
    message = str(info.value)
    assert f"tiny v{v2} was not deployed (v{v1} still serves {url})" in message
    assert "label: check failed: expected label 'billing'" in message
    assert httpx.get(f"{url}/health").json()["version"] == v1
    assert _tags(good, v2) == {} and _tags(good, v1)[endpoint_tag(NAME)] == url
    failed_log = next(p for p in (setup.root / "endpoints").glob(f"{NAME}-v{v2}-*.log"))
    assert "Shutting down" in failed_log.read_text() or "Finished server process" in failed_log.read_text()

    # 3. retiring a served version is refused
    with pytest.raises(PhituneError, match="still served"):
        registry.retire("tiny", v1, registry.configure(good.registry).client)

    # 4. v2 passes: tags move to v2, then the v1 process is stopped
    second = endpoints.deploy(good, f"models:/tiny/{v2}")
    assert second["replaced"] == v1 and second["base_url"] != url
    assert _tags(good, v1) == {} and _tags(good, v2)[endpoint_tag(NAME)] == second["base_url"]
    assert not psutil.pid_exists(first["pid"]) or psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE
    assert httpx.get(f"{second['base_url']}/health").json()["version"] == v2

    # 5. `phitune endpoints` lists it as healthy; `phitune endpoint stop` stops it and clears the tags
    overrides = [f"registry.tracking_uri={good.registry.tracking_uri}"]
    assert cli_main(["endpoints", *overrides]) == 0
    listing = capsys.readouterr().out
    assert NAME in listing and second["base_url"] in listing and "yes" in listing
    assert cli_main(["endpoint", "stop", NAME, *overrides]) == 0
    assert f"stopped {NAME}" in capsys.readouterr().out
    assert _tags(good, v2) == {}
    assert not endpoints.is_healthy(second["base_url"])
    assert cli_main(["endpoint", "stop", NAME, *overrides]) == 1  # nothing left: a clear error, exit 1
    assert f"no live endpoint named '{NAME}'" in capsys.readouterr().err
    assert cli_main(["endpoint", "stop", "--all", *overrides]) == 0
    assert "no live local endpoints" in capsys.readouterr().out


def test_a_process_that_cannot_load_fails_the_deploy_with_its_log(setup: Setup, tmp_path: Path) -> None:
    cfg = with_probes(setup.cfg, setup.passing)
    cfg = cfg.model_copy(update={"deployment": cfg.deployment.model_copy(update={"startup_timeout_s": 120})})
    client = registry.configure(cfg.registry).client
    # a version whose base model folder has gone: MLflow cannot load it
    mv = client.create_model_version("tiny", source=str(tmp_path / "nothing-here"))
    with pytest.raises(EndpointError) as info:
        endpoints.deploy(cfg, f"models:/tiny/{mv.version}")
    assert "exited with status 1 before it was healthy" in str(info.value)
    assert "cannot serve" in str(info.value)  # the log's tail: the server's own one-line reason
    assert endpoints.list_endpoints(client) == []


def test_endpoint_names_must_be_tag_safe() -> None:
    with pytest.raises(EndpointError, match="letters, digits"):
        endpoints.check_name("a.b")


def test_vllm_target_command_uses_the_registered_adapter_and_base(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = with_probes(setup.cfg, setup.passing)
    cfg = cfg.model_copy(update={"deployment": cfg.deployment.model_copy(update={"target": "vllm", "api_key_env": "VLLM_TEST_KEY"})})
    monkeypatch.setenv("VLLM_TEST_KEY", "secret")
    client = registry.configure(cfg.registry).client
    mv = client.get_model_version("tiny", setup.versions[0])
    cmd, env, served = endpoints.endpoint_command(cfg, f"models:/tiny/{mv.version}", mv, 8123)
    adapter = cmd[cmd.index("--lora-modules") + 1].split("=", 1)[1]
    assert cmd[:3] == ["vllm", "serve", mv.tags["phitune.base_model_path"]]
    assert (Path(adapter) / "adapter_config.json").is_file()  # fetched from the registry's artifacts
    assert served == NAME and env == {"VLLM_API_KEY": "secret"} and "secret" not in cmd
