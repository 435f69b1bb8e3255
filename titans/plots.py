"""Loss and accuracy plots (PNG) from a run's metrics records, and the variant-comparison plot.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: no global backend switch and no GUI,
so plotting works on headless machines and importing this module changes no global state.

Records are the dicts `train.py` appends to `metrics.jsonl`:
    {"kind": "train", "step": 12, "loss": 1.93, ...}                      one per optimizer step
    {"kind": "eval", "step": 50, "train_loss": 1.8, "test_loss": 1.7, "<metric>": 0.4, ...}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def _series(records: Sequence[Mapping[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        if record.get("kind") == kind and record.get(key) is not None:
            steps.append(record["step"])
            values.append(record[key])
    return steps, values


def plot_run(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    metric: str,
    chance: float | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write `loss.png` (train loss per step, test loss per evaluation) and `<metric>.png` into `out_dir`.

    title: a heading on every figure (e.g. variant, task and run), so a copied PNG still says what it shows.

    Returns the paths written; a plot with no data (e.g. no evaluation yet) is skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    train_steps, train_losses = _series(records, "train", "loss")
    eval_steps, test_losses = _series(records, "eval", "test_loss")
    if train_steps or eval_steps:
        fig = Figure(figsize=(6, 4), layout="constrained")
        if title:
            fig.suptitle(title, fontsize=10)
        ax = fig.add_subplot()
        if train_steps:
            ax.plot(train_steps, train_losses, lw=0.8, alpha=0.7, label="train loss (per step)")
        if eval_steps:
            ax.plot(eval_steps, test_losses, "o-", label="test loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=100)
        written.append(path)

    metric_steps, metric_values = _series(records, "eval", metric)
    if metric_steps:
        fig = Figure(figsize=(6, 4), layout="constrained")
        if title:
            fig.suptitle(title, fontsize=10)
        ax = fig.add_subplot()
        ax.plot(metric_steps, metric_values, "o-", label=metric)
        if chance is not None:
            ax.axhline(chance, color="gray", ls="--", label=f"chance ({chance:.3g})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def plot_comparison(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    metric: str,
    chance: float | None = None,
    title: str | None = None,
) -> Path:
    """One PNG with two panels, test loss and `metric` against step, one line per variant in `histories`, under
    `title`."""
    if not histories:
        raise ValueError("plot_comparison needs at least one variant's records, got none")
    fig = Figure(figsize=(11, 4), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for variant, records in histories.items():
        loss_ax.plot(*_series(records, "eval", "test_loss"), "o-", ms=3, label=variant)
        metric_ax.plot(*_series(records, "eval", metric), "o-", ms=3, label=variant)
    if chance is not None:
        metric_ax.axhline(chance, color="gray", ls="--", label=f"chance ({chance:.3g})")
    loss_ax.set_ylabel("test loss (nats/token)")
    metric_ax.set_ylabel(metric)
    for ax in (loss_ax, metric_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
