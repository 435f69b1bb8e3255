"""MQAR accuracy by the distance from each key to its query: does a model recall only within its attention's reach?

    python scripts/mqar_by_distance.py RUN [RUN ...] [--length 254] [--samples 512] [--edges 30,63]

For each trained MQAR run (a run directory or a checkpoint), `--samples` fresh examples at `--length` tokens (default:
the trained length; the examples are the same for every run), and for every query the distance in tokens from its
key in the context to the query. The accuracy per distance bin (`--edges` 30,63: 1-30, 31-63, 64+) separates what
attention can reach (two layers of a window-16 attention reach 30 tokens back) from what only a memory can, and
distances never seen in training (past the trained length) from those that were. Prints one line per run, then one
JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from titans.run import load_trained
from titans.tasks.base import IGNORE_INDEX
from titans.tasks.mqar import MQAR


def query_distances(inputs: torch.Tensor, targets: torch.Tensor, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored [B, T] bool: the query positions, distance [B, T] long: each position's distance back to the context
    position of the key it holds; meaningful where scored). inputs, targets [B, T] in MQAR's layout (first pass)."""
    keys = inputs[:, 0 : 2 * num_pairs : 2]  # [B, N]: key i sits at position 2i
    pair = (inputs.unsqueeze(-1) == keys.unsqueeze(1)).float().argmax(dim=-1)  # [B, T]: which key a position holds
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    return targets != IGNORE_INDEX, positions - 2 * pair


def accuracy_by_distance(run: str, length: int | None, samples: int, edges: list[int], seed: int) -> dict:
    """One run's accuracy (%) and query count per distance bin."""
    cfg, task, model, _ = load_trained(run, [])
    if not isinstance(task, MQAR):
        raise SystemExit(f"{run}: trained on {cfg.data.dataset}, not mqar")
    task = dataclasses.replace(task, seq_len=length or task.seq_len)
    batch = task.sample(samples, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _, _ = model(batch.inputs.to(next(model.parameters()).device))
    correct = logits.argmax(dim=-1).cpu() == batch.targets
    scored, distance = query_distances(batch.inputs, batch.targets, task.num_kv_pairs)
    bins = {}
    for low, high in zip([1, *(e + 1 for e in edges)], [*edges, None], strict=True):
        label = f"{low}-{high}" if high is not None else f"{low}+"
        mask = scored & (distance >= low)
        if high is not None:
            mask &= distance <= high
        count = int(mask.sum())
        bins[label] = {"accuracy": round(100 * correct[mask].float().mean().item(), 1) if count else None, "n": count}
    return {"run": run, "variant": cfg.model.variant, "length": task.seq_len, "bins": bins}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="MQAR run directories or checkpoints")
    p.add_argument("--length", type=int, help="evaluation length in tokens (default: each run's trained length)")
    p.add_argument("--samples", type=int, default=512, help="fresh examples (default 512)")
    p.add_argument("--edges", default="30,63", help="upper ends of the distance bins but the last (default 30,63)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples (default 0)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = p.parse_args(argv)
    edges = sorted(int(e) for e in args.edges.split(","))
    if edges[0] < 1:
        p.error(f"--edges must be positive distances, got {args.edges}")
    torch.set_num_threads(args.threads)
    results = []
    for run in args.runs:
        result = accuracy_by_distance(run, args.length, args.samples, edges, args.seed)
        cells = "  ".join(f"{label}: {b['accuracy']} % of {b['n']}" for label, b in result["bins"].items())
        print(f"{run}  ({result['variant']}, {result['length']} tokens)  {cells}", flush=True)
        results.append(result)
    print(json.dumps({"script": "mqar_by_distance", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
