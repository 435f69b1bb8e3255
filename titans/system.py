"""Process-level settings for CPU runs, applied by the command-line entry points (never at import time)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys

# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3)
_M_MMAP_THRESHOLD = -3


def pin_malloc_mmap_threshold(threshold_bytes: int = 4 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap, so freed large tensors go back to the OS at once.

    glibc raises its mmap threshold dynamically after large blocks are freed, after which multi-MB tensors come
    from the heap and freed ones stay in the process: the memory scan's many same-sized temporaries then inflate
    RSS to several times the live tensor memory. Setting the threshold explicitly switches that adaptation off.
    Measured (dim-256 memory, batch 4, 512 tokens, 3 x forward + backward): peak RSS +3,065 MB with glibc's default,
    +563 MB pinned at 64 KiB, +630 MB at 4 MiB. The threshold must not be small: at 64 KiB every mid-sized
    temporary is an mmap/munmap pair, and the default MAC copy run's training step took 0.63 s instead of 0.28 s
    (0.28 s at 4 MiB, the default here). Returns whether the setting was applied (only on Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def cpu_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would use, or None when there is none.

    Inductor builds its CPU kernels with $CXX, else the first of g++, c++, clang++ on PATH.
    """
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def compile_options(backend: str, device_type: str) -> dict | None:
    """torch.compile options for this project's compiled paths (training segments and chunks, the decode step).

    On CPU, inductor's C++ wrapper: the glue between the generated kernels (a few hundred kernel and small-matmul
    calls per compiled segment or decode step) becomes C++ instead of Python. Measured on 2 CPU cores: MAC training
    5.8k -> 6.9k tokens/s (d_model 64, batch 4, T 1024), decoding 390 -> 456 tokens/s. A cold compilation takes
    longer (about 2 minutes for a MAC training segment, forward and backward); a warm cache loads in seconds.
    """
    return {"cpp_wrapper": True} if backend == "inductor" and device_type == "cpu" else None
