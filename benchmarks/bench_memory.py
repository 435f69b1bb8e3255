"""NeuralMemory throughput and peak memory, forward and forward+backward, against titans-pytorch and matmul.

The machine's matmul rate is the arithmetic yardstick (the %mm column).

    python benchmarks/bench_memory.py --quick                  # tiny sweep, about a minute
    python benchmarks/bench_memory.py                          # the full sweep, about 20 minutes on 2 cores
    python benchmarks/bench_memory.py --dims 256 --batches 4 --seq-lens 1024,8192 --modes fwd

What it does, in order:
1. Gate: for every (dim, heads, chunk size) of the sweep, the layer with the fused scan (the default, which is what
   is timed) and with `chunked_memory` must equal the per-token reference (`impl="naive"`) in float64 on a short
   sequence (outputs, final state and every gradient, with the scan checkpointed and not). Any mismatch prints the
   error and exits 1 before anything is timed.
2. The machine's fp32 matmul rate (a 2048^3 matmul, GFLOP/s), for the FLOP-utilisation column.
3. Every configuration runs in its own fresh subprocess (`--worker`): warm-up, then the median of several repeats;
   its peak memory is that process's `ru_maxrss` minus the RSS it had once the module and inputs existed, so
   configurations never see each other's allocations. A parent-side watchdog kills a worker above `--mem-cap-gb`.
4. titans-pytorch 0.5.5 side by side (dim 256, 1 head, batch 4, T 1024, C 16, forward) if its venv exists
   (`--peer-python`, default /tmp/peer-venv/bin/python; see benchmarks/README.md); else the quoted numbers.
5. An aligned table, the targets (flat cost per token, memory, speed-up over the peer), then ONE JSON line.

FLOPs per token are counted analytically for the chunked form (see `memory_flops`); the load average is recorded
with every result because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Before torch loads libgomp: sleep rather than spin between parallel regions. The default (ACTIVE) spinning makes
# small ops 10-30x slower whenever the 2 cores are shared with other processes (see benchmarks/README.md).
if not os.environ.get("TITANS_BENCH_OMP_DEFAULT"):  # set by worker_env("unset"): keep libgomp's own default
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from titans.progress import HEARTBEAT_S  # noqa: E402
from titans.system import ALLOCATORS, AllocatorError, allocator_env  # noqa: E402

SCRIPT = Path(__file__).resolve()
DEFAULT_PEER_PYTHON = "/tmp/peer-venv/bin/python"
PEER_SCRIPT = SCRIPT.parent / "peer_titans_pytorch.py"
# titans-pytorch 0.5.5 NeuralMemory, dim 256, 1 head, batch 4, T 1024, C 16, forward, 2 CPU threads (measured in
# session 2; used only when its venv is absent).
PEER_QUOTED_MEMORY = {"tokens_per_s": 640.0, "peak_mb": 4.5 * 1024}
# How a worker's allocator is set up. "glibc": the default, what a user gets; its dynamic mmap threshold moves
# freed multi-MB tensors onto the heap, where fragmentation can inflate peak RSS several-fold. "mmap": every
# allocation above 64 KiB is its own mapping, returned to the OS on free, so peak RSS tracks the live tensors
# (the algorithm's own footprint) at the cost of page faults (about 2x slower; not used for timing).
# glibc: the default allocator; mmap: every block above 64 KiB its own mapping (peak RSS = live tensors, slow, memory
# rows only); cli: the 4 MiB threshold the titans CLI pins at start-up (titans.system.pin_malloc_mmap_threshold)
MALLOC_ENV = {
    "glibc": {},
    "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "cli": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
}

# ---------------------------------------------------------------------------------------------------------------------
# Isolated measurement: one configuration per fresh process (also used by bench_models.py).


def load_average() -> float:
    """The 1-minute load average: with 2 cores, anything above ~2 means the timings share the CPUs."""
    return round(os.getloadavg()[0], 2)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")


def reset_peak_rss() -> float:
    """Reset this process's RSS high-water mark to its current RSS and return that RSS (MiB).

    ru_maxrss cannot be used as the baseline: Linux carries the parent's peak across fork+exec into it, so a child
    would report the parent's footprint. VmHWM belongs to the process's own address space, and writing 5 to
    /proc/self/clear_refs resets it.
    """
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (MiB) since start or since the last reset_peak_rss()."""
    return _status_mb("VmHWM")


