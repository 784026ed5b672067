"""Live endpoints: blue/green deployment of local (and vLLM) endpoint processes, recorded in the MLflow registry.

The registry is the one source of truth for what is deployed: a version served by endpoint NAME carries
model-version tags `endpoint.NAME.url` (which marks it live), `.pid`, `.started` (the process start
time, so a recycled pid is never mistaken for the endpoint), `.target`, `.model` (the model id to send
in requests; vLLM picks the adapter by it) and `.log`. `phitune endpoints`, the monitor and retire all
read these tags.

Blue/green: the new version starts as its own process on a fresh port, must report healthy and pass
the smoke test, and only then are the tags moved to it and the old process stopped. Any failure stops
the new process and leaves the old one serving, untouched. Endpoint processes run in their own session
(start_new_session) with their output in a log file, so they outlive the flow run that started them
and are not killed by its Ctrl-C.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from mlflow import MlflowClient

from phitune import processes, registry
from phitune.config import PipelineConfig, load_config
from phitune.errors import EndpointError
from phitune.processes import free_port, process_started, stop_process  # also this module's API (serving.bench uses them)
from phitune.registry.store import resolve_tracking_uri
from phitune.registry.tags import ENDPOINT_TAG_PREFIX, endpoint_tag
from phitune.registry.versions import Endpoint, recorded_endpoints

if TYPE_CHECKING:
    from phitune.probes import ProbeReport

FIELDS = ("url", "pid", "started", "target", "model", "log")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_name(name: str) -> str:
    """Endpoint names become tag keys and file names: letters, digits, '-' and '_' only."""
    if not name or not set(name) <= _NAME_CHARS:
        raise EndpointError(f"deployment.endpoint_name: {name!r} must be letters, digits, '-' or '_'")
    return name


# ---------------------------------------------------------------- the registry record

def record(client: MlflowClient, model_name: str, version: str, endpoint: Endpoint) -> None:
    """Write the endpoint's tags on the version it serves (`.url` last: it is what marks the version live)."""
    values = {k: v for k, v in endpoint.to_dict().items() if k in FIELDS and v is not None}
    for key in sorted(values, key=lambda k: k == "url"):
        client.set_model_version_tag(model_name, version, endpoint_tag(endpoint.name, key), str(values[key]))


def clear(client: MlflowClient, model_name: str, version: str, name: str) -> None:
    """Remove every `endpoint.NAME.*` tag from a version (`.url` first: it stops counting as live at once)."""
    tags = client.get_model_version(model_name, version).tags
    prefix = f"{ENDPOINT_TAG_PREFIX}{name}."
    for key in sorted((k for k in tags if k.startswith(prefix)), key=lambda k: not k.endswith(".url")):
        client.delete_model_version_tag(model_name, version, key)


def list_endpoints(client: MlflowClient) -> list[Endpoint]:
    """Every live endpoint recorded in the registry (any registered model), sorted by name."""
    found = [endpoint for mv in client.search_model_versions() for endpoint in recorded_endpoints(mv)]
    return sorted(found, key=lambda e: (e.name, e.model_name, int(e.version) if e.version.isdigit() else 0))


def find_endpoint(client: MlflowClient, name: str) -> Endpoint | None:
    """The live endpoint called `name` (None when there is none)."""
    return next((e for e in list_endpoints(client) if e.name == name), None)


# ---------------------------------------------------------------- processes

def reachable_host(host: str) -> str:
    """The host to put in the URL: a wildcard bind is reached on loopback from this machine."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def serve_command(model_uri: str, host: str, port: int, config: PipelineConfig) -> list[str]:
    """The local endpoint process: `python -m phitune.serving.server` with the deployment's limits."""
    dep = config.deployment
    cmd = [
        sys.executable, "-m", "phitune.serving.server", "--model", model_uri, "--host", host, "--port", str(port),
        "--tracking-uri", resolve_tracking_uri(config.registry.tracking_uri),
        "--max-batch-size", str(dep.max_batch_size), "--max-new-tokens", str(dep.max_new_tokens),
        "--max-request-bytes", str(dep.max_request_bytes),
    ]
    cmd += ["--threads", str(dep.num_threads)] if dep.num_threads else []
    return cmd + (["--api-key-env", dep.api_key_env] if dep.api_key_env else [])


