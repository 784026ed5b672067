"""Detached processes phitune starts, waits for, finds again and stops: endpoint servers, and the
local stack's servers and workers (deployments/stack.py).

Both must outlive the command that started them and not die of its Ctrl-C, so each runs in its own
session with stdin closed and its output appended to a log file. Both are found again later by a
recorded pid, and a pid alone is not enough (the process may be gone and its pid reused), so a
process is identified by pid and start time. Errors carry the caller's error class (`error`), so an
endpoint fails with EndpointError and the stack with StackError.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

ErrorFactory = Callable[[str], Exception]
"""Builds the exception a caller raises, from the message (e.g. EndpointError)."""

SAME_START_S = 1.0
"""Two start times this close are one process. Not exact: psutil derives them from the boot time,
which another process may read a fraction of a second apart after a clock adjustment; a pid reused
within a second would take the whole pid range cycling through in that second."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_process(
    cmd: list[str], log_file: Path, env: dict[str, str] | None = None, *, cwd: Path | None = None, error: ErrorFactory
) -> subprocess.Popen[bytes]:
    """Start `cmd` detached: own session, stdin closed, output appended to `log_file` after a header line."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"\n=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            return subprocess.Popen(
                cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        except OSError as exc:
            raise error(f"cannot start {cmd[0]}: {exc}") from None


def tail(log_file: Path | str | None, lines: int = 15) -> str:
    """The last lines of a log, indented, to put under an error message ('' when there is none)."""
    try:
        text = Path(log_file).read_text(encoding="utf-8", errors="replace") if log_file else ""
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET `url` answers 200 now."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float, log_file: Path | str, *, what: str, error: ErrorFactory
) -> None:
    """Poll GET `url` until 200. Fail at once, with the log's tail, when the process exits: a server that
    crashed while loading would otherwise be waited for until the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{what} exited with status {proc.returncode} before it was healthy; log {log_file}:\n{tail(log_file)}")
        if answers(url):
            return
        time.sleep(0.25)
    raise error(f"{what} did not answer {url} within {timeout_s:g} s; log {log_file}:\n{tail(log_file)}")


def process_started(pid: int) -> float | None:
    """The start time to record beside a pid (None when it is already gone)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def find_process(pid: int, started: float | None = None) -> psutil.Process | None:
    """The running process with this pid if it is the one recorded (same start time, when given); else None."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if started is not None and abs(proc.create_time() - started) > SAME_START_S:
            return None  # the pid was reused by another process
        return proc
    except psutil.Error:
        return None


def family(pid: int, started: float) -> list[psutil.Process]:
    """The recorded process, its descendants (even those in sessions of their own, like a worker's
    flow runs) and anything left in its process group (a member outlives its leader)."""
    found: dict[int, psutil.Process] = {}
    if (leader := find_process(pid, started)) is not None:
        found[leader.pid] = leader
        for child in leader.children(recursive=True):
            found[child.pid] = child
    for proc in psutil.process_iter():
        try:
            # Not the pid itself: a group member outlives its leader, but a reused pid is a new leader.
            if proc.pid not in found and proc.pid != pid and os.getpgid(proc.pid) == pid:
                found[proc.pid] = proc
        except (psutil.Error, ProcessLookupError):
            pass
    return list(found.values())


def stop(procs: list[psutil.Process], timeout_s: float = 15.0) -> None:
    """SIGTERM all (a graceful exit: uvicorn drains requests), SIGKILL those still there after `timeout_s`.

    Waiting reaps the ones that are our children."""
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_process(pid: int, started: float | None = None, timeout_s: float = 15.0) -> bool:
    """Stop the recorded process alone (see `stop`); True if it was still running."""
    proc = find_process(pid, started)
    stop([proc] if proc else [], timeout_s)
    return proc is not None
