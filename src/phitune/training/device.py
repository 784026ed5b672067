"""Where and in what precision training runs: CUDA with bf16 when it can, else the CPU (bf16 where it is native).

bf16 autocast halves the matmul cost only where the hardware computes in bf16: CUDA from Ampere on,
and x86 CPUs with AVX512-BF16 or AMX (ARM: the `bf16` feature). Elsewhere bf16 is emulated and
slower than fp32, so 'auto' picks fp32 there. The choice depends only on the hardware (CPU flags,
CUDA capability), so a run resumed on the same machine computes like the run it continues.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch

from phitune.config import TrainingConfig
from phitune.errors import ConfigError

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16, x86 AMX, aarch64 BF16
MIN_THREAD_GAIN = 1.2
"""More than one thread is used only when a probe matmul runs at least this much faster with them."""
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" | "cuda"
    precision: str  # "bf16" | "fp16" | "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of matmuls (and of the frozen base weights)."""
        return _DTYPES[self.precision]

    def autocast(self) -> AbstractContextManager[None]:
        """Mixed precision for forward passes; a no-op context in fp32."""
        return torch.autocast(device_type=self.device, dtype=self.dtype, enabled=self.precision != "fp32")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (not emulated) and PyTorch can run a bf16 matmul on it."""
    if not (_cpu_flags() & _CPU_BF16_FLAGS):
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16)
        return bool(torch.isfinite(a @ a).all())
    except RuntimeError:
        return False


def cpu_threads() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _matmul_seconds(threads: int, size: int = 512, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return best


def set_cpu_threads(requested: int | None = None, local_processes: int = 1) -> int:
    """Set PyTorch's intra-op threads: `requested`, else one per available CPU shared among this host's processes.

    Without a request, an explicit OMP_NUM_THREADS (the user's choice) is left alone. On a CPU that
    other jobs keep busy, several OpenMP threads wait on each other at every barrier and run many
    times slower than one thread (measured here: 10x at a load of 8 on 2 cores), so a quick matmul
    probe keeps the default only if it really is faster than one thread.
    """
    if requested is not None:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, cpu_threads() // max(1, local_processes))
        if threads > 1 and _matmul_seconds(1) < MIN_THREAD_GAIN * _matmul_seconds(threads):
            threads = 1
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def pick_runtime(cfg: TrainingConfig) -> Runtime:
    """Resolve training.device and training.precision ('auto' included) to what this machine can do."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("training.device is 'cuda' but no CUDA device is visible (set training.device=auto or cpu)")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    precision = cfg.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ConfigError("training.precision 'fp16' needs a CUDA device; on the CPU use 'bf16' or 'fp32' (or 'auto')")
    return Runtime(device, precision)
