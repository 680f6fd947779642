"""The coordinator gives freed buffers back to the OS at once (issue 23: at most three models).

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after the first model-sized chunk the broker client's 8 MiB chunk bodies come from the heap and
its per-thread arenas, and what they free stays in the process: measured at 10 M parameters × 3
sites, a pika thread's arena of 56 MB and 36 MB more main heap per run. A fixed threshold (which
also turns the dynamic adjustment off) maps each block from ``MMAP_THRESHOLD`` up on its own and
unmaps it when freed. It was 64 KiB, so that pika's 128 KiB frames were mapped too; but pika builds
and parses a message frame by frame in short-lived blocks of 128–256 KiB, and mapping each cost an
``mmap``, an ``munmap`` and 32–64 page faults: at 100 M parameters, 2 s of the coordinator's CPU per
model published and most of its receive cost (profiled, 8 December 2026). At 1 MiB those frames
come from the heap, freed and reused frame after frame (the heap holds a few of them, not a
chunk's worth), while chunk bodies and model-sized arrays are still mapped and unmapped. Nothing
changes but where blocks live; on a C library without ``mallopt`` (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from protocol.messages import Tensors

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # above pika's 128-256 KiB frame blocks, below its 8 MiB chunk bodies

_done = False


def return_freed_buffers() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where not available."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD))
    return _done


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (``VmHWM``), MiB; None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def model_mb(weights: Tensors) -> float:
    return sum(np.asarray(a).nbytes for _, a in weights) / 2**20


__all__ = ["model_mb", "peak_rss_mb", "return_freed_buffers"]
