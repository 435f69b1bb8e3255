"""memory-check's fourth measurement: the trained model under changes to its memory's update rule.

Each row evaluates the same held-out examples with one change (titans/memory/ablation.py) and reports the task
metric and the inner loss l(M_{t-1}; k_t, v_t) (Eq. 12) averaged over every held-out token each memory layer wrote
from. The rows test two observations about test-time training with key-value binding (ICML 2026, "Test-Time
Training with KV Binding Is Secretly Linear Attention"): that a larger inner step lowers the inner loss while the
task gets worse (theta x 2), and that gradient ascent works about as well as descent (theta x -1).

    as trained        the checkpoint as it is (theta x 1)
    frozen at M_0     no write at all: the memory is read at its learned initial weights
    theta x 0         no surprise writes; forgetting alone still decays M (Eq. 13)
    theta x 0.5, x 2  the inner step halved / doubled (Eq. 14)
    ascent            theta x -1: each write *raises* the inner loss
    momentum off      eta = 0 (Eq. 14 without S_{t-1})
    forgetting off    alpha = 0 (Eq. 13 keeps all of M_{t-1})
    reset mid-seq     M and S back to M_0 and 0 halfway through the tokens the memory sees
    last layer only   only the memory MLP's last layer is written (memories of depth >= 2)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from titans.evaluate import evaluate
from titans.memory import NeuralMemory
from titans.memory.ablation import MemoryAblation
from titans.tasks.base import Batch, Task

# name -> the ablation for a memory layer that sees this many tokens per sequence (None: not applicable to it).
# "frozen at M_0" as gates: no step and no decay leave M at M_0 (S stays 0), the same reads as the layer's read-only
# switch `update_memory` that memory-check's third measurement uses (tested equal)
Factory = Callable[[NeuralMemory, int], MemoryAblation | None]
ABLATIONS: dict[str, Factory] = {
    "as trained": lambda layer, length: MemoryAblation(),
    "frozen at M_0": lambda layer, length: MemoryAblation(theta_scale=0.0, forgetting=False),
    "theta x 0": lambda layer, length: MemoryAblation(theta_scale=0.0),
    "theta x 0.5": lambda layer, length: MemoryAblation(theta_scale=0.5),
    "theta x 2": lambda layer, length: MemoryAblation(theta_scale=2.0),
    "ascent (theta x -1)": lambda layer, length: MemoryAblation(theta_scale=-1.0),
    "momentum off": lambda layer, length: MemoryAblation(momentum=False) if layer.momentum else None,
    "forgetting off": lambda layer, length: MemoryAblation(forgetting=False) if layer.forgetting else None,
    "reset mid-sequence": lambda layer, length: MemoryAblation(reset_at=max(length // 2, 1)),
    "last layer only": lambda layer, length: (
        MemoryAblation(layers=(layer.network.depth - 1,)) if layer.network.depth >= 2 else None
    ),
}


def collect_stats(layers: list[NeuralMemory], model: torch.nn.Module, idx: torch.Tensor) -> list[dict[str, Tensor]]:
    """Run idx [B, T] once; per memory layer, surprise and update norm [B, H, T'] over every token it processed."""
    for layer in layers:
        layer.stats_sink = []
    try:
        with torch.no_grad():
            model(idx)
        # MAC calls its memory once per segment: join the pieces along time
        return [
            {
                key: torch.cat([s[key] for s in layer.stats_sink if key in s], dim=-1)
                for key in ("surprise", "update_norm")
            }
            for layer in layers
        ]
    finally:
        for layer in layers:
            layer.stats_sink = None


def run_ablations(
    model: torch.nn.Module, layers: list[NeuralMemory], task: Task, test_set: Batch, batch_size: int, probe: int = 32
) -> dict[str, dict[str, Any]]:
    """Every applicable row: {"metric", "test_loss", "inner_loss" (mean over layers), "inner_loss_per_layer"}.

    The metric and test loss come from `evaluate` on all of `test_set`; the inner loss from its first `probe`
    examples. Every layer gets the same change (a layer without momentum ignores "momentum off", and so on)."""
    # tokens of one sequence the memory sees (MAL/MAG: the persistent prefix too), for the mid-sequence reset
    length = collect_stats(layers[:1], model, test_set.inputs[:1])[0]["surprise"].shape[-1]
    results: dict[str, dict[str, Any]] = {}
    for name, factory in ABLATIONS.items():
        changes = [factory(layer, length) for layer in layers]
        if all(change is None for change in changes):  # e.g. momentum off for memories without momentum
            continue
        for layer, change in zip(layers, changes, strict=True):
            layer.ablation = change
        try:
            metrics = evaluate(model, task, test_set, batch_size)
            stats = collect_stats(layers, model, test_set.inputs[:probe])
        finally:
            for layer in layers:
                layer.ablation = None
        per_layer = [s["surprise"].mean().item() for s in stats]
        results[name] = {
            "metric": metrics[task.metric],
            "test_loss": metrics["test_loss"],
            "inner_loss": sum(per_layer) / len(per_layer),
            "inner_loss_per_layer": per_layer,
        }
    return results


def critique_verdict(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Whether the critique's two observations hold on this checkpoint, judged on the test loss (lower is better for
    every task, so the verdict does not depend on the metric's direction):

    larger_step_lowers_inner_loss_but_hurts_task: theta x 2 gives a lower held-out inner loss than as trained and a
        higher test loss.
    ascent_about_as_good_as_descent: ascent keeps at least 90 % of the test-loss improvement that the trained
        (descent) writes make over the memory frozen at M_0.
    """
    trained, doubled = results["as trained"], results["theta x 2"]
    ascent, frozen = results["ascent (theta x -1)"], results["frozen at M_0"]
    gain = frozen["test_loss"] - trained["test_loss"]
    return {
        "larger_step_lowers_inner_loss_but_hurts_task": bool(
            doubled["inner_loss"] < trained["inner_loss"] and doubled["test_loss"] > trained["test_loss"]
        ),
        # a NaN test loss (ascent diverged) compares false: ascent did not work
        "ascent_about_as_good_as_descent": bool(frozen["test_loss"] - ascent["test_loss"] >= 0.9 * gain),
    }


def print_table(results: dict[str, dict[str, Any]], metric: str, chance: float) -> None:
    print(f"  {'update rule':22s} {metric:>16s} {'test loss':>10s} {'inner loss':>11s}   (chance {chance:.4f})")
    for name, row in results.items():
        print(f"  {name:22s} {row['metric']:16.4f} {row['test_loss']:10.4f} {row['inner_loss']:11.4g}")


def plot_ablations(results: dict[str, dict[str, Any]], metric: str, chance: float, path: Path, title: str) -> Path:
    """Two bar charts side by side: the task metric and the held-out inner loss under each update rule."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    names = list(results)
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    left.barh(names, [results[n]["metric"] for n in names], color="tab:blue")
    left.axvline(chance, color="grey", linestyle=":", label=f"chance {chance:.3g}")
    left.set_xlabel(metric)
    left.legend(fontsize=8, loc="lower right")
    left.invert_yaxis()
    right.barh(names, [results[n]["inner_loss"] for n in names], color="tab:orange")
    right.set_xlabel("held-out inner loss ||M(k) - v||^2, mean over layers")
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(NullFormatter())  # the log axis's minor labels overlap on a short span
    right.invert_yaxis()
    right.set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
