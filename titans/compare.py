"""`titans compare`: every variant trained on one config and budget, side by side, in one table and one plot.

Variants train one after another in this process (`--jobs 1`), or as `titans train` child processes, `--jobs` at a
time, each writing its own log; a signal to the parent reaches every child, and each child saves a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from titans.config import ConfigError, load_config
from titans.plots import plot_comparison
from titans.progress import HEARTBEAT_S
from titans.run import read_metrics
from titans.tasks import make_task
from titans.train import TrainingDivergedError, train


class _ChildRuns:
    """`titans train` child processes of a parallel compare; a signal to the parent is passed on to every child.

    A child stopped by SIGINT/SIGTERM saves a checkpoint and reports `interrupted` (as `titans train` does), and no
    further child starts, so stopping a comparison never leaves orphaned training processes behind.
    """

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def forward_signal(self, signum: int, frame: Any) -> None:
        self.stopped.set()
        with self.lock:
            for proc in self.running:
                proc.send_signal(signum)

    def train(self, config: str | None, overrides: list[str], log_path: Path) -> dict[str, Any]:
        """Train in a child process whose output goes to log_path; its JSON result, or {"error": ...}."""
        command = [sys.executable, "-m", "titans", "train", *(["--config", config] if config else []), *overrides]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            with self.lock:
                if self.stopped.is_set():
                    return {"error": "not started: the comparison was interrupted"}
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                self.running.add(proc)
            code = proc.wait()
            with self.lock:
                self.running.discard(proc)
        lines = log_path.read_text().strip().splitlines()
        if code == 0 and lines:
            try:
                return json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
        return {"error": f"exit code {code}: {lines[-1] if lines else 'no output'} (full log: {log_path})"}


def _train_children(
    children: _ChildRuns,
    args: argparse.Namespace,
    per_variant: dict[str, list[str]],
    extra: list[str],
    logs: dict[str, Path],
    threads: int,
) -> dict[str, dict[str, Any]]:
    """Run every variant's training in a child process, `args.jobs` at a time; results by variant.

    While they run, a line every HEARTBEAT_S seconds says how far each running variant got (from its metrics.jsonl).
    """
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(children.train, args.config, [*o, *extra], logs[v]): v for v, o in per_variant.items()}
        print(f"training {len(futures)} variants, {args.jobs} at a time, {threads} thread(s) each", flush=True)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
            for future in done:
                variant = futures[future]
                results[variant] = {"variant": variant, **future.result()}
                outcome = results[variant].get("error") or f"{results[variant].get('wall_s', 0):.0f} s"
                print(f"=== {variant} done ({outcome}); log: {logs[variant]}", flush=True)
            if not done:
                running = [futures[f] for f in pending if f.running()]
                print("compare: " + ", ".join(f"{v} at step {_last_step(logs[v])}" for v in running), flush=True)
    return results


def _last_step(log_path: Path) -> int:
    # A child's run directory sits beside its log: <out_dir>/<name>-<variant>/ and <out_dir>/<name>-<variant>.log.
    records = read_metrics(log_path.with_suffix("") / "metrics.jsonl")
    return max((r["step"] for r in records if r["kind"] == "train"), default=0)


def compare(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """`titans compare`: train every variant in args.variants on one config and budget, print the table and write
    the plot; returns (the JSON summary, the exit code: 1 if any variant failed)."""
    base = load_config(args.config, args.overrides)
    name = base.training.run_name or f"compare-{base.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    by_variant: dict[str, dict[str, Any]] = {}
    # Same file, overrides, seed and budget for every variant; only the variant and the run directory differ.
    per_variant = {v: [*args.overrides, f"model.variant={v}", f"training.run_name={name}-{v}"] for v in args.variants}
    for overrides in per_variant.values():
        load_config(args.config, overrides)  # every variant's config is valid before anything trains
    if args.jobs == 1:
        for variant, overrides in per_variant.items():
            print(f"=== {variant} ===", flush=True)
            try:
                by_variant[variant] = train(load_config(args.config, overrides))
            except (TrainingDivergedError, ValueError) as error:
                # One variant failing (diverged) still leaves the others' comparison worth reporting.
                print(f"{variant} failed: {error}", file=sys.stderr)
                by_variant[variant] = {"variant": variant, "error": str(error)}
                continue
            if by_variant[variant].get("interrupted"):
                # SIGINT/SIGTERM stopped this variant (checkpoint saved): stop the comparison, not just one run
                print(f"{variant} was interrupted; not training the remaining variants", file=sys.stderr)
                break
    else:
        # One child process per variant, `jobs` at a time, the CPU threads split between them (unless set).
        threads = base.training.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        # No bar in a log file anyway; the children's heartbeat lines go to their logs.
        extra = [f"training.threads={threads}"]
        logs = {v: Path(base.training.out_dir) / f"{name}-{v}.log" for v in per_variant}
        children = _ChildRuns()
        previous = {sig: signal.signal(sig, children.forward_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            by_variant.update(_train_children(children, args, per_variant, extra, logs, threads))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    results = [by_variant[v] for v in args.variants if v in by_variant]  # the order asked for
    histories = {r["variant"]: read_metrics(Path(r["run_dir"]) / "metrics.jsonl") for r in results if "error" not in r}

    task = make_task(base.data)
    metric = task.metric
    print(f"\n{'variant':<10}{metric:>18}{'test_loss':>12}{'params':>10}{'steps':>8}{'wall_s':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<10}  failed: {r['error'][:80]}")
        else:
            print(
                f"{r['variant']:<10}{r.get(metric, float('nan')):>18.4f}{r.get('test_loss', float('nan')):>12.4f}"
                f"{r['params']:>10,}{r['steps']:>8}{r['wall_s']:>9.1f}"
            )
    plot = None
    if histories:
        title = f"{task.name}: {', '.join(histories)} ({name})"
        plot = str(plot_comparison(histories, Path(base.training.out_dir) / f"{name}.png", metric, task.chance, title))
        print(f"plot: {plot}")
        if all(sum(r["kind"] == "eval" for r in records) <= 1 for records in histories.values()):
            print(
                "titans compare: each variant was evaluated once, so the plot shows single points; evaluate more "
                "often (training.eval_every=N below the step budget) to see learning curves",
                file=sys.stderr,
            )
    m = base.model
    print(
        f"chance {task.chance:.4f}; attention window {m.window} (baseline: {m.baseline_attention} attention), "
        f"MAC segment {m.segment_len}"
    )
    attention = {"window": m.window, "segment_len": m.segment_len, "baseline_attention": m.baseline_attention}
    summary = {"task": task.name, "metric": metric, "chance": task.chance, **attention, "plot": plot}
    return {**summary, "results": results}, 1 if any("error" in r for r in results) else 0