def time_repeats(step, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Seconds per call of step(): `warmup` untimed calls, then up to `repeats` timed calls.

    Stops early (keeping at least one timed call) once the timed calls have used `budget_s`, so one slow
    configuration cannot eat the sweep's time.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def _rss_mb(pid: int) -> float:
    """Current resident set of process pid in MiB (0 if it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def worker_env(
    omp_wait_policy: str, malloc: str = "glibc", huge_pages: bool = False, allocator: str = "system"
) -> dict[str, str]:
    """The environment of a worker (ours or the peer's), with OpenMP's wait policy and the allocator set before
    torch loads.

    ACTIVE spins between parallel regions; on a shared, oversubscribed machine a spinning thread holds a core another
    thread needs, and small ops slow down by 10-30x. PASSIVE sleeps instead. "unset" leaves the variable out:
    libgomp's own default, spinning a while before sleeping, is what `titans train` and a user's script run with.
    huge_pages: glibc's malloc asks for transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), fewer TLB
    misses over a training step's hundreds of MB of activations; a process setting, like the allocator's.
    allocator: "system" (the C library's malloc) or a malloc replacement preloaded into the worker (LD_PRELOAD, as
    `titans --allocator` does); malloc and huge_pages then tune a heap the worker does not use.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    env = allocator_env(allocator, env)
    if huge_pages:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    for name in ("OMP_WAIT_POLICY", "TITANS_BENCH_OMP_DEFAULT"):
        env.pop(name, None)
    # the worker imports this module, whose first lines would otherwise set PASSIVE again
    unset = {"TITANS_BENCH_OMP_DEFAULT": "1"}
    policy = unset if omp_wait_policy == "unset" else {"OMP_WAIT_POLICY": omp_wait_policy.upper()}
    return {**env, **policy, **MALLOC_ENV[malloc]}


def run_isolated(
    command: list[str], timeout_s: float, mem_cap_gb: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a worker command that prints one JSON line last; return that dict, or {"error": why}.

    A watchdog polls the worker's RSS and kills it above mem_cap_gb (the machine is shared; a runaway
    configuration must not take everyone's memory) or after timeout_s. A worker that runs long gets a line every
    HEARTBEAT_S seconds, so a benchmark's output is never silent for a minute.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    start, max_seen, error = time.monotonic(), 0.0, None
    said = start
    while proc.poll() is None:
        if time.monotonic() - said >= HEARTBEAT_S:
            said = time.monotonic()
            print(f"    ... still measuring ({said - start:.0f} s)", flush=True)
        max_seen = max(max_seen, _rss_mb(proc.pid))
        if max_seen > mem_cap_gb * 1024:
            error = f"killed: RSS passed the {mem_cap_gb:g} GB cap (--mem-cap-gb)"
        elif time.monotonic() - start > timeout_s:
            error = f"killed: ran past {timeout_s:g} s (--timeout)"
        if error is not None:
            proc.kill()
            proc.communicate()
            return {"error": error, "rss_seen_mb": round(max_seen, 1)}
        time.sleep(0.05)
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Measured fp32 matmul rate of this machine (best of `repeats` size^3 products), GFLOP/s."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(time_repeats(lambda: a @ b, warmup=1, repeats=repeats, budget_s=30.0))
    return 2.0 * size**3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------------
# What is measured.


@dataclass(frozen=True)
class MemoryCase:
    """One NeuralMemory configuration: x [batch, seq_len, dim] through `mode` ("fwd" or "fwd+bwd")."""

    dim: int
    heads: int
    batch: int
    seq_len: int
    chunk_size: int
    mode: str
    checkpoint_every: int = 16
    depth: int = 2
    expansion: int = 4
    malloc: str = "glibc"
    compile: bool = False  # whole chunks through torch.compile (NeuralMemory.compile_chunks)

    def __post_init__(self) -> None:
        if self.mode not in ("fwd", "fwd+bwd"):
            raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {self.mode!r}")
        if self.malloc not in MALLOC_ENV:
            raise ValueError(f"malloc must be one of {', '.join(MALLOC_ENV)}, got {self.malloc!r}")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim}); pick a divisor of dim")
        for name in ("dim", "heads", "batch", "seq_len", "chunk_size", "depth", "expansion"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = keep every chunk), got {self.checkpoint_every}")

    def label(self) -> str:
        return (
            f"{self.mode} dim {self.dim} heads {self.heads} batch {self.batch} T {self.seq_len} C {self.chunk_size} "
            f"ckpt {self.checkpoint_every} malloc {self.malloc}" + (" compiled" if self.compile else "")
        )

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def memory_flops(case: MemoryCase, conv_kernel: int = 4) -> dict[str, float]:
    """Analytic FLOPs per token (one multiply-add = 2 FLOPs) of one NeuralMemory forward in the chunked form.

    Per memory layer l with W^l [d_out, d_in], per (sequence, head), per token, chunk size b (chunked.py):
      key path fwd   z = a W^T                          2 d_in d_out
      key path bwd   g^{l-1} = (g^l W^l) * sigma'       2 d_in d_out   (layers 2..L only)
      dual output    h M_0^T and h S_0^T                4 d_in d_out
                     scores h a^T and (scores*C) g      2 b (d_in + d_out)
      end state      M_b and S_b: two rank-b products   4 d_in d_out   (a [d_out, b] x [b, d_in] per chunk)
      coefficients   [b, b] x [b, b] and [b, b] x [b]   2 b^2 + 2 b    (per chunk, spread over its b tokens)
      state update   decays and sums of M_0, S_0        6 d_in d_out / b   (elementwise, memory-bound)
    and, per token for the whole layer, the projections q,k,v / output gate / W_O (10 dim^2), the causal depthwise
    conv (6 dim K, K shifted multiply-adds) and the theta/eta/alpha gates (6 dim heads L). Every term but
    "state_update" and "conv" (elementwise) is a matmul that torch.utils.flop_counter counts too
    (tests/test_benchmarks.py checks the two agree exactly).
    Backward costs about twice the forward; with the scan checkpointed the forward runs once more.
    """
    head_dim = case.dim // case.heads
    widths = [head_dim] + [head_dim * case.expansion] * (case.depth - 1) + [head_dim]
    b = case.chunk_size
    key = dual = end = state_update = coefficients = 0.0
    for layer in range(case.depth):
        d_in, d_out = widths[layer], widths[layer + 1]
        key += 2 * d_in * d_out * (2 if layer > 0 else 1)
        dual += 4 * d_in * d_out + 2 * b * (d_in + d_out)
        end += 4 * d_in * d_out
        state_update += 6 * d_in * d_out / b
        coefficients += 2 * b * b + 2 * b
    dense = 10.0 * case.dim * case.dim + 6.0 * case.dim * case.heads * case.depth
    parts = {
        "key_path": case.heads * key,
        "dual_output": case.heads * dual,
        "end_state": case.heads * end,
        "coefficients": case.heads * coefficients,
        "state_update": case.heads * state_update,
        "dense": dense,
        "conv": 6.0 * case.dim * conv_kernel,
    }
    forward = sum(parts.values())
    recompute = case.mode == "fwd+bwd" and case.checkpoint_every > 0 and case.seq_len > b * case.checkpoint_every
    total = forward if case.mode == "fwd" else forward * (4.0 if recompute else 3.0)
    return {**parts, "forward": forward, "total": total}


def build_memory(case: MemoryCase, dtype: torch.dtype = torch.float32, impl: str = "fused"):
    """A seeded NeuralMemory for `case` (the library's defaults otherwise: GELU MLP, momentum, forgetting)."""
    from titans.memory import NeuralMemory

    torch.manual_seed(0)
    module = NeuralMemory(
        dim=case.dim,
        heads=case.heads,
        depth=case.depth,
        expansion=case.expansion,
        chunk_size=case.chunk_size,
        impl=impl,
        checkpoint_every=case.checkpoint_every,
    )
    return module.to(dtype)


def measure_memory(case: MemoryCase, threads: int, warmup: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Run inside a fresh worker process: seconds per call, tokens/s and the peak-RSS delta of one case."""
    torch.set_num_threads(threads)
    module = build_memory(case)
    if case.compile:
        module.compile_chunks()  # the warm-up call pays the compilation
    x = torch.randn(case.batch, case.seq_len, case.dim, generator=torch.Generator().manual_seed(1))
    if case.mode == "fwd+bwd":
        x.requires_grad_(True)

    def step() -> None:
        if case.mode == "fwd":
            with torch.no_grad():
                module(x)
        else:
            y, _ = module(x)
            y.square().mean().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None

    # Timing rows warm up at full length: a first call pays page faults and allocator growth for every buffer
    # (measured 19 s vs 5-9 s for dim 256, T 1024, fwd+bwd). "mmap" rows are for memory only: their single cold
    # call is the peak a user meets, and skipping the warm-up halves their (slow) run time.
    if case.malloc == "mmap":
        warmup, repeats = 0, 1
    base = reset_peak_rss()
    times = time_repeats(step, warmup, repeats, budget_s)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_s": case.tokens / seconds,
        "repeats": len(times),
        "peak_delta_mb": peak_rss_mb() - base,
        "peak_total_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The correctness gate.


def equivalence_error(dim: int, heads: int, chunk_size: int, depth: int = 2, expansion: int = 4) -> float:
    """Largest |fast - naive| over outputs, final memory state and all gradients, in float64 (0 = identical), for
    both fast implementations: the fused scan (what the timings run) and chunked_memory.

    Runs T = 2C + 5 tokens (two whole chunks and a partial one) for 2 sequences, once with the scan checkpointed
    every chunk and once keeping every chunk, and raises AssertionError (via torch.testing.assert_close, default
    float64 tolerances) on any mismatch.
    """
    length = 2 * chunk_size + 5
    worst = 0.0
    for checkpoint_every in (1, 0):
        case = MemoryCase(dim, heads, 2, length, chunk_size, "fwd+bwd", checkpoint_every, depth, expansion)
        module = build_memory(case, torch.float64)
        x = torch.randn(2, length, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        results = {}
        for impl in ("fused", "chunked", "naive"):
            module.impl = impl
            y, state = module(x)
            params = [p for p in module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(y.square().sum(), [x, *params])
            results[impl] = [y, *state.memory.weights, *state.memory.momentum, *grads]
        for impl in ("fused", "chunked"):
            for fast, ref in zip(results[impl], results["naive"], strict=True):
                torch.testing.assert_close(fast, ref)
                worst = max(worst, (fast - ref).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------------------------------
# The sweep.


def int_list(text: str) -> list[int]:
    """'256,1024' -> [256, 1024]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,1024, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def full_sweep() -> list[MemoryCase]:
    """The default sweep, subsampled to fit ~20 minutes on 2 cores (README explains the choice).

    - T lines 256..8192 (flat cost per token): dim 64 at batch 4 and dim 256 at batch 1, 1 head, C 16,
      forward and forward+backward;
    - the factor grid at T 1024, forward: dim {64, 256} x heads {1, 4} x batch {1, 4} x C {16, 64};
    - the memory target: dim 256, 1 head, batch 4, T 4096, C 16, forward+backward with the default allocator, and
      with the "mmap" allocator (peak = live tensors, one cold call) for checkpoint_every {16, 4, 0};
    - the peer's shape: dim 256, 1 head, batch 4, T 1024, C 16, forward (already in the grid).
    """
    cases: list[MemoryCase] = []
    for dim, batch in ((64, 4), (256, 1)):
        for mode in ("fwd", "fwd+bwd"):
            for length in (256, 1024, 4096, 8192):
                cases.append(MemoryCase(dim, 1, batch, length, 16, mode))
    for dim in (64, 256):
        for heads in (1, 4):
            for batch in (1, 4):
                for chunk in (16, 64):
                    cases.append(MemoryCase(dim, heads, batch, 1024, chunk, "fwd"))
    cases.append(MemoryCase(256, 1, 4, 4096, 16, "fwd+bwd", 16, malloc="glibc"))
    for checkpoint_every in (16, 4, 0):
        cases.append(MemoryCase(256, 1, 4, 4096, 16, "fwd+bwd", checkpoint_every, malloc="mmap"))
    return list(dict.fromkeys(cases))


def quick_sweep() -> list[MemoryCase]:
    """A tiny sweep for smoke tests: dim 32, T 256, forward, and forward+backward with the scan checkpointed."""
    return [MemoryCase(32, 2, 2, 256, 16, "fwd"), MemoryCase(32, 2, 2, 256, 16, "fwd+bwd", 4, malloc="mmap")]


# the shape of the speed target against titans-pytorch (dim 256, 1 head, batch 4, T 1024, C 16, forward)
PEER_CASE = MemoryCase(256, 1, 4, 1024, 16, "fwd")


def sweep_from_args(args: argparse.Namespace) -> list[MemoryCase]:
    if not any(v is not None for v in (args.dims, args.heads, args.batches, args.seq_lens, args.chunk_sizes)):
        cases = quick_sweep() if args.quick else full_sweep()
        if args.compile:
            cases.append(replace(cases[0] if args.quick else PEER_CASE, compile=True))
        return cases
    return [
        MemoryCase(dim, heads, batch, length, chunk, mode, ckpt, malloc=malloc, compile=compiled)
        for dim in args.dims or [64]
        for heads in args.heads or [1]
        for batch in args.batches or [4]
        for length in args.seq_lens or [1024]
        for chunk in args.chunk_sizes or [16]
        for mode in args.modes
        for ckpt in args.checkpoint_every
        for malloc in args.malloc
        for compiled in ([False, True] if args.compile else [False])
    ]


def run_peer(args: argparse.Namespace, case: MemoryCase) -> dict[str, Any]:
    """titans-pytorch 0.5.5 NeuralMemory on `case`, in its own venv and process, or the quoted numbers."""
    peer = Path(args.peer_python)
    if args.no_peer or not peer.exists():
        why = "--no-peer" if args.no_peer else f"{peer} not found"
        return {**PEER_QUOTED_MEMORY, "source": f"quoted ({why})"}
    payload = {
        "kind": "memory",
        "dim": case.dim,
        "heads": case.heads,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "chunk_size": case.chunk_size,
        "mode": case.mode,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget,
    }
    command = [str(peer), str(PEER_SCRIPT), json.dumps(payload)]
    env = worker_env(args.omp_wait_policy, huge_pages=args.huge_pages, allocator=args.allocator)
    result = run_isolated(command, args.timeout, args.mem_cap_gb, env)
    if "error" in result:
        return {**PEER_QUOTED_MEMORY, "source": f"quoted (measurement failed: {result['error']})"}
    return {**result, "source": "measured", "load": load_average()}


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Aligned text table; columns are (header, key, format) and a missing value prints as '-'."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


CASE_KEY = ("dim", "heads", "batch", "seq_len", "chunk_size", "mode", "checkpoint_every", "malloc", "compile")


def check_targets(rows: list[dict[str, Any]], peer: dict[str, Any], peer_case: MemoryCase) -> list[dict[str, Any]]:
    """The targets (flat cost per token, peak memory, speed-up over the peer), each with its measured value and a plain
    met/missed verdict."""
    targets = []
    by_key = {tuple(r[k] for k in CASE_KEY): r for r in rows}

    def add(target: str, value: Any, met: bool) -> None:
        targets.append({"target": target, "value": value, "met": met})

    for key, row in by_key.items():
        short = by_key.get((*key[:3], 1024, *key[4:]))
        if key[3] == 8192 and short and "tokens_per_s" in short and "tokens_per_s" in row:
            ratio = row["tokens_per_s"] / short["tokens_per_s"]
            where = f"dim {key[0]}, heads {key[1]}, batch {key[2]}, C {key[4]}, {key[5]}"
            add(f"flat cost: tok/s at T 8192 / T 1024 >= 0.8 ({where})", round(ratio, 3), ratio >= 0.8)
    for row in rows:
        if (row["dim"], row["batch"], row["seq_len"], row["chunk_size"], row["mode"]) == (256, 4, 4096, 16, "fwd+bwd"):
            peak = row.get("peak_delta_mb")
            where = f"heads {row['heads']}, checkpoint_every {row['checkpoint_every']}, malloc {row['malloc']}"
            value = round(peak, 1) if peak is not None else row.get("error")
            add(
                f"memory: dim 256, batch 4, T 4096, C 16, fwd+bwd peak <= 1024 MB ({where})",
                value,
                peak is not None and peak <= 1024,
            )
    for compiled in (False, True):
        ours = by_key.get(tuple(getattr(replace(peer_case, compile=compiled), k) for k in CASE_KEY))
        if ours and "tokens_per_s" in ours:
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            add(
                f"speed-up >= 30x over titans-pytorch 0.5.5 ({peer['source']}) at "
                f"{replace(peer_case, compile=compiled).label()}",
                round(ratio, 2),
                ratio >= 30,
            )
    return targets


def allocator_arg(name: str) -> str:
    """--allocator's value, checked up front: a known allocator whose library is installed."""
    try:
        allocator_env(name, {})
    except AllocatorError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def shared_parser(doc: str | None, unit: str, budget: float) -> argparse.ArgumentParser:
    """The flags both benchmark scripts take (`titans bench` forwards the same arguments to each)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sweep (smoke test)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker (default 2)")
    p.add_argument("--warmup", type=int, default=1, help=f"untimed {unit} before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help=f"timed {unit}; the median is reported (default 3)")
    p.add_argument(
        "--budget", type=float, default=budget, help=f"stop repeating a case after this many s (default {budget:g})"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="kill a worker after this many s (default 600)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="kill a worker above this RSS (default 8)")
    p.add_argument(
        "--omp-wait-policy",
        choices=["passive", "active", "unset"],
        default="passive",
        help="OMP_WAIT_POLICY of the workers (default passive: no spinning on a shared machine; unset: libgomp's "
        "default, what titans train runs with)",
    )
    p.add_argument(
        "--huge-pages",
        action="store_true",
        help="every worker, ours and the peer's, with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages)",
    )
    p.add_argument(
        "--allocator",
        type=allocator_arg,
        default="system",
        help=f"malloc of every worker, ours and the peer's: one of {', '.join(ALLOCATORS)} (default system: the C "
        "library's; the others are preloaded)",
    )
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the titans-pytorch 0.5.5 venv")
    p.add_argument("--no-peer", action="store_true", help="skip the peer; use its quoted numbers")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = shared_parser(doc=__doc__, unit="calls", budget=60.0)
    p.add_argument("--dims", type=int_list, help="model widths, e.g. 64,256 (with the other lists: a custom grid)")
    p.add_argument("--heads", type=int_list, help="memory heads, e.g. 1,4")
    p.add_argument("--batches", type=int_list, help="batch sizes, e.g. 1,4")
    p.add_argument("--seq-lens", type=int_list, help="sequence lengths, e.g. 256,1024,8192")
    p.add_argument("--chunk-sizes", type=int_list, help="memory chunk sizes, e.g. 16,64")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["fwd", "fwd+bwd"], help="fwd,fwd+bwd")
    p.add_argument("--checkpoint-every", type=int_list, default=[16], help="scan checkpoint groups (0 = none)")
    p.add_argument(
        "--malloc", type=lambda s: s.split(","), default=["glibc"], help="glibc, mmap and/or cli (see MALLOC_ENV)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time each case of a custom grid (the full sweep: the peer's case) with the memory's chunks "
        "through torch.compile (needs a C++ compiler; the warm-up call pays the compilation)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error(
            f"need --threads >= 1, --repeats >= 1, --warmup >= 0; got {args.threads}, {args.repeats}, {args.warmup}"
        )
    bad_modes = [m for m in args.modes if m not in ("fwd", "fwd+bwd")]
    if bad_modes:
        p.error(f"--modes takes fwd and/or fwd+bwd, got {bad_modes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        case = MemoryCase(**spec["case"])
        result = measure_memory(case, spec["threads"], spec["warmup"], spec["repeats"], spec["budget_s"])
        print(json.dumps(result), flush=True)
        return 0

    torch.set_num_threads(args.threads)
    cases = sweep_from_args(args)
    print(f"bench_memory: {len(cases)} configurations, {args.threads} threads, torch {torch.__version__}", flush=True)

    gate: dict[str, float] = {}
    for dim, heads, chunk in dict.fromkeys((c.dim, c.heads, c.chunk_size) for c in cases):
        name = f"dim{dim}-h{heads}-C{chunk}"
        try:
            gate[name] = equivalence_error(dim, heads, chunk)
        except AssertionError as error:
            print(
                f"GATE FAILED: fused or chunked != naive for {name}; refusing to report timings.\n{error}",
                file=sys.stderr,
            )
            print(json.dumps({"benchmark": "memory", "gate": "failed", "config": name}))
            return 1
        print(
            f"gate fused == chunked == naive (float64, T = 2C+5, with and without scan checkpoints): {name} "
            f"max |diff| {gate[name]:.1e}",
            flush=True,
        )

    # one large matmul's rate is insensitive to the OpenMP wait policy, so it runs here rather than in a worker
    gflops = matmul_gflops(args.threads, size=512 if args.quick else 2048)
    print(f"fp32 matmul rate: {gflops:.1f} GFLOP/s", flush=True)

    rows = []
    for case in cases:
        payload = {
            "case": asdict(case),
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "budget_s": args.budget,
        }
        command = [sys.executable, str(SCRIPT), "--worker", json.dumps(payload)]
        env = worker_env(args.omp_wait_policy, case.malloc, args.huge_pages, args.allocator)
        result = run_isolated(command, args.timeout, args.mem_cap_gb, env)
        flops = memory_flops(case)
        row = {**asdict(case), **result, "load": load_average(), "flops_per_token": flops["total"]}
        if "tokens_per_s" in result:
            row["gflops"] = flops["total"] * result["tokens_per_s"] / 1e9
            row["mm_fraction"] = row["gflops"] / gflops
        rows.append(row)
        status = result.get("error") or f"{result['tokens_per_s']:.0f} tok/s, +{result['peak_delta_mb']:.0f} MB"
        print(f"  {case.label()}: {status} (load {row['load']})", flush=True)

    peer_case = PEER_CASE
    if args.quick:
        peer_case = cases[0]
    peer = run_peer(args, peer_case)
    targets = check_targets(rows, peer, peer_case)

    columns = [
        ("mode", "mode", ""),
        ("dim", "dim", "d"),
        ("heads", "heads", "d"),
        ("batch", "batch", "d"),
        ("T", "seq_len", "d"),
        ("C", "chunk_size", "d"),
        ("ckpt", "checkpoint_every", "d"),
        ("malloc", "malloc", ""),
        ("compiled", "compile", ""),
        ("tok/s", "tokens_per_s", ",.0f"),
        ("s/call", "seconds", ".3f"),
        ("reps", "repeats", "d"),
        ("peak+MB", "peak_delta_mb", ",.0f"),
        ("MFLOP/tok", "mflops", ".2f"),
        ("GFLOP/s", "gflops", ".1f"),
        ("%mm", "mm_pct", ".1f"),
        ("load", "load", ".2f"),
        ("note", "error", ""),
    ]
    for row in rows:
        row["mflops"] = row["flops_per_token"] / 1e6
        if "mm_fraction" in row:
            row["mm_pct"] = 100 * row["mm_fraction"]
    print()
    print(format_table(rows, columns))
    print()
    print(
        f"peer titans-pytorch 0.5.5 ({peer['source']}), {peer_case}: {peer['tokens_per_s']:.0f} tok/s, "
        f"peak {peer.get('peak_delta_mb', peer.get('peak_mb', float('nan'))):.0f} MB"
    )
    flops = memory_flops(MemoryCase(256, 1, 4, 1024, 16, "fwd"))
    print("FLOPs/token, dim 256, 1 head, C 16, forward: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in flops.items()))
    for t in targets:
        print(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']}")
    print(
        json.dumps(
            {
                "benchmark": "memory",
                "gate": "passed",
                "gate_max_abs_diff": gate,
                "torch": torch.__version__,
                "threads": args.threads,
                "huge_pages": args.huge_pages,
                "allocator": args.allocator,
                "matmul_gflops": round(gflops, 2),
                "load_end": load_average(),
                "results": rows,
                "peer": {**peer, "case": asdict(peer_case)},
                "targets": targets,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
