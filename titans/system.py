"""Process-level settings for CPU runs, applied by the command-line entry points (never at import time)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3)
_M_MMAP_THRESHOLD = -3


def pin_malloc_mmap_threshold(threshold_bytes: int = 4 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with mmap, so freed large tensors go back to the OS at once.

    glibc raises its mmap threshold dynamically after large blocks are freed, after which multi-MB tensors come
    from the heap and freed ones stay in the process: the memory scan's many same-sized temporaries then inflate
    RSS to several times the live tensor memory. Setting the threshold explicitly switches that adaptation off.
    The threshold must not be small either: at 64 KiB every mid-sized temporary is an mmap/munmap pair, which slows
    a training step down; 4 MiB keeps the peak RSS low at full speed (both measured in benchmarks/README.md).
    Returns whether the setting was applied (only on Linux with glibc).
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
    calls per compiled segment or decode step) becomes C++ instead of Python, which speeds up both MAC training and
    decoding on CPU (benchmarks/README.md). A cold compilation takes longer; a warm cache loads in seconds.
    """
    return {"cpp_wrapper": True} if backend == "inductor" and device_type == "cpu" else None


# ---------------------------------------------------------------------------------------------------------------------
# A malloc replacement for the whole process (`titans --allocator`, the benchmarks' `--allocator`).

# Shared libraries by the names distributions ship them under, most specific first.
ALLOCATOR_LIBRARIES: dict[str, tuple[str, ...]] = {
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
}
ALLOCATORS = ("system", *ALLOCATOR_LIBRARIES)  # "system": the C library's malloc, nothing preloaded
_REEXEC_MARK = "TITANS_ALLOCATOR_REEXEC"  # set in the re-executed process: a second failure is an error, not a loop
_INSTALL_HINTS = {
    "jemalloc": "Debian/Ubuntu: apt install libjemalloc2; conda: conda install jemalloc",
    "tcmalloc": "Debian/Ubuntu: apt install libtcmalloc-minimal4; conda: conda install gperftools",
}


class AllocatorError(ValueError):
    """An allocator that is unknown, not installed, or cannot be switched to from here; the message says the fix."""


def _library_dirs() -> list[Path]:
    """Where a preloadable library is looked for: the environment's own lib (conda, a venv's base), then the dynamic
    linker's usual directories (Debian's multiarch one included)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix])
    dirs = [Path(prefix) / "lib" for prefix in prefixes]
    system = (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib")
    return dirs + [Path(d) for d in system]


def find_allocator(name: str) -> str | None:
    """Path of allocator `name`'s shared library (jemalloc or tcmalloc), or None when it is not installed.

    Raises AllocatorError for a name that is not one of ALLOCATOR_LIBRARIES ("system" has no library).
    """
    if name not in ALLOCATOR_LIBRARIES:
        raise AllocatorError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    for directory in _library_dirs():
        for filename in ALLOCATOR_LIBRARIES[name]:
            if (directory / filename).is_file():
                return str(directory / filename)
    return None


def loaded_allocator() -> str:
    """Which allocator this process runs on: a name of ALLOCATOR_LIBRARIES when its library is mapped into the
    process (preloaded), else "system". Read from /proc/self/maps (Linux); "system" where that cannot be read."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name, filenames in ALLOCATOR_LIBRARIES.items():
        if any(f"/{filename}" in maps for filename in filenames):
            return name
    return "system"


def allocator_env(name: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) whose processes start on allocator `name`: its library first in
    LD_PRELOAD, entries already there kept after it. "system" returns the copy unchanged.

    Raises AllocatorError when the library is not installed (the message says how to install it).
    """
    env = dict(os.environ if env is None else env)
    if name == "system":
        return env
    path = find_allocator(name)
    if path is None:
        raise AllocatorError(
            f"allocator {name!r}: none of {', '.join(ALLOCATOR_LIBRARIES[name])} found in "
            f"{', '.join(str(d) for d in _library_dirs())}; install it ({_INSTALL_HINTS[name]}) or leave the "
            "allocator at 'system'"
        )
    others = [entry for entry in env.get("LD_PRELOAD", "").replace(":", " ").split() if entry != path]
    env["LD_PRELOAD"] = " ".join([path, *others])
    return env


def switch_allocator(name: str, may_reexec: bool) -> None:
    """Make this process run on allocator `name`: nothing to do when it already does, else re-execute the same
    command line (`sys.orig_argv`) with the library preloaded; the process id, arguments and environment otherwise
    stay, so torchrun's workers can switch too. An allocator cannot be swapped inside a running process, hence the
    re-exec; it happens before any work.

    may_reexec: the caller is the process's own command line (the `titans` script, `python -m titans`, main.py).
    Raises AllocatorError when the library is missing, when the preloaded library did not load, or when
    re-executing is not allowed (main() called from Python with other arguments): the message says what to set.
    """
    if name == "system" or loaded_allocator() == name:
        return
    env = allocator_env(name)
    library = env["LD_PRELOAD"].split()[0]  # allocator_env puts it first
    if os.environ.get(_REEXEC_MARK) == name:
        raise AllocatorError(
            f"allocator {name!r}: preloading {library} did not load it into the process; "
            "check the dynamic linker's message above"
        )
    if not may_reexec:
        raise AllocatorError(
            f"allocator {name!r} must be loaded when the process starts: run from the command line, or start "
            f"Python with LD_PRELOAD={library}"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**env, _REEXEC_MARK: name})
