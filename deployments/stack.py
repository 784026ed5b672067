"""The local stack behind `make up` / `make down`: servers, workers, and nothing left behind.

`up` starts, for real, a Prefect server and an MLflow tracking server on 127.0.0.1, provisions Prefect
(work pools, the `gpu-training` concurrency limit, `prefect deploy --all`, the automations; in
`deployments/provision.py`, run as a subprocess: Prefect takes the server to talk to from the
environment of the process that imports it, and `phitune stack status` stays instant), then the
workers. Every process is started detached (phitune.processes) and recorded in a state file the
moment it exists, so `down` stops exactly what `up` started, children included, even after a failed
start-up. Ports, backends and worker counts come from configs/stack.yaml, apart from the pipeline
config.

Infrastructure, not the core library: the core (src/phitune) knows nothing of Prefect servers,
workers or the state file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field

from phitune import processes
from phitune.config import load_model
from phitune.errors import PhituneError

DEFAULT_STACK_FILE = "configs/stack.yaml"
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
GPU_LIMIT = "gpu-training"
"""The global concurrency limit the `train` flow occupies: one slot per GPU."""


class StackError(PhituneError):
    """The stack cannot start or stop (a port in use, a server that does not come up, a stale state)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrefectServerConfig(_Section):
    port: int = Field(4200, ge=1, le=65535, description="Port of the Prefect server (API and UI).")
    database_url: str | None = Field(
        None, description="Prefect's database; empty: SQLite under state_dir. Production: postgresql+asyncpg://..."
    )
    settings: dict[str, str] = Field(
        default_factory=dict,
        description="Extra PREFECT_* settings for the server, e.g. PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS.",
    )


class MlflowServerConfig(_Section):
    port: int = Field(5000, ge=1, le=65535, description="Port of the MLflow tracking server (API and UI).")
    backend_store_uri: str = Field("sqlite:///.phitune/mlflow.db", description="Runs and registry: sqlite:///... or postgresql+psycopg2://...")
    artifacts_destination: str = Field(".phitune/mlartifacts", description="Artifact root the server proxies: a folder or an object-store URI.")


class WorkersConfig(_Section):
    cpu: int = Field(1, ge=0, le=32, description="Process workers on the `cpu` pool.")
    gpu: int = Field(1, ge=0, le=32, description="Process workers on the `gpu` pool (training).")
    poll_seconds: float = Field(2.0, gt=0, le=60, description="How often a worker polls for runs.")


class StackConfig(_Section):
    """What `phitune stack up` starts; relative paths are relative to the folder it runs in."""

    host: str = Field("127.0.0.1", description="Interface every server binds to.")
    state_dir: str = Field(".phitune/stack", description="PREFECT_HOME, logs, the state file and local results.")
    prefect_file: str = Field("prefect.yaml", description="Deployments file; its folder is the project root workers run in.")
    prefect: PrefectServerConfig = Field(default_factory=PrefectServerConfig)
    mlflow: MlflowServerConfig = Field(default_factory=MlflowServerConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    gpus: int = Field(1, ge=1, description="Slots of the `gpu-training` concurrency limit (one training per GPU).")
    result_storage: str | None = Field(None, description="Result storage block slug; empty: a folder under state_dir.")
    automations: bool = Field(True, description="Create phitune's automations (they need phitune's deployments).")

    def path(self, value: str) -> Path:
        return Path(value).expanduser().resolve()

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def root(self) -> Path:
        """The project root: where prefect.yaml lives and where flow runs execute."""
        return self.path(self.prefect_file).parent

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect.port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow.port}"


def load_stack_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StackConfig:
    """Read `path` (default: configs/stack.yaml when it exists, else the defaults), apply overrides, validate."""
    return load_model(StackConfig, path, overrides, default_path=DEFAULT_STACK_FILE)


