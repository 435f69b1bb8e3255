"""Every variant on one CUDA GPU: training tokens/s and peak memory against T, SDPA against FlexAttention for the
sliding-window models, and cached generation.

    python benchmarks/bench_cuda.py                      # the sweep below, a few minutes on an H100/H200
    python benchmarks/bench_cuda.py --seq-lens 1024 --budget 60
    python benchmarks/bench_cuda.py --shape issue        # issue 18's shape: d_model 512, 8 heads, 4 layers, T 8192

What it does, in order:
1. Training steps (forward, backward, AdamW step; float32 weights, bf16 autocast unless --dtype float32) of every
   variant at d_model 256, 4 heads, 2 layers, batch 4, window 256, MAC segment 128, memory chunk 64 (--shape small;
   --shape issue: d_model 512, 8 heads, 4 layers, window and MAC segment 512, memory chunk 16), for each T, and
   each baseline and memory variant again with its forward and backward replayed from a CUDA graph
   (training.cuda_graph);
   baseline-sliding, MAG and MAL with `model.attention_impl` sdpa and flex side by side, and the memory variants'
   default (the scan's Triton kernels on CUDA) beside the tensor-op scan (`fused.TRITON_ON_CUDA = False`). Each
   case gets a warm-up (FlexAttention's and the scan's kernels compile there), then the median of up to --repeats
   synchronised steps; peak memory is torch.cuda.max_memory_allocated over the timed steps.
2. Cached generation: tokens/s of `generate` after a 64-token prompt, batch 1, greedy: the fixed-shape step eager
   and replayed as a CUDA graph (`TitansLM.graph_decode`), alternating, and whether both gave the same tokens.
3. The memory variants' tokens/s over the same-size Transformer's (sliding window and full attention, same T, eager
   against eager and graphed against graphed), and the memory layer alone: its achieved TFLOP/s beside the GPU's
   dense matmul rate.
4. Aligned tables, then ONE JSON line. Cases are skipped, not failed, once the --budget of seconds is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MemoryCase, build_memory, format_table, memory_flops  # noqa: E402

from titans.config import MemoryConfig, ModelConfig  # noqa: E402
from titans.memory import fused  # noqa: E402
from titans.models import build_model  # noqa: E402
from titans.train_graph import WARM_UP_STEPS, GraphedStep, cuda_capture  # noqa: E402

VOCAB = 256
TENSOR_OP = "tensor-op scan"  # a case's flag: fused.TRITON_ON_CUDA off, the memory scan in tensor ops
GRAPH = "cuda graph"  # a case's flag: forward and backward replayed from a CUDA graph (training.cuda_graph)
UNTILED = "untiled"  # a case's flag: the untiled Triton kernels at every width they cover (no hidden tiles)
# (label, variant, baseline attention, attention impl, memory overrides)
CASES = [
    # first what issue 18's targets compare: the defaults (the memory scan's Triton kernels on CUDA), eager and with
    # forward and backward replayed from a CUDA graph (training.cuda_graph, titans/train_graph.py)
    ("baseline-full", "baseline", "full", "sdpa", {}),
    ("baseline-sliding", "baseline", "sliding", "sdpa", {}),
    ("LMM", "LMM", "full", "sdpa", {}),
    ("MAC", "MAC", "full", "sdpa", {}),
    ("MAG", "MAG", "full", "sdpa", {}),
    ("MAL", "MAL", "full", "sdpa", {}),
    ("baseline-full graph", "baseline", "full", "sdpa", {GRAPH: True}),
    ("baseline-sliding graph", "baseline", "sliding", "sdpa", {GRAPH: True}),
    ("LMM graph", "LMM", "full", "sdpa", {GRAPH: True}),
    ("MAC graph", "MAC", "full", "sdpa", {GRAPH: True}),
    ("MAG graph", "MAG", "full", "sdpa", {GRAPH: True}),
    ("MAL graph", "MAL", "full", "sdpa", {GRAPH: True}),
    # FlexAttention's sliding-window kernel for the models that have one
    ("baseline-sliding flex", "baseline", "sliding", "flex", {}),
    ("MAG flex", "MAG", "full", "flex", {}),
    ("MAL flex", "MAL", "full", "flex", {}),
    # the tensor-op scan, the default before the kernels. The LMM's default exact last layer has no backward
    # kernel: its pair is anchored.
    ("LMM anchored", "LMM", "full", "sdpa", {"exact_last_layer": False}),
    ("LMM anchored tensor-op", "LMM", "full", "sdpa", {"exact_last_layer": False, TENSOR_OP: True}),
    ("MAC tensor-op", "MAC", "full", "sdpa", {TENSOR_OP: True}),
    ("MAG tensor-op", "MAG", "full", "sdpa", {TENSOR_OP: True}),
    ("MAL tensor-op", "MAL", "full", "sdpa", {TENSOR_OP: True}),
    # the kernels that keep whole layers in registers, where the defaults tile the hidden width (chosen from ptxas's
    # spill reports, not yet from timings)
    ("MAC untiled", "MAC", "full", "sdpa", {UNTILED: True}),
    ("MAG untiled", "MAG", "full", "sdpa", {UNTILED: True}),
]
FLAGS = (TENSOR_OP, GRAPH, UNTILED)


@contextlib.contextmanager
def untiled_kernels(enabled: bool) -> Iterator[None]:
    """Within it (when enabled), the Triton scan runs its untiled kernels at every width they cover."""
    try:
        from titans.memory import scan_triton
    except ImportError:  # no triton: the tensor-op scan runs either way
        enabled = False
    if not enabled:
        yield
        return
    default = scan_triton.UNTILED_MAX_LAYER_ELEMENTS
    scan_triton.UNTILED_MAX_LAYER_ELEMENTS = scan_triton.MAX_LAYER_ELEMENTS
    try:
        yield
    finally:
        scan_triton.UNTILED_MAX_LAYER_ELEMENTS = default


# --shape: the model block of every case. "small" is the first GPU measurement's (benchmarks/results/
# cuda_h200_20261128.md); "issue" the shape issue 18's targets are stated at (T 8192 by default there).
SHAPES: dict[str, dict[str, int]] = {
    "small": {"d_model": 256, "n_heads": 4, "n_layers": 2, "window": 256, "segment_len": 128},
    "issue": {"d_model": 512, "n_heads": 8, "n_layers": 4, "window": 512, "segment_len": 512},
}
DEFAULT_SEQ_LENS = {"small": "1024,4096,16384", "issue": "8192"}
# the memory's chunk: 64 in the first measurement; the library's default 16 at issue 18's shape (the kernels' tiles
# are sized for it)
MEMORY_CHUNKS = {"small": 64, "issue": 16}


def model_config(
    variant: str, baseline_attention: str, impl: str, memory: dict[str, Any], shape: str = "small"
) -> ModelConfig:
    chunk = MEMORY_CHUNKS[shape]
    return ModelConfig(
        variant=variant,
        **SHAPES[shape],
        vocab_size=VOCAB,
        persistent_memory_size=4,
        baseline_attention=baseline_attention,
        attention_impl=impl,
        memory=MemoryConfig(chunk_size=chunk, **{k: v for k, v in memory.items() if k not in FLAGS}),
    )


def timed(step, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Seconds per synchronised call of step(): `warmup` untimed calls, then up to `repeats` (at least one)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def train_case(
    label: str, cfg: ModelConfig, T: int, batch: int, dtype: str, args: argparse.Namespace, graph: bool = False
) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, VOCAB, (batch, T), device="cuda")
    targets = torch.roll(idx, -1, dims=1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
    graphed = GraphedStep(model, autocast_dtype, cuda_capture, optimizer, float("inf")) if graph else None

    def step() -> None:
        if graphed is not None:  # as train_step runs it: forward, backward, clip and AdamW in one replay
            graphed(idx, targets)
            return
        with autocast:
            _, loss, _ = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # measured, as train_step and the graph do
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row: dict[str, Any] = {"case": label, "T": T, "variant": cfg.variant, "graph": graph}
    try:
        # a graphed case's warm-up includes its eager steps and the recording
        for _ in range(max(args.warmup, WARM_UP_STEPS + 1) if graph else args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = timed(step, 0, args.repeats, args.case_budget)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    except RuntimeError as error:  # reported in the table and the JSON line; the sweep goes on
        row["error"] = str(error).splitlines()[0][:100]
        return row
    median = statistics.median(times)
    row["step_ms"] = 1e3 * median
    row["tokens_per_s"] = batch * T / median
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def transformer_ratios(rows: list[dict]) -> list[dict]:
    """Each memory variant's training tokens/s over the same-size Transformer's at the same T, eager against eager
    and graphed against graphed: the sliding-window baseline (issue 18's target, >= 0.5x) and full attention (the
    paper's implementation: about 0.77x at 8K, MIRAS paper)."""
    baselines = {
        (r["case"].removesuffix(" graph"), r["T"], r["graph"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r
    }
    ratios = []
    for r in rows:
        if r["variant"] == "baseline" or "tokens_per_s" not in r:
            continue
        ratio = {"case": r["case"], "T": r["T"]}
        for name in ("baseline-sliding", "baseline-full"):
            reference = baselines.get((name, r["T"], r["graph"]))
            if reference is not None:
                ratio[f"vs_{name.removeprefix('baseline-')}"] = r["tokens_per_s"] / reference
        ratios.append(ratio)
    return ratios


def memory_layer_case(shape: str, T: int, batch: int, args: argparse.Namespace) -> dict:
    """One NeuralMemory at the model's width (the library's defaults, the shape's chunk), forward + backward in
    float32 (the memory's inner arithmetic is float32 under autocast too): ms per call and the achieved TFLOP/s of
    its analytic FLOPs (bench_memory.memory_flops, the chunk-start states recomputed in the backward)."""
    case = MemoryCase(SHAPES[shape]["d_model"], SHAPES[shape]["n_heads"], batch, T, MEMORY_CHUNKS[shape], "fwd+bwd")
    module = build_memory(case).cuda()
    x = torch.randn(batch, T, case.dim, device="cuda", requires_grad=True)

    def step() -> None:
        y, _ = module(x)
        y.square().mean().backward()

    row: dict[str, Any] = {"case": "memory layer fwd+bwd", "T": T}
    try:
        times = timed(step, args.warmup, args.repeats, args.case_budget)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        row["error"] = str(error).splitlines()[0][:100]
        return row
    median = statistics.median(times)
    row["step_ms"] = 1e3 * median
    row["tflops"] = memory_flops(case)["total"] * case.tokens / median / 1e12
    return row


def matmul_tflops(dtype: torch.dtype, size: int = 8192, repeats: int = 5) -> float:
    """The GPU's dense matmul rate in `dtype` (float32 without TF32, as the memory kernels compute), TFLOP/s."""
    a, b = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best = min(timed(lambda: a @ b, 1, repeats, 30.0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * size**3 / best / 1e12


@torch.no_grad()
def generation_case(label: str, cfg: ModelConfig, new_tokens: int, args: argparse.Namespace) -> dict:
    """Tokens/s of greedy cached generation, eager and with the step replayed as a CUDA graph (`graph_decode`),
    alternating; `same_tokens` says whether the two generated the same continuation."""
    torch.manual_seed(0)
    model = build_model(cfg).cuda().eval()
    prompt = torch.randint(0, VOCAB, (1, 64), device="cuda")
    outputs: dict[bool, torch.Tensor] = {}
    times: dict[bool, list[float]] = {False: [], True: []}

    def generate(graphed: bool) -> None:
        model.graph_decode(graphed)
        outputs[graphed] = model.generate(prompt, new_tokens, temperature=0.0)

    for graphed in (False, True):
        generate(graphed)  # warm-up
    for _ in range(args.repeats):
        for graphed in (False, True):
            times[graphed] += timed(lambda g=graphed: generate(g), 0, 1, args.case_budget)
    eager, graphed = (new_tokens / statistics.median(times[g]) for g in (False, True))
    same = bool(torch.equal(outputs[False], outputs[True]))
    return {"case": label, "new_tokens": new_tokens, "gen_tokens_per_s": eager, "graph_tokens_per_s": graphed,
            "graph_speedup": graphed / eager, "same_tokens": same, "same": "yes" if same else "NO"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small", help="the model block (see SHAPES)")
    parser.add_argument("--seq-lens", default=None, help="comma-separated T (default: 1024,4096,16384; 8192 for issue)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast dtype")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--case-budget", type=float, default=10.0, help="stop repeating a case after this many s")
    parser.add_argument("--budget", type=float, default=240.0, help="skip the remaining cases after this many s")
    parser.add_argument("--new-tokens", type=int, default=256, help="generated tokens per generation case")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda needs a CUDA GPU; none is visible to torch here", file=sys.stderr)
        print(json.dumps({"benchmark": "cuda", "error": "no CUDA device"}))
        return 1
    seq_lens = [int(t) for t in (args.seq_lens or DEFAULT_SEQ_LENS[args.shape]).split(",")]
    start = time.perf_counter()
    train_rows: list[dict] = []
    skipped: list[str] = []
    for T in seq_lens:
        for label, variant, attention, impl, memory in CASES:
            if time.perf_counter() - start > args.budget:
                skipped.append(f"{label} T={T}")
                continue
            fused.TRITON_ON_CUDA = not memory.get(TENSOR_OP, False)
            config = model_config(variant, attention, impl, memory, args.shape)
            with untiled_kernels(memory.get(UNTILED, False)):
                row = train_case(label, config, T, args.batch, args.dtype, args, graph=memory.get(GRAPH, False))
            torch.cuda.empty_cache()  # the case's model and optimiser are gone; give their blocks back
            train_rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    layer_rows: list[dict] = []
    for T in seq_lens:
        if time.perf_counter() - start > args.budget:
            skipped.append(f"memory layer T={T}")
            continue
        fused.TRITON_ON_CUDA = True
        layer_rows.append(memory_layer_case(args.shape, T, args.batch, args))
        torch.cuda.empty_cache()
    rates = {name: matmul_tflops(dtype) for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    generation_rows: list[dict] = []
    for label, variant, attention, impl, memory in CASES:
        if impl == "flex" or any(flag in memory for flag in FLAGS):  # decoding: no FlexAttention, no scan
            continue
        if time.perf_counter() - start > args.budget:
            skipped.append(f"{label} generation")
            continue
        config = model_config(variant, attention, impl, memory, args.shape)
        generation_rows.append(generation_case(label, config, args.new_tokens, args))

    device = torch.cuda.get_device_name()
    shape = SHAPES[args.shape]
    print(
        f"\nTraining on {device}, torch {torch.__version__}: d_model {shape['d_model']}, {shape['n_heads']} heads, "
        f"{shape['n_layers']} layers, batch {args.batch}, window {shape['window']}, MAC segment "
        f"{shape['segment_len']}, memory chunk {MEMORY_CHUNKS[args.shape]}, autocast {args.dtype}; median of up to "
        f"{args.repeats} "
        "steps"
    )
    columns = [
        ("case", "case", "s"),
        ("T", "T", "d"),
        ("step ms", "step_ms", ".1f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("peak GiB", "peak_gib", ".2f"),
        ("error", "error", "s"),
    ]
    print(format_table(train_rows, columns))
    ratios = transformer_ratios(train_rows)
    print("\nMemory variants vs the same-size Transformer (training tokens/s; eager vs eager, graph vs graph)")
    ratio_columns = [
        ("case", "case", "s"),
        ("T", "T", "d"),
        ("vs sliding window", "vs_sliding", ".3f"),
        ("vs full attention (paper ~0.77)", "vs_full", ".3f"),
    ]
    print(format_table(ratios, ratio_columns))
    print(
        f"\nThe memory layer alone (d {shape['d_model']}, {shape['n_heads']} heads, chunk "
        f"{MEMORY_CHUNKS[args.shape]}, batch {args.batch}, float32); dense matmul: float32 {rates['float32']:.1f}, "
        f"bf16 {rates['bfloat16']:.1f} TFLOP/s"
    )
    print(format_table(layer_rows, [("case", "case", "s"), ("T", "T", "d"), ("ms", "step_ms", ".1f"),
                                    ("TFLOP/s", "tflops", ".2f"), ("error", "error", "s")]))  # fmt: skip
    print(f"\nCached generation, batch 1, {args.new_tokens} tokens after 64: the fixed-shape step eager and replayed")
    generation_columns = [
        ("case", "case", "s"),
        ("eager tokens/s", "gen_tokens_per_s", ",.0f"),
        ("CUDA graph tokens/s", "graph_tokens_per_s", ",.0f"),
        ("speed-up", "graph_speedup", ".2f"),
        ("same tokens", "same", "s"),
    ]
    print(format_table(generation_rows, generation_columns))
    if skipped:
        print(f"\nskipped (budget {args.budget:.0f} s spent): {', '.join(skipped)}")
    result = {
        "benchmark": "cuda",
        "device": device,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "shape": {**SHAPES[args.shape], "memory_chunk": MEMORY_CHUNKS[args.shape], "batch": args.batch},
        "train": train_rows,
        "vs_transformer": ratios,
        "memory_layer": layer_rows,
        "matmul_tflops": rates,
        "generate": generation_rows,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
