"""Every variant's training throughput and memory against T, a same-size Transformer and titans-pytorch.

Against titans-pytorch: MAC training and cached generation.

    python benchmarks/bench_models.py --quick        # tiny sweep, well under a minute
    python benchmarks/bench_models.py                # the full sweep, about 20-25 minutes on 2 cores
    python benchmarks/bench_models.py --variants baseline-full,MAC --seq-lens 1024,4096
    python benchmarks/bench_models.py --vs-transformer   # only the same-size comparison, about 9 minutes

What it does, in order:
1. Gate: for every memory variant of the sweep, the model built with the default fused scan (`memory.impl=fused`,
   what is timed) and with `memory.impl=chunked` must equal the same weights with `memory.impl=naive` in float64
   (logits and every parameter gradient) on a short sequence that crosses chunk and segment boundaries; any
   mismatch exits 1 before anything is timed.
2. Training steps (forward, backward, AdamW step) per variant for T from 256 to 8192 at a small config
   (d_model 64, 4 heads, 2 layers, window and MAC segment 32, memory chunk 16, batch 1), each in its own fresh
   worker process (bench_memory.py's harness: warm-up, median of repeats, peak-RSS delta, RSS watchdog).
3. Where the memory variants' linear cost crosses the full-attention baseline's quadratic one (tokens/s and memory).
4. Memory variants vs a same-size Transformer: at d_model 256 and 64 (4 heads, 2 layers, window and segment 128,
   T 1024, batch 4), every model's training step timed in turn in one worker, in --workers fresh workers (default
   3); the median over workers of tokens/s over the sliding-window baseline's, with its range, beside the ratio the
   matmul FLOPs allow (targets: >= 0.35x at d256, >= 0.2x at d64).
5. titans-pytorch 0.5.5 side by side when its venv exists: its MAC training step at dim 64, depth 2, segment 32,
   batch 4, T 512-2048 against our MAC at the same shape, and cached greedy generation of a ~1.3M-parameter MAC.
6. Aligned tables, the targets, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Before torch loads libgomp: sleep rather than spin between parallel regions. The default (ACTIVE) spinning makes
# small ops 10-30x slower whenever the 2 cores are shared with other processes (see benchmarks/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# bench_memory.py sits next to this file (the script's directory is on sys.path when run as a script).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import (  # noqa: E402
    MALLOC_ENV,
    PEER_SCRIPT,
    format_table,
    load_average,
    peak_rss_mb,
    reset_peak_rss,
    run_isolated,
    shared_parser,
    time_repeats,
    worker_env,
)

from titans.system import cpu_compiler  # noqa: E402

SCRIPT = Path(__file__).resolve()
VARIANTS = ("baseline-full", "baseline-sliding", "LMM", "MAC", "MAG", "MAL")
VOCAB = 256
# titans-pytorch 0.5.5 on this machine (session 3): MAC training at dim 64, depth 2, segment 32, batch 4,
# T 512-2048; cached generation of a ~1.3M-parameter MAC.
PEER_QUOTED = {"mac_train": 2350.0, "mac_generate": 31.0}
# The ~1.3M-parameter MAC: the peer at dim 128, depth 2 has 1.29M parameters; ours at d_model 128 needs 3 layers
# for a similar count (1.17M; 2 layers would be 0.80M), so the comparison is matched on parameters, not depth.
GEN_PEER = {"dim": 128, "depth": 2, "segment_len": 32}
PEER_TRAIN_BATCH = 4  # the batch of the MAC training comparison
GEN_OURS = {"d_model": 128, "n_layers": 3}


@dataclass(frozen=True)
class ModelCase:
    """One measurement: `kind` "train" (forward + backward + AdamW step on [batch, seq_len]) or "generate"
    (cached greedy decoding of `seq_len` new tokens after a 16-token prompt, batch `batch`)."""

    variant: str
    seq_len: int
    batch: int = 1
    kind: str = "train"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    segment_len: int = 32
    window: int = 32
    chunk_size: int = 16
    malloc: str = "glibc"
    compile: bool = False  # MAC: training.compile (whole segments), or for "generate" compile_decode
    processes: int = 1  # training as that many DDP processes on gloo (titans.distributed), each on batch/processes
    exact_last_layer: bool | None = None  # memory.exact_last_layer; None: the variant's default

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.kind not in ("train", "generate"):
            raise ValueError(f"kind must be 'train' or 'generate', got {self.kind!r}")
        if self.malloc not in MALLOC_ENV:
            raise ValueError(f"malloc must be one of {', '.join(MALLOC_ENV)}, got {self.malloc!r}")
        if self.seq_len < 1 or self.batch < 1:
            raise ValueError(f"need seq_len >= 1 and batch >= 1, got {self.seq_len}, {self.batch}")
        if self.processes < 1 or self.batch % self.processes or (self.processes > 1 and self.kind != "train"):
            raise ValueError(
                f"processes must be >= 1, divide the batch ({self.batch}) and be 1 for generation; got {self.processes}"
            )

    def config(self, impl: str = "fused"):
        """The ModelConfig of this case (vocabulary of 256 byte-like tokens)."""
        from titans.config import MemoryConfig, ModelConfig

        base = self.variant.startswith("baseline")
        return ModelConfig(
            variant="baseline" if base else self.variant,
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            vocab_size=VOCAB,
            window=self.window,
            segment_len=self.segment_len,
            baseline_attention="sliding" if self.variant == "baseline-sliding" else "full",
            memory=MemoryConfig(chunk_size=self.chunk_size, impl=impl, exact_last_layer=self.exact_last_layer),
        )

    def label(self) -> str:
        compiled = " compiled" if self.compile else ""
        processes = f" {self.processes} processes" if self.processes > 1 else ""
        return (
            f"{self.kind} {self.variant}{compiled} d{self.d_model}x{self.n_layers} B {self.batch} T {self.seq_len} "
            f"{self.malloc}{processes}"
        )


def build(case: ModelCase, dtype: torch.dtype = torch.float32, impl: str = "fused"):
    from titans.models import build_model

    torch.manual_seed(0)
    return build_model(case.config(impl)).to(dtype)


def measure_model(case: ModelCase, threads: int, warmup: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Run inside a fresh worker: seconds per step (or per generation), tokens/s and the peak-RSS delta."""
    from titans.models import num_parameters

    if case.processes > 1:
        return measure_ddp(case, threads, warmup, repeats)
    torch.set_num_threads(threads)
    model = build(case)
    if case.compile:  # the warm-up step (or generation) pays the compilation
        model.compile_decode() if case.kind == "generate" else model.compile_blocks()
    generator = torch.Generator().manual_seed(1)
    if case.kind == "generate":
        model.eval()
        prompt = torch.randint(0, VOCAB, (case.batch, 16), generator=generator)
        model.generate(prompt, 4, temperature=0, use_cache=True)  # warm-up
        base = reset_peak_rss()
        times = []
        for _ in range(repeats):  # the median of several generations: one takes well under a second
            start = time.perf_counter()
            model.generate(prompt, case.seq_len, temperature=0, use_cache=True)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        return {
            "seconds": seconds,
            "tokens_per_s": case.batch * case.seq_len / seconds,
            "repeats": len(times),
            "parameters": num_parameters(model),
            "peak_delta_mb": peak_rss_mb() - base,
        }

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, VOCAB, (case.batch, case.seq_len + 1), generator=generator)
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step() -> None:
        _, loss, _ = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # full-length warm-up for timing rows; "mmap" rows measure one cold step's memory (see bench_memory)
    if case.malloc == "mmap":
        warmup, repeats = 0, 1
    base = reset_peak_rss()
    times = time_repeats(step, warmup, repeats, budget_s)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_s": case.batch * case.seq_len / seconds,
        "repeats": len(times),
        "parameters": num_parameters(model),
        "peak_delta_mb": peak_rss_mb() - base,
    }