def _sqlite_absolute(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db, so every process sees the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _local_or_uri(value: str) -> str:
    return value if "://" in value else str(Path(value).resolve())


def stack_env(cfg: StackConfig) -> dict[str, str]:
    """Environment every stack process (and any shell that wants to talk to the stack) runs with.

    Result persistence is on by default, in one place all workers can read: that is what lets a
    retried flow run reuse its completed tasks, and the pipeline read the result of `train/gpu`.
    """
    state = cfg.state_path
    env = {
        **TELEMETRY_OFF,
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_URL": f"{cfg.prefect_url}/api",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(state / "results"),
        "PREFECT_WORKER_QUERY_SECONDS": str(cfg.workers.poll_seconds),
        "MLFLOW_TRACKING_URI": cfg.mlflow_url,
        "PHITUNE_TRACKING_URI": cfg.mlflow_url,
        "PHITUNE_ROOT": str(cfg.root),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cfg.result_storage:
        env["PREFECT_DEFAULT_RESULT_STORAGE_BLOCK"] = cfg.result_storage
    return env


def _server_env(cfg: StackConfig) -> dict[str, str]:
    env = {**stack_env(cfg), **cfg.prefect.settings}
    if cfg.prefect.database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = cfg.prefect.database_url
    return env


def check_port_free(host: str, port: int, setting: str) -> None:
    """Raise StackError naming the port and the setting to change when something listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StackError(
                f"port {port} on {host} is in use ({exc.strerror}); stop what listens there or pick another "
                f"port: phitune stack up {setting}=<port>"
            ) from None


def check_database(url: str, setting: str) -> None:
    """Fail early, naming the setting, when a PostgreSQL backend cannot be reached."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgresql"):
        return
    import psycopg2

    try:
        psycopg2.connect(
            host=parts.hostname, port=parts.port or 5432, user=parts.username, password=parts.password,
            dbname=parts.path.lstrip("/") or "postgres", connect_timeout=5,
        ).close()
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0]
        raise StackError(f"{setting}: cannot connect to {parts.hostname}:{parts.port or 5432}{parts.path}: {first}") from None


# ---------------------------------------------------------------- the state file and the processes it records


def _state_file(cfg: StackConfig) -> Path:
    return cfg.state_path / "state.json"


def read_state(cfg: StackConfig) -> dict[str, Any] | None:
    file = _state_file(cfg)
    return json.loads(file.read_text()) if file.exists() else None


def _write_state(cfg: StackConfig, state: dict[str, Any]) -> None:
    file = _state_file(cfg)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(file)


