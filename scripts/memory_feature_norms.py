"""How large the last memory layer's inputs grow in a trained model, and the delta-rule step they make.

    python scripts/memory_feature_norms.py runs/<run> [runs/<other run> ...] [--samples 32]

For each checkpoint (file or run directory): the model reads `--samples` test sequences of its own task through the
chunk-parallel memory (`memory.impl=chunked`, same results as the default fused scan), and every chunk's keys are
recorded where the last memory layer takes them: a_t, the hidden features of key t at the anchor. Printed per run: the
50 / 90 / 99 % quantiles and the maximum of |a_t|^2 over tokens, heads and memory layers, and, where the exact last
layer is on, of theta_t |a_t|^2 (theta_t read off the chunk's mix diagonal). Why: the exact last layer is a delta
rule on a_t, whose error on its own key shrinks by the factor 1 - 2 theta_t |a_t|^2 per token; past
theta_t |a_t|^2 = 1 it overshoots (docs/results.md, "MQAR diagnosis", session 13). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

import titans.memory.chunked as chunked
from titans.data import make_datasets
from titans.memory.network import MemoryMLP
from titans.run import load_trained

QUANTILES = (0.5, 0.9, 0.99)


def measure(checkpoint: str, samples: int) -> dict:
    """Quantiles of |a|^2 (and theta |a|^2 with the exact last layer) over `samples` test sequences."""
    norms, steps = [], []
    anchored, exact = MemoryMLP.key_path, chunked.exact_last_key_path

    def record_anchored(self, weights, k, v):
        out = anchored(self, weights, k, v)
        norms.append(out[0][-1].square().sum(-1).flatten())
        return out

    def record_exact(network, anchor, w0, s0, co, k, v, grad_clip):
        out = exact(network, anchor, w0, s0, co, k, v, grad_clip)
        a_sq = out[0][-1].square().sum(-1)
        norms.append(a_sq.flatten())
        steps.append((torch.diagonal(co.mix, dim1=-2, dim2=-1) * a_sq).flatten())
        return out

    MemoryMLP.key_path, chunked.exact_last_key_path = record_anchored, record_exact
    try:
        cfg, task, model, _ = load_trained(checkpoint, ["model.memory.impl=chunked"])
        _, test_set = make_datasets(cfg, task)
        with torch.no_grad():
            model(test_set.inputs[:samples])
    finally:
        MemoryMLP.key_path, chunked.exact_last_key_path = anchored, exact

    def summary(values: list[torch.Tensor]) -> dict | None:
        if not values:
            return None
        x = torch.cat(values).double()
        return {**{f"q{round(100 * q)}": x.quantile(q).item() for q in QUANTILES}, "max": x.max().item()}

    memory = cfg.model.memory
    return {
        "checkpoint": checkpoint,
        "variant": cfg.model.variant,
        "theta_init": memory.theta_init,
        "exact_last_layer": memory.exact_last_layer,
        "a_sq": summary(norms),
        "theta_a_sq": summary(steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or run directories")
    p.add_argument("--samples", type=int, default=32, help="test sequences read (default 32)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(c, args.samples) for c in args.checkpoints]
    print(f"{'run':<48}{'|a|^2 q50 / q90 / q99 / max':>34}{'theta |a|^2 q50 / q90 / q99 / max':>40}")
    for r in results:

        def cells(s: dict | None) -> str:
            return "-" if s is None else " / ".join(f"{s[k]:.3g}" for k in ("q50", "q90", "q99", "max"))

        print(f"{r['checkpoint'][-48:]:<48}{cells(r['a_sq']):>34}{cells(r['theta_a_sq']):>40}")
    print(json.dumps({"script": "memory_feature_norms", "samples": args.samples, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