def _ddp_rank(rank: int, case: ModelCase, threads: int, warmup: int, repeats: int, port: int, results) -> None:
    """One process of `measure_ddp`: the library's own data-parallel wrapping (as `torchrun -m titans train` does)."""
    from titans.distributed import distributed

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(case.processes)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(threads)
    with distributed("cpu") as info:
        # The replica lives only inside _ddp_steps: DDP holds the process group, and a group outliving `distributed`
        # is torn down during interpreter exit, racing its worker threads (seen as std::terminate, SIGABRT).
        measured = _ddp_steps(rank, case, warmup, repeats, info)
        if rank == 0:
            results.put(measured)


def _ddp_steps(rank: int, case: ModelCase, warmup: int, repeats: int, info) -> dict[str, Any]:
    """`_ddp_rank`'s measurement inside the process group: step times on this rank, the job's peak memory."""
    from titans.distributed import wrap_model

    model = build(case)  # same seed on every rank: identical replicas, as DDP requires
    if case.compile:
        model.compile_blocks()
    model = wrap_model(model, "ddp", info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, VOCAB, (case.batch, case.seq_len + 1), generator=torch.Generator().manual_seed(1))
    rows = idx.chunk(case.processes)[rank]  # this rank's contiguous part of the global batch
    inputs, targets = rows[:, :-1], rows[:, 1:]

    def step() -> None:
        _, loss, _ = model(inputs, targets)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base = reset_peak_rss()  # before the warm-up, as in measure_model: the first step allocates the most
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):  # a fixed count on every rank: a rank stopping early would leave the others waiting
        torch.distributed.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.tensor([peak_rss_mb() - base], dtype=torch.float64)
    torch.distributed.all_reduce(peak)  # the job's memory: every process's peak delta, summed
    return {"times": times, "peak_delta_mb": float(peak.item())}