def _spawn(
    cfg: StackConfig, state: dict[str, Any], name: str, cmd: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `cmd` with its log under state_dir/logs and record it at once; (process, log)."""
    log = cfg.state_path / "logs" / f"{name}.log"
    proc = processes.start_process(cmd, log, env, cwd=cfg.root, error=StackError)
    state["processes"].append(
        {"name": name, "pid": proc.pid, "create_time": processes.process_started(proc.pid), "cmd": cmd, "log": str(log)}
    )
    _write_state(cfg, state)
    return proc, log


def _alive(entry: dict[str, Any]) -> bool:
    """Whether a recorded process still runs (the same one: a reused pid does not count)."""
    return processes.find_process(entry["pid"], entry["create_time"]) is not None


def _online_workers(cfg: StackConfig, pool: str) -> set[str]:
    resp = httpx.post(f"{cfg.prefect_url}/api/work_pools/{pool}/workers/filter", json={}, timeout=5)
    resp.raise_for_status()
    return {w["name"] for w in resp.json() if w.get("status") == "ONLINE"}


def _stop(entries: list[dict[str, Any]]) -> list[str]:
    """Stop everything we started, with its children and group (all at once: `down` takes one grace
    period, not one per process); the names of those that were still running."""
    stopped: list[str] = []
    procs: list[psutil.Process] = []
    for entry in reversed(entries):
        if family := processes.family(entry["pid"], entry["create_time"]):
            stopped.append(entry["name"])
            procs.extend(family)
    processes.stop(procs)
    return stopped


# ---------------------------------------------------------------- up / down / status


def _venv_bin(tool: str) -> str:
    """A console script of this interpreter's environment (prefect, mlflow), found without PATH."""
    return str(Path(sys.executable).with_name(tool))


def up(cfg: StackConfig, out: Callable[[str], None] = print, timeout: float = 180.0) -> dict[str, Any]:
    """Start the stack; return the state (processes, URLs, timings). On any failure stop what started."""
    if (state := read_state(cfg)) is not None:
        if any(_alive(entry) for entry in state["processes"]):
            raise StackError(f"a stack is already running from {_state_file(cfg)}: run `phitune stack down` first")
        _state_file(cfg).unlink()
    check_port_free(cfg.host, cfg.prefect.port, "prefect.port")
    check_port_free(cfg.host, cfg.mlflow.port, "mlflow.port")
    if cfg.prefect.database_url:
        check_database(cfg.prefect.database_url, "prefect.database_url")
    check_database(cfg.mlflow.backend_store_uri, "mlflow.backend_store_uri")
    if not (cfg.root / Path(cfg.prefect_file).name).exists():
        raise StackError(f"prefect_file: {cfg.path(cfg.prefect_file)} not found")
    for sub in ("logs", "prefect", "results"):
        (cfg.state_path / sub).mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    state = {"config": cfg.model_dump(), "processes": [], "urls": {}, "timings": {}}
    _write_state(cfg, state)
    try:
        _up(cfg, state, out, timeout, t0)
    except BaseException:
        _stop(state["processes"])
        _state_file(cfg).unlink(missing_ok=True)
        raise
    return state


def _up(cfg: StackConfig, state: dict[str, Any], out: Callable[[str], None], timeout: float, t0: float) -> None:
    env = stack_env(cfg)
    timings = state["timings"]
    mlflow_artifacts = _local_or_uri(cfg.mlflow.artifacts_destination)
    if "://" not in mlflow_artifacts:
        Path(mlflow_artifacts).mkdir(parents=True, exist_ok=True)
    backend = _sqlite_absolute(cfg.mlflow.backend_store_uri)
    if backend.startswith("sqlite:///"):
        Path(backend[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # MLflow's job runner (GenAI jobs: 8 extra processes) is not used by phitune: off.
    mlflow_proc, mlflow_log = _spawn(cfg, state, "mlflow-server", [
        _venv_bin("mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", mlflow_artifacts,
        "--host", cfg.host, "--port", str(cfg.mlflow.port), "--workers", "1",
    ], {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    prefect_proc, prefect_log = _spawn(cfg, state, "prefect-server", [
        _venv_bin("prefect"), "server", "start", "--host", cfg.host, "--port", str(cfg.prefect.port),
    ], _server_env(cfg))
    processes.wait_http(f"{cfg.prefect_url}/api/health", prefect_proc, timeout, prefect_log, what="the Prefect server", error=StackError)
    timings["prefect_server_s"] = round(time.monotonic() - t0, 1)
    processes.wait_http(f"{cfg.mlflow_url}/health", mlflow_proc, timeout, mlflow_log, what="the MLflow server", error=StackError)
    timings["mlflow_server_s"] = round(time.monotonic() - t0, 1)
    state["urls"] = {"prefect_ui": cfg.prefect_url, "prefect_api": env["PREFECT_API_URL"], "mlflow_ui": cfg.mlflow_url}
    out(f"Prefect server up at {cfg.prefect_url} ({timings['prefect_server_s']} s); MLflow at {cfg.mlflow_url} ({timings['mlflow_server_s']} s)")

    t1 = time.monotonic()
    provision = subprocess.run(
        [sys.executable, "-m", "deployments.provision", "--prefect-file", str(cfg.path(cfg.prefect_file)),
         "--gpus", str(cfg.gpus), "--log", str(cfg.state_path / "logs" / "provision.log"),
         *([] if cfg.automations else ["--no-automations"])],
        cwd=cfg.root, env={**os.environ, **env}, capture_output=True, text=True,
    )
    if provision.returncode != 0:
        raise StackError(
            f"provisioning Prefect failed (work pools, deployments, automations); log {cfg.state_path / 'logs' / 'provision.log'}:\n"
            + "\n".join(provision.stderr.strip().splitlines()[-8:])
        )
    out(provision.stdout.rstrip())
    timings["provision_s"] = round(time.monotonic() - t1, 1)

    t2 = time.monotonic()
    names = [f"{pool}-{i}" for pool, count in (("cpu", cfg.workers.cpu), ("gpu", cfg.workers.gpu)) for i in range(1, count + 1)]
    start_workers(cfg, state, names, timeout)
    timings["workers_s"] = round(time.monotonic() - t2, 1)
    timings["total_s"] = round(time.monotonic() - t0, 1)
    _write_state(cfg, state)
    out(f"workers online: {', '.join(names) or 'none'} ({timings['workers_s']} s)")
    out(f"stack up in {timings['total_s']} s\n  Prefect UI  {cfg.prefect_url}\n  MLflow UI   {cfg.mlflow_url}\n"
        f"  talk to it: export PREFECT_API_URL={env['PREFECT_API_URL']} MLFLOW_TRACKING_URI={cfg.mlflow_url}\n"
        f"  stop it:    make down   (state: {_state_file(cfg)})")


def start_workers(cfg: StackConfig, state: dict[str, Any], names: list[str], timeout: float = 120.0) -> None:
    """Start process workers named `<pool>-<n>` (flow runs start as their children), recorded in `state`
    so that `down` stops them too; return once the Prefect server lists every one online."""
    for name in names:
        _spawn(cfg, state, f"worker-{name}", [
            _venv_bin("prefect"), "worker", "start", "--pool", name.rsplit("-", 1)[0], "--type", "process", "--name", name,
            "--no-create-pool-if-not-found",
        ], stack_env(cfg))
    workers = [e for e in state["processes"] if e["name"] in {f"worker-{n}" for n in names}]
    pools = {n.rsplit("-", 1)[0] for n in names}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in workers:
            if not _alive(entry):
                raise StackError(f"{entry['name']} exited during start-up; log {entry['log']}:\n{processes.tail(entry['log'])}")
        if set(names) <= {w for pool in pools for w in _online_workers(cfg, pool)}:
            return
        time.sleep(0.5)
    raise StackError(f"workers did not come online within {timeout:.0f} s; logs under {cfg.state_path / 'logs'}")


def down(cfg: StackConfig, out: Callable[[str], None] = print) -> list[str]:
    """Stop what the state file says `up` started (and their children); remove the state file."""
    state = read_state(cfg)
    if state is None:
        out(f"no stack running from {cfg.state_path} (no state file)")
        return []
    stopped = _stop(state["processes"])
    _state_file(cfg).unlink(missing_ok=True)
    out(f"stopped: {', '.join(stopped) if stopped else 'nothing was still running'}")
    return stopped


def status(cfg: StackConfig) -> dict[str, Any]:
    """Which recorded processes are alive, and the URLs and start-up timings of the running stack."""
    state = read_state(cfg)
    if state is None:
        return {"running": False, "processes": {}}
    procs = {e["name"]: ("running" if _alive(e) else "stopped") for e in state["processes"]}
    return {"running": any(v == "running" for v in procs.values()), "processes": procs,
            "urls": state.get("urls", {}), "timings": state.get("timings", {})}


def cli_stack(args: argparse.Namespace) -> int:
    """`phitune stack up|down|status [--config configs/stack.yaml] [key=value ...]`."""
    cfg = load_stack_config(getattr(args, "config", None), getattr(args, "overrides", None))
    if args.action == "up":
        up(cfg)
    elif args.action == "down":
        down(cfg)
    else:
        info = status(cfg)
        print(json.dumps(info, indent=2))
        return 0 if info["running"] else 3
    return 0

