"""Two commits side by side: every variant's training step and cached generation, tokens/s, alternating old and new.

For refactors that must not cost speed: each measurement runs in a fresh process with PYTHONPATH set to one tree, and
the two trees alternate case by case and round by round, so load on a shared machine falls on both alike.

    python benchmarks/bench_commits.py --old 21227ea                 # that commit against the working tree
    python benchmarks/bench_commits.py --old HEAD~3 --new HEAD --rounds 5

Shape: d_model 64, 4 heads, 2 layers, window and MAC segment 32 (the sliding-window baseline); training is forward,
backward and an AdamW step on batch 4 x T 1024 (median of 5 steps after one warm-up); generation is 128 greedy
tokens after a 16-token prompt with the cache (median of 5). Prints a table, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("baseline", "LMM", "MAC", "MAG", "MAL")
KINDS = ("train", "generate")


def measure(variant: str, kind: str) -> float:
    """Tokens/s of one case in this process (the tree on sys.path)."""
    import torch

    from titans.config import ModelConfig
    from titans.models import build_model

    torch.set_num_threads(2)
    extra = {"baseline_attention": "sliding"} if variant == "baseline" else {}
    cfg = ModelConfig(
        variant=variant, vocab_size=256, d_model=64, n_heads=4, n_layers=2, window=32, segment_len=32, **extra
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    times = []
    if kind == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        idx = torch.randint(0, 256, (4, 1025), generator=generator)
        for i in range(6):
            start = time.perf_counter()
            _, loss, _ = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:  # the first step warms up
                times.append(time.perf_counter() - start)
        return 4 * 1024 / statistics.median(times)
    model.eval()
    prompt = torch.randint(0, 256, (1, 16), generator=generator)
    model.generate(prompt, 4, temperature=0, use_cache=True)
    for _ in range(5):
        start = time.perf_counter()
        model.generate(prompt, 128, temperature=0, use_cache=True)
        times.append(time.perf_counter() - start)
    return 128 / statistics.median(times)


def run_case(tree: Path, variant: str, kind: str) -> float:
    command = [sys.executable, __file__, "--worker", variant, kind]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} {kind} in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True, capture_output=True
    )
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=False, help="the commit to compare against (git rev)")
    parser.add_argument("--new", default=None, help="the new commit (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tokens_per_s": round(measure(*args.worker), 1)}))
        return 0
    if not args.old:
        parser.error("--old REV is required (the commit to compare the working tree against)")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": checkout(args.old, Path(tmp) / "old")}
        trees["new"] = checkout(args.new, Path(tmp) / "new") if args.new else ROOT
        try:
            runs: dict[tuple[str, str, str], list[float]] = {}
            for _ in range(args.rounds):
                for kind in KINDS:
                    for variant in VARIANTS:
                        for name, tree in trees.items():
                            runs.setdefault((kind, variant, name), []).append(run_case(tree, variant, kind))
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    rows = []
    print(f"{'kind':<9}{'variant':<9}{'old tok/s':>11}{'new tok/s':>11}{'new/old':>9}   runs (old | new)")
    for kind in KINDS:
        for variant in VARIANTS:
            old, new = runs[(kind, variant, "old")], runs[(kind, variant, "new")]
            ratio = statistics.median(new) / statistics.median(old)
            rows.append({"kind": kind, "variant": variant, "old": old, "new": new, "ratio": round(ratio, 3)})
            print(
                f"{kind:<9}{variant:<9}{statistics.median(old):>11,.0f}{statistics.median(new):>11,.0f}{ratio:>9.3f}"
                f"   {' '.join(f'{x:,.0f}' for x in old)} | {' '.join(f'{x:,.0f}' for x in new)}"
            )
    print(json.dumps({"benchmark": "bench_commits", "old": args.old, "new": args.new or "working tree", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