def measure_ddp(case: ModelCase, threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    """A training step of the global batch split over `case.processes` DDP processes (gloo, `threads` each):
    seconds per step (rank 0, each step started together) and the job's tokens/s."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _ddp_rank, (case, threads, warmup, repeats, port, results), nprocs=case.processes, start_method="spawn"
    )
    measured = results.get()
    seconds = statistics.median(measured["times"])
    return {
        "seconds": seconds,
        "tokens_per_s": case.batch * case.seq_len / seconds,
        "repeats": len(measured["times"]),
        "peak_delta_mb": measured["peak_delta_mb"],
    }


def equivalence_error(case: ModelCase) -> float:
    """Largest |fast - naive| over logits and all parameter gradients of case's model, float64 (0 = identical),
    for the fused scan (the default, what is timed) and for chunked_memory.

    T = segment_len + chunk_size + 3 tokens for 2 sequences: crosses a MAC segment, memory chunks and the attention
    window. Raises AssertionError (torch.testing.assert_close, default float64 tolerances) on a mismatch.
    """
    length = case.segment_len + case.chunk_size + 3
    idx = torch.randint(0, VOCAB, (2, length + 1), generator=torch.Generator().manual_seed(3))
    outputs = {}
    for impl in ("fused", "chunked", "naive"):
        model = build(case, torch.float64, impl)
        logits, loss, _ = model(idx[:, :-1], idx[:, 1:])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        outputs[impl] = [logits, *grads]
    worst = 0.0
    for impl in ("fused", "chunked"):
        for fast, ref in zip(outputs[impl], outputs["naive"], strict=True):
            torch.testing.assert_close(fast, ref)
            worst = max(worst, (fast - ref).abs().max().item())
    return worst


def crossover(rows: list[dict[str, Any]], variant: str, key: str, higher_is_better: bool) -> float | None:
    """Interpolated T (log-log) from which `variant` beats baseline-full on `key`; None if not within the sweep.

    Returns the smallest measured T if the variant already wins at the shortest length.
    """

    def series(name: str) -> dict[int, float]:
        return {
            r["seq_len"]: r[key]
            for r in rows
            if r["variant"] == name and r["kind"] == "train" and r.get(key) and r["malloc"] == "glibc"
        }

    ours, base = series(variant), series("baseline-full")
    lengths = sorted(set(ours) & set(base))
    sign = 1.0 if higher_is_better else -1.0
    # log ratio > 0 where the variant wins
    margin = [sign * (math.log(ours[t]) - math.log(base[t])) for t in lengths]
    for i, m in enumerate(margin):
        if m >= 0:
            if i == 0:
                return float(lengths[0])
            t0, t1, m0 = math.log(lengths[i - 1]), math.log(lengths[i]), margin[i - 1]
            return round(math.exp(t0 + (t1 - t0) * (-m0) / (m - m0)))
    return None


def extrapolated_crossover(rows: list[dict[str, Any]], variant: str) -> int | None:
    """T where baseline-full's training cost per token, fitted as a + b T (attention is linear per token in T),
    reaches `variant`'s cost per token at its longest measured T (flat: linear total cost). None if no crossing.
    """

    def per_token(name: str) -> list[tuple[int, float]]:
        return sorted(
            (r["seq_len"], 1.0 / r["tokens_per_s"])
            for r in rows
            if r["variant"] == name and r["kind"] == "train" and r.get("tokens_per_s") and r["malloc"] == "glibc"
        )

    base, ours = per_token("baseline-full"), per_token(variant)
    if len(base) < 2 or not ours:
        return None
    n = len(base)
    mean_t = sum(t for t, _ in base) / n
    mean_c = sum(c for _, c in base) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in base)
    slope = sum((t - mean_t) * (c - mean_c) for t, c in base) / var_t
    intercept = mean_c - slope * mean_t
    if slope <= 0:
        return None
    crossing = (ours[-1][1] - intercept) / slope
    return round(crossing) if crossing > 0 else None


# --quick: a tiny model (one layer of width 16, segment, window 8, chunk 4) so the smoke test takes seconds
QUICK_SHAPE = {"d_model": 16, "n_layers": 1, "n_heads": 2, "segment_len": 8, "window": 8, "chunk_size": 4}


def train_sweep(quick: bool, seq_lens: list[int] | None, variants: list[str]) -> list[ModelCase]:
    """Training cases; the full sweep adds an "mmap" allocator pass (peak = live tensors) at T 4096."""
    if quick:
        return [ModelCase(v, t, **QUICK_SHAPE) for v in variants for t in seq_lens or [32, 64]]
    # the memory variants train at ~150-600 tok/s here, so they stop at T 4096 (a T 8192 step takes about a minute)
    cases = [
        ModelCase(v, t)
        for v in variants
        for t in seq_lens or ([256, 1024, 2048, 4096, 8192] if v.startswith("baseline") else [256, 1024, 4096])
    ]
    if seq_lens is None:
        cases += [ModelCase(v, 4096, malloc="mmap") for v in variants]
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Memory variants against a Transformer of the same size, the yardstick a user compares against: one worker builds
# every model of a shape and times their training steps in turn, so that all of them see the same machine state.

VS_VARIANTS = ("baseline-sliding", "LMM", "MAC", "MAG", "MAL")
# d_model -> the target for each memory variant's tokens/s over the sliding-window baseline's
VS_TARGETS = {256: 0.35, 64: 0.2}
VS_SHAPE = {"n_layers": 2, "n_heads": 4, "segment_len": 128, "window": 128, "chunk_size": 16}


def vs_cases(d_model: int, quick: bool, exact_last_layer: bool = False) -> list[ModelCase]:
    """The same-size comparison at one width: T 1024, batch 4 (--quick: the tiny model, T 64); with
    `exact_last_layer`, every memory variant's memory writes its last layer token by token."""
    shape = QUICK_SHAPE | {"batch": 2} if quick else VS_SHAPE | {"batch": 4, "d_model": d_model}
    length = 64 if quick else 1024
    exact = {"exact_last_layer": True} if exact_last_layer else {}
    return [ModelCase(v, length, **shape, **({} if v.startswith("baseline") else exact)) for v in VS_VARIANTS]


def flops_per_token(case: ModelCase) -> float:
    """Matmul FLOPs of one training step (forward + backward) per token, counted by torch's FlopCounterMode.

    The memory runs `chunked_memory` without scan checkpoints here: the fused op computes the same products (its
    backward recomputes nothing when every chunk is kept) but inside one op that the counter cannot see.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from titans.models import build_model

    config = case.config("chunked")
    config.memory = replace(config.memory, checkpoint_every=0)  # the case's memory, every chunk kept
    torch.manual_seed(0)
    model = build_model(config)
    idx = torch.randint(0, VOCAB, (case.batch, case.seq_len + 1), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    return counter.get_total_flops() / (case.batch * case.seq_len)


def measure_side_by_side(cases: list[ModelCase], threads: int, warmup: int, repeats: int) -> dict[str, Any]:
    """In one process: every case's training step, timed in turn for `repeats` rounds (medians reported)."""
    torch.set_num_threads(threads)
    steps = {}
    for case in cases:
        model = build(case)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, VOCAB, (case.batch, case.seq_len + 1), generator=torch.Generator().manual_seed(1))

        def step(model=model, optimizer=optimizer, idx=idx) -> None:
            _, loss, _ = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[case.variant] = step
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)
    return {v: {"seconds": statistics.median(t), "times": t} for v, t in times.items()}


