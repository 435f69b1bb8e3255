"""The C++ memory scan (`csrc/scan.cpp`): built on first use with the system's C++ compiler, cached, loaded once.

The build is one compiler call against the installed torch's headers and libraries (no ninja, no network), done
once per source, torch version and CPU, under a file lock so that concurrent processes (torchrun's workers) build
it once. The library lands in `$TITANS_CACHE_DIR` (default `~/.cache/titans`). Where there is no compiler or the
build fails, `kernels()` returns None and `fused_memory` runs the same algorithm in tensor ops (`scan_torch`),
after one warning that says why. `TITANS_FUSED_CPP=0` skips the C++ op altogether.
"""

from __future__ import annotations

import ctypes.util
import fcntl
import hashlib
import os
import platform
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

from titans.memory.scan_torch import ScanGates, ScanSettings
from titans.system import cpu_compiler

SOURCE = Path(__file__).resolve().parent / "csrc" / "scan.cpp"
ACTIVATIONS = {"gelu": 0, "silu": 1}

_STATE: dict[str, object] = {}  # "module": the loaded kernels (or None after a failure), "error": why


class BuildError(RuntimeError):
    """The C++ scan could not be built or loaded; the message says why and what to do."""


def cache_dir() -> Path:
    root = os.environ.get("TITANS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "titans"
    )
    return Path(root)


def _cpu_signature() -> str:
    """What `-march=native` depends on: the CPU's model and flags (a cache shared by several machines stays valid)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("flags", "model name"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor()


def _compile_command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    lib = torch_dir / "lib"
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # glibc's vector math library (2.35+): the activations' erf / exp 8 at a time
    mvec = ["-DTITANS_MVEC", "-lmvec"] if ctypes.util.find_library("mvec") else []
    return [
        compiler, str(SOURCE), "-o", str(output), "-shared", "-fPIC", "-std=c++20", "-O3", "-march=native",
        "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in includes],
        f"-I{sysconfig.get_paths()['include']}", f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}",
        *mvec,
    ]  # fmt: skip


def library_path() -> Path:
    """Where this source, torch and CPU's build lives (whether or not it is built yet)."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(torch.__version__.encode())
    key.update(sys.version.encode())
    key.update(_cpu_signature().encode())
    key.update(" ".join(_compile_command("c++", Path("out"))).encode())
    return cache_dir() / f"titans_scan_{key.hexdigest()[:16]}.so"


def build(verbose: bool = True) -> Path:
    """Compile the library if it is not cached yet; return its path. Raises BuildError with the compiler's output."""
    target = library_path()
    if target.exists():
        return target
    compiler = cpu_compiler()
    if compiler is None:
        raise BuildError("no C++ compiler found (install g++, or set CXX)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library: wait for it
        if target.exists():
            return target
        if verbose:
            print(
                "titans: building the fused memory scan (C++, once per machine and torch version)...", file=sys.stderr
            )
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(_compile_command(compiler, partial), capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise BuildError(f"{compiler} failed to build {SOURCE.name}:\n{tail}")
        os.replace(partial, target)  # atomic: a crash never leaves a half-written library under the final name
    return target


def kernels(required: bool = False):
    """This module (its scan_forward / scan_backward run the C++ op) once the library is loaded, else None.

    required=True raises BuildError instead of returning None. The first failure is remembered (and warned about
    once) so that later calls do not rebuild.
    """
    if "module" not in _STATE:
        if os.environ.get("TITANS_FUSED_CPP", "1") == "0":
            _STATE["module"], _STATE["error"] = None, "TITANS_FUSED_CPP=0"
        else:
            try:
                torch.ops.load_library(str(build()))
                _STATE["module"], _STATE["error"] = sys.modules[__name__], None
            except (BuildError, OSError, RuntimeError) as err:
                _STATE["module"], _STATE["error"] = None, str(err)
                if not required:
                    warnings.warn(
                        f"titans: the C++ memory scan is unavailable ({err}); using the tensor-op scan, "
                        "same results, slower",
                        stacklevel=3,
                    )
    if _STATE["module"] is None and required:
        raise BuildError(f"the C++ memory scan is unavailable: {_STATE['error']}")
    return _STATE["module"]


def scan_forward(q, k, v, gates, weights, momentum, anchor, settings: ScanSettings, save: bool):
    """`scan_torch.scan_forward` through the C++ op (same arguments, same results)."""
    depth = len(weights)
    thetas, etas, alphas = ([g[j] for g in gates if g[j] is not None] for j in range(3))
    out = torch.ops.titans.scan_forward(
        q, k, v, thetas, etas, alphas, list(weights), list(momentum), list(anchor), list(settings.lengths),
        settings.chunk_size, ACTIVATIONS[settings.activation], settings.clip, settings.stride, save,
        settings.exact_last,
    )  # fmt: skip
    y, rest = out[0], out[1:]
    w_end, s_end, w_last = rest[:depth], rest[depth : 2 * depth], rest[2 * depth : 3 * depth]
    # kept for backward: one tensor per kept chunk (its start state; with stride 1 also its intermediates)
    return y, w_end, s_end, w_last, rest[3 * depth :]


def scan_backward(grad_y, grad_w, grad_s, grad_last, q, k, v, gates, anchor, kept, settings: ScanSettings):
    """`scan_torch.scan_backward` through the C++ op (same arguments, same results)."""
    depth = len(grad_w)
    thetas, etas, alphas = ([g[j] for g in gates if g[j] is not None] for j in range(3))
    out = torch.ops.titans.scan_backward(
        grad_y, list(grad_w), list(grad_s), list(grad_last), q, k, v, thetas, etas, alphas, list(anchor), list(kept),
        list(settings.lengths), settings.chunk_size, ACTIVATIONS[settings.activation], settings.clip,
        settings.stride, settings.exact_last,
    )  # fmt: skip
    dq, dk, dv, rest = out[0], out[1], out[2], list(out[3:])

    def take(present: bool) -> list:  # the next layer-wise group of the op's outputs (None when the gate is off)
        nonlocal rest
        group, rest = (rest[:depth], rest[depth:]) if present else ([None] * depth, rest)
        return group

    d_gates = [ScanGates(*g) for g in zip(take(True), take(bool(etas)), take(bool(alphas)), strict=True)]
    d_w, d_s = take(True), take(True)
    return dq, dk, dv, d_gates, d_w, d_s, rest
