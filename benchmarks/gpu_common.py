"""Shared pieces of benchmarks/gpu.py: the time budget, timing, peak memory, the SDPA switch."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class Budget:
    """The run's deadline; ``section(s)`` is a deadline ``s`` seconds away, capped by the run's."""

    def __init__(self, seconds: float, quick: bool) -> None:
        self.end = time.monotonic() + (seconds if not quick else 1e9)
        self.quick = quick

    def left(self) -> float:
        return self.end - time.monotonic()

    def section(self, seconds: float) -> Budget:
        sub = Budget(0, self.quick)
        sub.end = min(self.end, time.monotonic() + (seconds if not self.quick else 1e9))
        return sub


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device, warmup: int, iters: int, budget: float) -> float:
    """Median seconds per call after ``warmup`` calls; stops early when ``budget`` runs out."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.monotonic()
    while len(times) < iters and (not times or time.monotonic() - start < budget):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def sdpa_mode(mode: str) -> None:
    from pipeline.model import attention

    attention.SDPA_MODE = mode


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