def vs_transformer(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The table "memory variants vs a same-size Transformer" at d_model 256 and 64, with its targets."""
    rows, targets = [], []
    for d_model in [16] if args.quick else [256, 64]:
        cases = vs_cases(d_model, args.quick, args.exact_last_layer)
        payload = {"side_by_side": [asdict(c) for c in cases], "threads": args.threads, "warmup": args.warmup}
        payload["repeats"] = args.repeats
        command = [sys.executable, str(SCRIPT), "--worker", json.dumps(payload)]
        # several workers: one process's timings move together (its memory layout, the machine at that minute), so
        # a single worker's ratios spread by +-0.03-0.05 from run to run; the median over workers is the figure
        results = []
        for _ in range(args.workers):
            result = run_isolated(command, args.timeout, args.mem_cap_gb, worker_env(args.omp_wait_policy))
            if "error" in result:
                print(f"  same-size comparison d{d_model}: {result['error']}", flush=True)
            else:
                results.append(result)
        if not results:
            continue
        base = cases[0]
        base_flops = flops_per_token(base)
        for case in cases:
            # each worker's ratio compares steps timed in turn in that worker; tok/s from the median step time
            ratios = [r[base.variant]["seconds"] / r[case.variant]["seconds"] for r in results]
            seconds = statistics.median(r[case.variant]["seconds"] for r in results)
            tps = case.batch * case.seq_len / seconds
            flops = flops_per_token(case)
            ratio, limit = statistics.median(ratios), base_flops / flops
            rows.append(
                {
                    "d_model": d_model,
                    "variant": case.variant,
                    "tokens_per_s": tps,
                    "seconds": seconds,
                    "ratio": ratio,
                    "ratio_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
                    "workers": len(results),
                    "mflops_per_token": flops / 1e6,
                    "gflops": flops * tps / 1e9,
                    "flop_limit": limit,
                    "flop_efficiency": ratio / limit,
                    "load": load_average(),
                }
            )
            goal = VS_TARGETS.get(d_model)
            if goal is not None and case.variant != base.variant:
                targets.append(
                    {
                        "target": f"{case.variant} training tok/s >= {goal:g}x the sliding-window Transformer's "
                        f"(d_model {d_model}, T 1024, batch 4)",
                        "value": round(ratio, 3),
                        "met": ratio >= goal,
                    }
                )
        print(f"  same-size comparison d{d_model}: " + ", ".join(f"{r['variant']} {r['ratio']:.3f}x" for r in rows
              if r["d_model"] == d_model), flush=True)  # fmt: skip
    return rows, targets


VS_COLUMNS = [
    ("d_model", "d_model", "d"),
    ("variant", "variant", ""),
    ("tok/s", "tokens_per_s", ",.0f"),
    ("s/step", "seconds", ".3f"),
    ("vs baseline", "ratio", ".3f"),
    ("over workers", "ratio_range", ""),
    ("MFLOP/tok", "mflops_per_token", ".2f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("FLOP limit", "flop_limit", ".3f"),
    ("FLOP eff.", "flop_efficiency", ".2f"),
    ("load", "load", ".2f"),
]


def run_peer(args: argparse.Namespace, spec: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """One titans-pytorch measurement in its own venv and process (`threads`, default --threads), or the quoted
    number when unavailable."""
    peer = Path(args.peer_python)
    if args.no_peer or not peer.exists():
        why = "--no-peer" if args.no_peer else f"{peer} not found"
        return {"tokens_per_s": PEER_QUOTED[spec["kind"]], "source": f"quoted ({why})"}
    payload = {
        **spec,
        "threads": threads or args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget,
    }
    command = [str(peer), str(PEER_SCRIPT), json.dumps(payload)]
    env = worker_env(args.omp_wait_policy, huge_pages=args.huge_pages, allocator=args.allocator)
    result = run_isolated(command, args.timeout, args.mem_cap_gb, env)
    if "error" in result:
        return {"tokens_per_s": PEER_QUOTED[spec["kind"]], "source": f"quoted (measurement failed: {result['error']})"}
    return {**result, "source": "measured", "load": load_average()}


def measure_isolated(args: argparse.Namespace, case: ModelCase) -> dict[str, Any]:
    payload = {"case": asdict(case), "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats}
    payload["budget_s"] = args.budget
    command = [sys.executable, str(SCRIPT), "--worker", json.dumps(payload)]
    env = worker_env(args.omp_wait_policy, case.malloc, args.huge_pages, args.allocator)
    if case.compile:  # said before, not after: a cold compilation is minutes of otherwise silent work
        print(f"  {case.label()}: compiling (the first call builds the kernels; seconds with a warm cache)", flush=True)
    result = run_isolated(command, args.timeout, args.mem_cap_gb, env)
    row = {**asdict(case), **result, "load": load_average()}
    status = result.get("error") or f"{result['tokens_per_s']:.0f} tok/s, +{result['peak_delta_mb']:.0f} MB"
    allocator = "" if args.allocator == "system" else f" on {args.allocator}"  # the glibc tuning then goes unused
    print(f"  {case.label()}{allocator}: {status} (load {row['load']})", flush=True)
    return row


def _compare(
    rows: list[dict[str, Any]], targets: list[dict[str, Any]], what: str, target: str, factor: float, ours, peer
) -> None:
    """Append one side-by-side row (ours vs the peer's measurement) and its target: ours >= factor x the peer."""
    ratio = ours.get("tokens_per_s", 0.0) / peer["tokens_per_s"]
    rows.append(
        {
            "what": what,
            "ours": ours.get("tokens_per_s"),
            "peer": peer["tokens_per_s"],
            "ratio": ratio,
            "peer_source": peer["source"],
            "ours_mb": ours.get("peak_delta_mb"),
            "peer_mb": peer.get("peak_delta_mb"),
        }
    )
    targets.append(
        {
            "target": f"{target} >= {factor:g}x titans-pytorch ({peer['source']})",
            "value": round(ratio, 2),
            "met": ratio >= factor,
        }
    )


def peer_comparison(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ours vs titans-pytorch 0.5.5: MAC training at its shape, and cached generation of a ~1.3M-parameter MAC."""
    rows, targets = [], []
    # --quick: generation only (same code path, one worker less)
    lengths = [] if args.quick or "train" not in args.peer_parts else [512, 1024, 2048]
    compiled = [False, True] if args.compile else [False]
    # with --processes P, ours trains as P DDP processes of --threads each and the peer gets P x --threads threads
    processes = args.processes
    for length in lengths:
        ours = {
            c: measure_isolated(args, ModelCase("MAC", length, batch=PEER_TRAIN_BATCH, compile=c, processes=processes))
            for c in compiled
        }
        peer = run_peer(
            args,
            {
                "kind": "mac_train",
                "dim": 64,
                "depth": 2,
                "segment_len": 32,
                "batch": PEER_TRAIN_BATCH,
                "seq_len": length,
            },
            threads=args.threads * processes,
        )
        for c, row in ours.items():
            tag = " (compiled)" if c else ""
            if processes > 1:
                tag += f" [{processes} processes x {args.threads} threads; peer {args.threads * processes} threads]"
            what = f"MAC train d64x2 seg32 B4 T{length}{tag}"
            _compare(rows, targets, what, f"MAC training{tag} T {length}", 5, row, peer)
    if "generate" not in args.peer_parts:
        return rows, targets
    new_tokens = 4 if args.quick else 64
    ours = {
        c: measure_isolated(args, ModelCase("MAC", new_tokens, kind="generate", compile=c, **GEN_OURS))
        for c in compiled
    }
    peer = run_peer(args, {"kind": "mac_generate", **GEN_PEER, "prompt_len": 16, "new_tokens": new_tokens})
    peer_params = peer.get("parameters", 1.29e6) / 1e6
    for c, row in ours.items():
        tag = " (compiled)" if c else ""
        what = (
            f"MAC cached generation{tag}, {new_tokens} tokens after 16, B 1 "
            f"(params ours {row.get('parameters', 0) / 1e6:.2f}M, peer {peer_params:.2f}M)"
        )
        _compare(rows, targets, what, f"MAC cached generation{tag}", 10, row, peer)
    return rows, targets


def vs_title(workers: int, exact_last_layer: bool = False) -> str:
    """The heading of the same-size table."""
    exact = "; the memories with exact_last_layer=true" if exact_last_layer else ""
    return (
        "memory variants vs a same-size Transformer (training, each model timed in turn in one process; the median "
        f"over {workers} such processes{exact}):"
    )


def report_vs_transformer(args: argparse.Namespace, gate: dict[str, float]) -> int:
    """`--vs-transformer`: the same-size table and its targets, then one JSON line."""
    rows, targets = vs_transformer(args)
    print()
    print(vs_title(args.workers, args.exact_last_layer))
    print(format_table(rows, VS_COLUMNS))
    print(
        "FLOP limit: the baseline's matmul FLOPs per token over the variant's (FlopCounterMode, the memory without "
        "scan checkpoints); FLOP eff.: the measured ratio over that limit"
    )
    for t in targets:
        print(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']}")
    summary = {"benchmark": "models", "gate": "passed", "gate_max_abs_diff": gate, "torch": torch.__version__}
    summary |= {"threads": args.threads, "workers": args.workers, "load_end": load_average()}
    summary |= {"exact_last_layer": args.exact_last_layer, "vs_transformer": rows, "targets": targets}
    print(json.dumps(summary))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = shared_parser(doc=__doc__, unit="steps", budget=30.0)
    p.add_argument("--seq-lens", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 256,1024,8192")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS), help=",".join(VARIANTS))
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=cpu_compiler() is not None,
        help="also time MAC compiled against the peer, training (training.compile) and generation (compile_decode) "
        "(default: when a C++ compiler exists; the warm-up pays a cold compilation of ~3 min for training, ~1 for "
        "generation)",
    )
    p.add_argument("--peer-only", action="store_true", help="skip the per-variant sweep: MAC's gate, then the peer")
    p.add_argument(
        "--vs-transformer",
        action="store_true",
        help="only the table 'memory variants vs a same-size Transformer' (d_model 256 and 64, T 1024, batch 4, "
        "every model timed in turn in one worker), after the gate",
    )
    p.add_argument(
        "--peer-parts",
        type=lambda s: s.split(","),
        default=["train", "generate"],
        help="which comparisons with the peer to run: train,generate (default both)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="MAC training against the peer as this many DDP processes (gloo) of --threads each, on batch 4 split "
        "between them; the peer then gets processes x --threads threads, so both use the same cores (default 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=3,
        help="--vs-transformer: run the side-by-side timing in this many fresh workers, one after another, and report "
        "the median ratio with its range (default 3)",
    )
    p.add_argument(
        "--exact-last-layer",
        action="store_true",
        help="--vs-transformer: every memory variant with memory.exact_last_layer=true (the write that stays stable "
        "where training takes the gates; what it costs against the default)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.processes < 1 or PEER_TRAIN_BATCH % args.processes:
        p.error(f"--processes must divide the peer comparison's batch of {PEER_TRAIN_BATCH}, got {args.processes}")
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.workers < 1:
        p.error(
            f"need --threads >= 1, --repeats >= 1, --warmup >= 0, --workers >= 1; got {args.threads}, {args.repeats}, "
            f"{args.warmup}, {args.workers}"
        )
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {unknown}; choose from {','.join(VARIANTS)}")
    if args.peer_only:
        args.variants = ["MAC"]
    if args.exact_last_layer and not args.vs_transformer:
        p.error("--exact-last-layer applies to the same-size table only: add --vs-transformer")
    if not args.peer_parts or set(args.peer_parts) - {"train", "generate"}:
        p.error(f"--peer-parts takes train, generate or both (comma-separated), got {','.join(args.peer_parts)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        if "side_by_side" in spec:
            cases = [ModelCase(**c) for c in spec["side_by_side"]]
            print(json.dumps(measure_side_by_side(cases, spec["threads"], spec["warmup"], spec["repeats"])), flush=True)
            return 0
        result = measure_model(
            ModelCase(**spec["case"]), spec["threads"], spec["warmup"], spec["repeats"], spec["budget_s"]
        )
        print(json.dumps(result), flush=True)
        return 0

    torch.set_num_threads(args.threads)
    if args.vs_transformer:
        args.variants = [v for v in VS_VARIANTS]
    cases = train_sweep(args.quick, args.seq_lens, ["MAC"] if args.peer_only else args.variants)
    if args.vs_transformer:
        what = f"{len(VS_VARIANTS)} models against a same-size Transformer at d_model 256 and 64"
    elif args.peer_only:
        what = "MAC against titans-pytorch"
    else:
        what = f"{len(cases)} training configurations"
    print(f"bench_models: {what}, {args.threads} threads, torch {torch.__version__}", flush=True)
    gate: dict[str, float] = {}
    for variant in args.variants:
        if variant.startswith("baseline"):
            continue  # no memory: nothing to compare
        try:
            gate[variant] = equivalence_error(cases[[c.variant for c in cases].index(variant)])
        except AssertionError as error:
            print(
                f"GATE FAILED: {variant} fused or chunked != naive; refusing to report timings.\n{error}",
                file=sys.stderr,
            )
            print(json.dumps({"benchmark": "models", "gate": "failed", "variant": variant}))
            return 1
        print(
            f"gate {variant}: fused == chunked == naive (float64 logits and gradients), max |diff| {gate[variant]:.1e}",
            flush=True,
        )

    if args.vs_transformer:
        return report_vs_transformer(args, gate)
    rows = [] if args.peer_only else [measure_isolated(args, case) for case in cases]
    vs_rows, vs_targets = ([], []) if args.peer_only else vs_transformer(args)
    peer_rows, targets = peer_comparison(args)
    targets = vs_targets + targets
    crossings = {}
    for variant in args.variants:
        if variant == "baseline-full":
            continue
        crossings[variant] = {
            "tokens_per_s": crossover(rows, variant, "tokens_per_s", higher_is_better=True),
            "peak_delta_mb": crossover(rows, variant, "peak_delta_mb", higher_is_better=False),
            "tokens_per_s_extrapolated": extrapolated_crossover(rows, variant),
        }

    print()
    if not rows:  # --peer-only: no per-variant sweep, so no table of it
        print("(per-variant sweep skipped: --peer-only)\n")
    else:
        print(
            format_table(
                rows,
                [
                    ("variant", "variant", ""),
                    ("T", "seq_len", "d"),
                    ("batch", "batch", "d"),
                    ("malloc", "malloc", ""),
                    ("tok/s", "tokens_per_s", ",.0f"),
                    ("s/step", "seconds", ".3f"),
                    ("reps", "repeats", "d"),
                    ("peak+MB", "peak_delta_mb", ",.0f"),
                    ("params", "parameters", ",d"),
                    ("load", "load", ".2f"),
                    ("note", "error", ""),
                ],
            )
        )
    if vs_rows:
        print()
        print(vs_title(args.workers, args.exact_last_layer))
        print(format_table(vs_rows, VS_COLUMNS))
    print()
    print("vs titans-pytorch 0.5.5 (same run, same threads):")
    print(
        format_table(
            peer_rows,
            [
                ("comparison", "what", ""),
                ("ours tok/s", "ours", ",.0f"),
                ("peer tok/s", "peer", ",.1f"),
                ("ours/peer", "ratio", ".1f"),
                ("ours +MB", "ours_mb", ",.0f"),
                ("peer +MB", "peer_mb", ",.0f"),
                ("peer numbers", "peer_source", ""),
            ],
        )
    )
    print()
    for variant, cross in crossings.items():
        speed, memory = cross["tokens_per_s"], cross["peak_delta_mb"]
        print(
            f"{variant:16s} beats baseline-full on tok/s from T ~ {speed or 'beyond the sweep'}, "
            f"on peak memory from T ~ {memory or 'beyond the sweep'}; "
            f"extrapolated tok/s crossing T ~ {cross['tokens_per_s_extrapolated'] or 'none'}"
        )
    for t in targets:
        print(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']}")
    print(
        json.dumps(
            {
                "benchmark": "models",
                "gate": "passed",
                "gate_max_abs_diff": gate,
                "torch": torch.__version__,
                "threads": args.threads,
                "huge_pages": args.huge_pages,
                "allocator": args.allocator,
                "load_end": load_average(),
                "results": rows,
                "vs_transformer": vs_rows,
                "peer": peer_rows,
                "crossover_T": crossings,
                "targets": targets,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