def start_process(cmd: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a detached endpoint process (see phitune.processes); EndpointError when it cannot start."""
    return processes.start_process(cmd, log_file, env, error=EndpointError)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log_file: Path) -> None:
    """Poll GET /health until 200; EndpointError (with the log's tail) if the process exits or time runs out."""
    processes.wait_http(f"{url}/health", proc, timeout_s, log_file, what="the endpoint process", error=EndpointError)


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    return processes.answers(f"{url.rstrip('/')}/health", timeout_s)


# ---------------------------------------------------------------- deploy / stop

SmokeCheck = Callable[[str, str | None], Any]
"""(base_url, model id to send) -> a result; raises (e.g. SmokeTestFailed) when the endpoint is not good enough."""


def probe_smoke_check(
    config: PipelineConfig, on_report: Callable[[ProbeReport], None] | None = None, api_key: str | None = None
) -> SmokeCheck:
    """The configured probe set as a smoke check; `on_report` sees every report, passed or failed.

    The probe set is loaded now, so a bad probe file fails before any process starts. `api_key`
    defaults to the deployment's key (deployment.api_key_env); an endpoint served elsewhere has its own.
    """
    from phitune.probes import SmokeTestFailed, load_probe_set, smoke_test
    from phitune.serving.server import read_api_key

    probe_set = load_probe_set(config.deployment.probes_file)
    key = api_key if api_key is not None else read_api_key(config.deployment.api_key_env)
    report_to = on_report or (lambda report: None)

    def check(url: str, model: str | None) -> dict[str, Any]:
        try:
            report = smoke_test(probe_set, url, api_key=key, timeout_s=config.monitoring.timeout_s, model=model)
        except SmokeTestFailed as exc:
            report_to(exc.report)
            raise
        report_to(report)
        return report.summary()

    return check


def endpoint_command(config: PipelineConfig, model_uri: str, mv: Any, port: int) -> tuple[list[str], dict[str, str], str | None]:
    """The command, extra environment and served model id for the configured target."""
    dep = config.deployment
    if dep.target == "local":
        return serve_command(model_uri, dep.host, port, config), {}, None
    if dep.target == "vllm":
        from phitune.registry.tags import BASE_MODEL_PATH_TAG
        from phitune.serving.server import read_api_key
        from phitune.serving.vllm import vllm_command

        adapter = registry.fetch_adapter(model_uri, config.registry.tracking_uri)
        base = mv.tags.get(BASE_MODEL_PATH_TAG)  # a folder where it was trained, or a hub id
        if not base or (base.startswith("/") and not Path(base).is_dir()):
            from phitune.modeling import resolve_base_model

            base = resolve_base_model(config.model)  # this host's copy of the configured base model
        key = read_api_key(dep.api_key_env)
        cmd = vllm_command(base, adapter, dep.endpoint_name, host=dep.host, port=port,
                           max_new_tokens=dep.max_new_tokens, max_batch_size=dep.max_batch_size)
        return cmd, ({"VLLM_API_KEY": key} if key else {}), dep.endpoint_name
    raise EndpointError(f"deployment.target {dep.target!r} is not started by phitune.serving (local and vllm are)")


def deploy(config: PipelineConfig, model_uri: str, check: SmokeCheck | None = None) -> dict[str, Any]:
    """Blue/green: start `model_uri` on a fresh port, wait for health, smoke-test, switch the registry tags, stop the old.

    Returns {"endpoint", "base_url", "version", "pid", "model_name", "log_file", "replaced", "smoke"}.
    Raises EndpointError with the reason when the new version fails; the old one then keeps serving.
    """
    dep = config.deployment
    name = check_name(dep.endpoint_name)
    check = check or probe_smoke_check(config)
    client = registry.configure(config.registry).client
    mv = registry.get_version(client, model_uri)
    version = str(mv.version)
    pinned = f"models:/{mv.name}/{version}"  # the alias may move; this process serves exactly this version
    log_dir = Path(dep.log_dir).expanduser().resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(log_dir / f"{name}.lock")):
        old = find_endpoint(client, name)
        port = dep.port or free_port(dep.host)
        if old is not None and old.port == port:
            raise EndpointError(f"deployment.port {port} is where {name} v{old.version} serves; blue/green needs a "
                                "fresh port for the new version (set deployment.port=0)")
        cmd, env, served = endpoint_command(config, pinned, mv, port)
        url = f"http://{reachable_host(dep.host)}:{port}"
        log_file = log_dir / f"{name}-v{version}-{port}.log"
        proc = start_process(cmd, log_file, env)
        try:
            wait_healthy(url, proc, dep.startup_timeout_s, log_file)
            smoke = check(url, served)
        except BaseException as exc:
            stop_process(proc.pid)
            if not isinstance(exc, Exception):  # Ctrl-C: stop the new process, but do not disguise the interrupt
                raise
            still = f"v{old.version} still serves {old.url}" if old else "nothing else was serving it"
            raise EndpointError(f"{name}: {mv.name} v{version} was not deployed ({still}): {exc}") from exc
        new = Endpoint(name, mv.name, version, url, dep.target, proc.pid, process_started(proc.pid), served, str(log_file))
        if old is not None:
            clear(client, old.model_name, old.version, name)
        record(client, mv.name, version, new)
        if old is not None and old.pid is not None and old.target in ("local", "vllm"):
            stop_process(old.pid, old.started)
    return {"endpoint": name, "base_url": url, "version": version, "pid": proc.pid, "model_name": mv.name,
            "log_file": str(log_file), "replaced": old.version if old else None, "smoke": smoke}


def stop(config: PipelineConfig, name: str) -> Endpoint:
    """Stop endpoint `name` (its process, or the Azure endpoint) and clear its registry tags."""
    client = registry.configure(config.registry).client
    endpoint = find_endpoint(client, name)
    if endpoint is None:
        live = ", ".join(e.name for e in list_endpoints(client)) or "none"
        raise EndpointError(f"no live endpoint named {name!r} in {client.tracking_uri} (live: {live})")
    if endpoint.target == "azure":
        from phitune.azure.client import connect
        from phitune.azure.endpoints import delete_serverless_endpoint

        delete_serverless_endpoint(connect(config.azure), name)
    elif endpoint.pid is not None:
        stop_process(endpoint.pid, endpoint.started)
    clear(client, endpoint.model_name, endpoint.version, name)
    return endpoint


def cli_list(args: argparse.Namespace) -> int:
    """`phitune endpoints`: every live endpoint in the registry, and whether it answers /health now."""
    config = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    endpoints = list_endpoints(registry.configure(config.registry).client)
    if not endpoints:
        print("no live endpoints")
        return 0
    rows = [("NAME", "MODEL", "VERSION", "URL", "TARGET", "PID", "HEALTHY")] + [
        (e.name, e.model_name, e.version, e.url, e.target, str(e.pid or "-"), "yes" if is_healthy(e.url) else "no")
        for e in endpoints
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cli_stop(args: argparse.Namespace) -> int:
    """`phitune endpoint stop NAME` or `phitune endpoint stop --all` (every local and vLLM endpoint)."""
    config = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    if getattr(args, "all", False):
        names = [e.name for e in list_endpoints(registry.configure(config.registry).client) if e.target in ("local", "vllm")]
    elif args.name:
        names = [args.name]
    else:
        raise EndpointError("name the endpoint to stop (see `phitune endpoints`), or pass --all")
    for name in names:
        endpoint = stop(config, name)
        print(f"stopped {endpoint.name} ({endpoint.model_name} v{endpoint.version} at {endpoint.url}); registry tags cleared")
    if not names:
        print("no live local endpoints")
    return 0
