"""Leak check: the resident memory (RSS) of a small training run at step 100 against step 2,000.

    python scripts/soak_rss.py                                 # MAC, 2,000 steps, one thread
    python scripts/soak_rss.py --steps 500 model.variant=LMM   # any dotted config override

It runs the real `titans.train.train` (evaluations and checkpoints included) with one CPU thread. A thin wrapper
around the model reads the process's current RSS (/proc/self/statm) and peak RSS (getrusage) at the start of every
`--every`-th training step. A leak (a carried graph, a growing cache or log) shows up as current RSS that keeps
rising after warm-up. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import titans.train
from titans.config import load_config
from titans.models import build_model

# Small enough for a CPU soak, big enough to exercise every part of the loop (memory, eval, checkpoints).
SOAK_CONFIG = [
    "model.variant=MAC",
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.segment_len=16",
    "model.window=16",
    "data.dataset=copy_task",
    "data.seq_len=48",
    "data.copy_length=8",
    "data.num_samples=400",
    "data.fresh_samples=true",
    "training.batch_size=8",
    "training.eval_every=500",
    "training.eval_samples=40",
    "training.checkpoint_every=500",
    "training.device=cpu",
    "training.progress=false",
    "training.threads=1",
]


def current_rss_mb() -> float:
    """Resident set size now, in MiB (Linux /proc; the peak from getrusage is the fallback elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return peak_rss_mb()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class RSSProbe(nn.Module):
    """Forwards to the model; at the start of training steps 1, every, 2*every, ... records (current, peak) RSS."""

    def __init__(self, model: nn.Module, every: int) -> None:
        super().__init__()
        self.model, self.every, self.step = model, every, 0
        self.samples: dict[int, tuple[float, float]] = {}

    def forward(self, idx, targets=None, state=None):
        if self.model.training:
            self.step += 1
            if self.step == 1 or self.step % self.every == 0:
                self.samples[self.step] = (current_rss_mb(), peak_rss_mb())
        return self.model(idx, targets, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps of the run")
    parser.add_argument("--every", type=int, default=100, help="steps between RSS samples")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args()
    if args.steps < args.every or args.every < 1:
        parser.error(f"need --steps >= --every >= 1, got --steps {args.steps} --every {args.every}")

    probes: list[RSSProbe] = []

    def build_probed(model_cfg):
        probes.append(RSSProbe(build_model(model_cfg), args.every))
        return probes[-1]

    # train() builds its model through this module-level name; the probe only observes.
    titans.train.build_model = build_probed
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = load_config(
            None,
            [*SOAK_CONFIG, f"training.max_steps={args.steps}", f"training.out_dir={out_dir}", *args.overrides],
        )
        start = time.time()
        result = titans.train.train(cfg)
        wall = time.time() - start

    samples = probes[0].samples
    print(f"{'step':>6} {'rss MiB':>9} {'peak MiB':>9}")
    for step, (rss, peak) in samples.items():
        print(f"{step:>6} {rss:>9.1f} {peak:>9.1f}")
    first = args.every if args.every in samples else min(samples)
    last = max(samples)
    report = {
        "script": "soak_rss",
        "variant": cfg.model.variant,
        "steps": result["steps"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rss_mb": {str(first): round(samples[first][0], 1), str(last): round(samples[last][0], 1)},
        "peak_rss_mb": {str(first): round(samples[first][1], 1), str(last): round(samples[last][1], 1)},
        "rss_growth_mb": round(samples[last][0] - samples[first][0], 1),
        "peak_growth_mb": round(samples[last][1] - samples[first][1], 1),
        "final_train_loss": result.get("train_loss"),
        "wall_s": round(wall, 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
