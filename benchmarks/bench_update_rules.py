"""What each memory update rule costs a training step: Eq. 16's anchor, the exact last layer, and chunk 1, side by side.

    python benchmarks/bench_update_rules.py                        # MAC and LMM on the default config, ~2 minutes
    python benchmarks/bench_update_rules.py --variants LMM,MAG --repeats 12
    python benchmarks/bench_update_rules.py --quick                 # smoke run, a few seconds

The rules (`model.memory` overrides on config.yaml, everything else as the config has it):
- anchored:   `exact_last_layer=false`, the default of MAC, MAG and MAL; every inner gradient of a chunk at the
              chunk-start weights (Eq. 16), chunks of 16
- exact-last: `exact_last_layer=true`, the LMM's default; the last layer's gradient at the current weights (a
              triangular solve per chunk)
- chunk-1:    `chunk_size=1`; every gradient at the current weights (Eqs. 13-15 token by token)

Gate: before anything is timed, each variant's exact-last model (the fused scan, which is what is timed) must equal
the same model on the per-token reference (`memory.impl=naive`) in float64 on a short batch, logits and every
parameter's gradient; a mismatch prints the error and exits 1.

One process, one thread; the models of one variant are timed in turn, round after round (forward, backward of a
mean-square loss on the logits, batch of random tokens), so that a load change on the shared machine hits every rule
alike; the median over rounds after the warm-up is reported, with its ratio to the anchored rule. Prints a table, then
ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from titans.config import load_config  # noqa: E402
from titans.models import build_model  # noqa: E402

RULES = {
    "anchored": ["model.memory.exact_last_layer=false"],
    "exact-last": ["model.memory.exact_last_layer=true"],
    "chunk-1": ["model.memory.chunk_size=1"],
}


def gate(config: str, variant: str, overrides: list[str]) -> float:
    """Largest |difference| between the fused and the per-token exact-last model (logits and parameter gradients)."""
    rule = RULES["exact-last"]
    small = ["data.seq_len=37", *overrides]  # two chunks of 16 and a partial one
    grads = []
    for impl in ("fused", "naive"):
        cfg = load_config(config, [f"model.variant={variant}", *small, *rule, f"model.memory.impl={impl}"])
        cfg.model.vocab_size = 32
        torch.manual_seed(0)
        model = build_model(cfg.model).double()
        tokens = torch.randint(0, 32, (2, cfg.data.seq_len), generator=torch.Generator().manual_seed(1))
        out = model(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        logits.square().mean().backward()
        grads.append([logits.detach(), *(p.grad for p in model.parameters() if p.grad is not None)])
    return max((a - b).abs().max().item() for a, b in zip(*grads, strict=True))


def time_rules(config: str, variant: str, batch: int, rounds: int, warmup: int, overrides: list[str]) -> dict:
    """Median seconds per training step of each rule for one variant, and the sequence length it ran at."""
    models = {}
    for rule, extra in RULES.items():
        cfg = load_config(config, [f"model.variant={variant}", *overrides, *extra])
        cfg.model.vocab_size = 32  # the embedding's size barely matters here; the memory's work does
        torch.manual_seed(0)
        models[rule] = build_model(cfg.model)
    length = cfg.data.seq_len
    tokens = torch.randint(0, 32, (batch, length))
    times: dict[str, list[float]] = {rule: [] for rule in RULES}
    for _ in range(warmup + rounds):
        for rule, model in models.items():
            start = time.perf_counter()
            out = model(tokens)
            logits = out[0] if isinstance(out, tuple) else out
            logits.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
            times[rule].append(time.perf_counter() - start)
    return {"seq_len": length, "seconds": {rule: statistics.median(t[warmup:]) for rule, t in times.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config.yaml", help="run config the models are built from")
    p.add_argument("--variants", default="MAC,LMM", help="comma-separated memory variants (default MAC,LMM)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32, the config's)")
    p.add_argument("--repeats", type=int, default=8, help="timed rounds; the median is reported (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny models and two rounds (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides: list[str] = []
    if args.quick:
        overrides = ["model.d_model=16", "model.n_heads=2", "data.seq_len=24", "model.segment_len=8"]
        args.batch, args.repeats, args.warmup = 2, 2, 1
    variants = args.variants.split(",")
    gates = {v: gate(args.config, v, overrides) for v in variants}
    if max(gates.values()) > 1e-10:
        print(f"gate failed: exact-last fused vs naive, max |diff| {gates}", file=sys.stderr)
        return 1
    results = {}
    for variant in variants:
        results[variant] = time_rules(args.config, variant, args.batch, args.repeats, args.warmup, overrides)
    print(f"{'variant':<8}{'T':>6}" + "".join(f"{rule + ' ms':>16}{'x':>7}" for rule in RULES))
    for variant, r in results.items():
        base = r["seconds"]["anchored"]
        cells = "".join(f"{1000 * s:>16.1f}{s / base:>7.2f}" for s in r["seconds"].values())
        print(f"{variant:<8}{r['seq_len']:>6}{cells}")
    summary = {
        "benchmark": "update_rules",
        "gate": "passed",
        "gate_max_abs_diff": gates,
        "config": args.config,
        "batch": args.batch,
        "threads": 1,
        "repeats": args.repeats,
        "results": {
            v: {"seq_len": r["seq_len"], **{f"{rule}_s": round(s, 5) for rule, s in r["seconds"].items()}}
            for v, r in results.items()
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
