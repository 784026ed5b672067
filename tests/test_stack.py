"""deployments.stack without servers: config, ports, environment, and stopping exactly what was started."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import prefect
import psutil
import pytest
import yaml

from deployments.stack import (
    StackConfig,
    StackError,
    _spawn,
    _write_state,
    check_database,
    check_port_free,
    cli_stack,
    down,
    load_stack_config,
    read_state,
    stack_env,
    status,
    up,
)
from phitune.errors import ConfigError
from phitune.processes import free_port
from stack_support import ROOT


def test_committed_stack_config_loads_and_overrides_name_fields() -> None:
    cfg = load_stack_config(ROOT / "configs" / "stack.yaml", ["prefect.port=4300", "workers.gpu=0"])
    assert (cfg.prefect.port, cfg.mlflow.port, cfg.workers.gpu, cfg.prefect.database_url) == (4300, 5000, 0, None)
    with pytest.raises(ConfigError, match=r"prefect\.prot: unknown field"):
        load_stack_config(ROOT / "configs" / "stack.yaml", ["prefect.prot=1"])
    with pytest.raises(ConfigError, match=r"mlflow\.port: Input should be less than or equal to 65535"):
        load_stack_config(None, ["mlflow.port=70000"])


def test_a_bad_stack_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_stack_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefect: [")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_stack_config(bad)
    bad.write_text("- prefect\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: the top level must be a mapping \(keys: host, state_dir, "):
        load_stack_config(bad)


def test_environment_points_every_process_at_the_stack(tmp_path: Path) -> None:
    cfg = StackConfig(state_dir=str(tmp_path), prefect={"port": 4311}, mlflow={"port": 5311})
    env = stack_env(cfg)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4311/api"
    assert env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / "results")
    assert env["PHITUNE_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5311"
    assert (env["DO_NOT_TRACK"], env["PREFECT_SERVER_ANALYTICS_ENABLED"], env["MLFLOW_DISABLE_TELEMETRY"]) == ("1", "false", "true")
    assert "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK" not in env
    assert stack_env(cfg.model_copy(update={"result_storage": "s3-bucket/results"}))["PREFECT_DEFAULT_RESULT_STORAGE_BLOCK"] == "s3-bucket/results"


def test_a_port_in_use_is_named_with_the_setting_to_change(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError, match=rf"port {port} on 127.0.0.1 is in use.*prefect\.port=<port>"):
            check_port_free("127.0.0.1", port, "prefect.port")
        cfg = StackConfig(state_dir=str(tmp_path / "s"), prefect_file=str(ROOT / "prefect.yaml"),
                          prefect={"port": free_port()}, mlflow={"port": port})
        with pytest.raises(StackError, match=rf"port {port} .*mlflow\.port=<port>"):
            up(cfg)
    assert read_state(cfg) is None, "nothing was started, nothing recorded"


def test_an_unreachable_postgres_backend_is_named() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StackError, match=rf"mlflow\.backend_store_uri: cannot connect to 127\.0\.0\.1:{port}/mlflow"):
        check_database(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow", "mlflow.backend_store_uri")
    check_database("sqlite:///x.db", "mlflow.backend_store_uri")  # not PostgreSQL: nothing to check


def _children_script() -> list[str]:
    # A parent that starts a child in the same group and a grandchild in its own session (like a
    # worker's flow-run subprocess); all three must go.
    code = (
        "import subprocess, sys, time;"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True);"
        "time.sleep(300)"
    )
    return [sys.executable, "-c", code]


def test_down_stops_what_up_recorded_children_included_and_nothing_else(tmp_path: Path) -> None:
    cfg = StackConfig(state_dir=str(tmp_path), prefect_file=str(ROOT / "prefect.yaml"))
    (tmp_path / "logs").mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    state = {"processes": [], "urls": {}, "timings": {}}
    try:
        proc, _ = _spawn(cfg, state, "fake-worker", _children_script(), {})
        leader = psutil.Process(proc.pid)
        deadline = time.monotonic() + 20
        while len(leader.children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        family = [leader, *leader.children(recursive=True)]
        assert len(family) == 3
        assert len({os.getsid(p.pid) for p in family}) == 2
        assert status(cfg)["processes"] == {"fake-worker": "running"}

        stopped = down(cfg, out=lambda _: None)

        assert stopped == ["fake-worker"]
        proc.wait(5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
        assert bystander.poll() is None, "a process the stack did not start was touched"
        assert read_state(cfg) is None
    finally:
        bystander.kill()


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(tmp_path: Path) -> None:
    cfg = StackConfig(state_dir=str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        # Same pid, other start time: the process we started is gone and the pid was reused.
        started = psutil.Process(other.pid).create_time()
        _write_state(cfg, {"processes": [{"name": "old", "pid": other.pid, "create_time": started - 100, "cmd": [], "log": ""}]})
        assert status(cfg)["processes"] == {"old": "stopped"}
        assert down(cfg, out=lambda _: None) == []
        assert other.poll() is None
    finally:
        other.kill()


def test_up_refuses_while_a_recorded_stack_runs(tmp_path: Path) -> None:
    cfg = StackConfig(state_dir=str(tmp_path), prefect_file=str(ROOT / "prefect.yaml"))
    (tmp_path / "logs").mkdir()
    state = {"processes": [], "urls": {}, "timings": {}}
    _spawn(cfg, state, "server", [sys.executable, "-c", "import time; time.sleep(300)"], {})
    try:
        with pytest.raises(StackError, match="already running.*phitune stack down"):
            up(cfg)
    finally:
        down(cfg, out=lambda _: None)


def test_prefect_yaml_declares_the_deployments_and_pools() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {(d["entrypoint"].split(":")[1], d["name"]): d for d in spec["deployments"]}
    assert set(deployments) == {("finetune", "on-demand"), ("finetune", "nightly"), ("train", "gpu"),
                                ("monitor", "every-5-minutes"), ("retire", "on-demand"), ("rollback", "on-breach")}
    assert deployments[("finetune", "nightly")]["schedules"][0]["cron"]
    assert deployments[("monitor", "every-5-minutes")]["schedules"][0]["interval"] == 300
    assert deployments[("train", "gpu")]["work_pool"]["name"] == "gpu"
    assert all(d["enforce_parameter_schema"] for d in deployments.values())
    assert {d["work_pool"]["name"] for k, d in deployments.items() if k[0] != "train"} == {"cpu"}


def test_every_deployment_entrypoint_is_a_prefect_flow() -> None:
    """What a worker loads: `path/to/file.py:function` must name a @flow in that file."""
    for dep in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, function = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file(), dep["entrypoint"]
        module = importlib.import_module(".".join(Path(path).with_suffix("").parts))
        assert Path(module.__file__) == ROOT / path, dep["entrypoint"]
        assert isinstance(getattr(module, function, None), prefect.Flow), f"{dep['entrypoint']}: not a Prefect flow"


def test_status_without_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state")}))
    assert cli_stack(argparse.Namespace(action="status", config=str(stack_file), overrides=[])) == 3
    assert '"running": false' in capsys.readouterr().out
