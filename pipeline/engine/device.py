"""Where and at what precision models run: the device a config names, and bf16 autocast only where it is native
(CUDA with bf16, AVX-512 BF16 CPUs; on AVX2-only CPUs bf16 matmul is emulated and slower than fp32); the machine's
name and matmul peak, which every measured figure states."""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """Whether this CPU runs bf16 matmuls natively (otherwise autocast only slows things down)."""
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16")) and bool(
            torch.cpu._is_avx512_bf16_supported()
        )
    except AttributeError:
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a config's `device` names: "auto" is CUDA when present, else the CPU.

    Raises:
        ValueError: when CUDA is asked for and torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but torch sees no CUDA device here; use device='auto' or 'cpu'")
    return torch.device(name)


def _bf16_native(device_type: str) -> bool:
    return torch.cuda.is_bf16_supported() if device_type == "cuda" else bf16_supported()


def precision_used(bf16: bool, device: torch.device | str = "cpu") -> str:
    """What autocast(bf16) really runs on this device."""
    return "bf16" if bf16 and _bf16_native(torch.device(device).type) else "fp32"


def autocast(enabled: bool, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast where the device runs bf16 natively (CUDA with bf16, AVX-512 BF16 CPUs), else a no-op."""
    kind = torch.device(device).type
    if enabled and _bf16_native(kind):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously), so a clock read after it is true."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model and its widest SIMD level, e.g. 'AMD EPYC 7B13 (AVX2)'."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def best_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """The fastest of `repeats` calls of `fn` after one untimed warm-up, synchronized with the device."""
    fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1536, repeats: int = 5,
                    device: torch.device | str = "cpu") -> float:
    """This machine's matmul FLOP/s at a dtype on a device (the CPU with torch's current threads): best of
    `repeats` n×n×n products."""
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_seconds(lambda: torch.matmul(a, b), repeats, device)
