"""How the suite measures: the machine's matmul peak, interleaved medians, peak memory.

Timing: every side of a case is warmed up once, then the sides are timed in turn, run after run
(a, b, a, b, ...), so a slow spell on a shared machine hits both; the median run counts. Python's
garbage is collected before every timed call and never inside the timer.

Peak memory: the resident-set high-water mark (VmHWM) above the resident set just before the
call, per timed call, the largest over the runs. Before each call, freed heap is handed back
to the OS (glibc malloc_trim) and the high-water mark is reset (writing 5 to
/proc/self/clear_refs), so each side is charged for what its own call touched: activations, KV
cache, logits, temporaries; not the weights, which are resident before the call. tracemalloc
does not see torch's allocations, and torch has no CPU allocator statistics. Linux only; elsewhere
memory figures are n/a.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_STATUS = "/proc/self/status"


def _libc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except OSError:
        return lambda: None


_trim = _libc_trim()


def _status_kib(field_name: str) -> int:
    with open(_STATUS) as f:
        return int(re.search(rf"{field_name}:\s+(\d+) kB", f.read()).group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def call_measured(fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """fn(), its wall seconds, and its peak memory in MiB above the RSS before it (or None)."""
    gc.collect()
    _trim()
    tracked = _reset_peak()
    before = _status_kib("VmRSS") if tracked else 0
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) / 1024 if tracked else None
    return result, seconds, peak


@dataclass
class Side:
    """One side of a case: its median seconds, last output, peak MiB, or why it could not run."""

    seconds: float | None = None
    output: object = None
    peak_mib: float | None = None
    warmup_s: float | None = None
    error: str | None = None
    times: list[float] = field(default_factory=list)


def measure(sides: dict[str, Callable[[], object]], runs: int) -> dict[str, Side]:
    """Warm every side up once, then time them interleaved `runs` times; medians per side.

    A side that raises during warm-up is reported with its error, and the others still run.
    """
    results = {name: Side() for name in sides}
    for name, fn in sides.items():
        try:
            _, results[name].warmup_s, _ = call_measured(fn)
        except Exception as err:  # a colleague's feature may be missing: report, do not stop
            results[name].error = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    live = [name for name in sides if results[name].error is None]
    for _ in range(runs):
        for name in live:
            output, seconds, peak = call_measured(sides[name])
            side = results[name]
            side.output, side.times = output, side.times + [seconds]
            if peak is not None:
                side.peak_mib = max(side.peak_mib or 0.0, peak)
    for name in live:
        results[name].seconds = statistics.median(results[name].times)
    return results


def matmul_peak_gflops(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """The best GFLOP/s of an n x n x n matmul: what MFU is measured against."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(peak_fp32: float, peak_bf16: float) -> str:
    import transformers

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable), torch threads "
            f"{torch.get_num_threads()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, matmul peak fp32 {peak_fp32:.1f} GFLOP/s, bf16 "
            f"{peak_bf16:.1f} GFLOP/s")
