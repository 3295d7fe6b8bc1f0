"""Peak memory of a piece of CPU work, from the process's resident set (Linux `/proc/self`).

Why resident memory and not an allocator counter: on CUDA, `torch.cuda.max_memory_allocated` counts every
tensor byte; torch's CPU allocator keeps no such counter, and what a CPU prefill really costs is the memory
the process holds: tensors, but also oneDNN scratch buffers and anything else the kernels allocate. So the
peak is read from the kernel: `VmHWM` (the resident high-water mark) is reset by writing `5` to
`/proc/self/clear_refs`, the work runs, and the peak *growth* is `VmHWM - VmRSS` taken just before it.

Two things would make that reading dishonest, and both are handled:
- glibc's malloc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which blocks
  below it may come from the heap, and freed heap memory is kept for reuse: a prefill could then reuse memory
  freed before the measurement and show less growth than it needs. The measuring process is started with
  `MALLOC_MMAP_THRESHOLD_` fixed at 64 KiB (`MALLOC_ENV`; a fixed threshold also turns the dynamic one off),
  so every tensor above 64 KiB is its own mapping, returned to the system when freed. (A precaution: with
  torch 2.13 on this machine a test built to provoke the reuse did not show it without the setting either.)
- one-time allocations (thread pools, kernel caches) of the first call are not the work's: callers run the
  work once before measuring it.

`measure()` refuses to run without the fixed threshold. `tests/test_cpu_memory.py` checks the reading: a
tensor of known size held during the work shows up as that many bytes, a temporary one as peak only, and
memory freed before the measurement is not reused silently.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{key} not found in /proc/self/status (Linux only)")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Resident high-water mark since the process started or since the last `reset_peak()`."""
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    """Reset `VmHWM` to the current resident size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def check_environment() -> None:
    """Raise unless this process was started with the fixed malloc threshold (`MALLOC_ENV`)."""
    missing = {k: v for k, v in MALLOC_ENV.items() if os.environ.get(k) != v}
    if missing:
        raise RuntimeError(
            f"CPU peak memory is only honest in a process started with {missing} in its environment "
            "(glibc would otherwise reuse memory freed before the measurement); use run_in_subprocess()"
        )


def measure(fn: Callable[[], object]) -> tuple[object, dict[str, int]]:
    """Run `fn()` and return its result and `{"peak_growth_bytes", "retained_bytes", "baseline_bytes"}`:
    the resident high-water mark during `fn` and the resident size after it (result still alive), each minus
    the resident size just before it."""
    check_environment()
    gc.collect()
    reset_peak()
    baseline = rss_bytes()
    result = fn()
    peak = peak_rss_bytes()
    return result, {
        "peak_growth_bytes": peak - baseline,
        "retained_bytes": rss_bytes() - baseline,
        "baseline_bytes": baseline,
    }


def run_in_subprocess(args: list[str], timeout: float | None = None) -> dict:
    """Run `python <args>` in a fresh process with `MALLOC_ENV`; its last stdout line is JSON, returned.

    Raises:
        RuntimeError: the process failed (its stderr's tail is in the message).
    """
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"memory probe {args} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"memory probe {args} printed nothing; stderr:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
