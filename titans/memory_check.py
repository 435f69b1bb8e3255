"""Does the memory really learn at test time? Four measurements on a trained checkpoint.

    titans memory-check runs/<run>/            # or a ckpt_*.pt file

1. Updates happen during evaluation: the norm of each token's write ||theta_t u_t|| (u_t the inner gradient, Eq. 14)
   and how far the fast weights move from M_0 over a held-out sequence (relative Frobenius distance).
2. Surprise falls on repeated structure: a random block of tokens is shown `repeats` times in a row; the inner loss
   l(M; k_t, v_t) (Eq. 12, the "surprise" the update follows) averaged per repetition should fall as the memory
   stores the block.
3. Test-time updates matter: the task metric with updates on vs. with every write switched off (theta = 0, so the
   memory is read at M_0 only). A memory that does the work shows a clear drop.
4. Ablations of the update rule (titans/memory_ablations.py): the metric and the held-out inner loss with the step
   theta scaled by 0, 0.5, 2 and -1 (gradient ascent), momentum off, forgetting off, the memory reset halfway, and
   only the last memory layer written.
Prints the numbers, writes `memory_check.png` (surprise against position) and `memory_ablations.png` next to the
checkpoint, and returns a dict (the CLI prints it as one JSON line).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from titans.data import make_datasets
from titans.evaluate import evaluate
from titans.memory import NeuralMemory
from titans.memory_ablations import (
    ABLATIONS,
    collect_stats,
    critique_verdict,
    plot_ablations,
    print_table,
    run_ablations,
)
from titans.models import TitansLM
from titans.run import load_trained


def memory_modules(model: TitansLM) -> list[NeuralMemory]:
    return [m for m in model.modules() if isinstance(m, NeuralMemory)]


def _set_updates(model: TitansLM, enabled: bool) -> None:
    for layer in memory_modules(model):
        layer.update_memory = enabled


def memory_check(
    checkpoint: str, repeats: int = 4, block: int | None = None, samples: int = 256, ablations: bool = True
) -> dict[str, Any]:
    """The measurements above for the model in `checkpoint` (file or run directory); ablations=False skips 4."""
    start = time.time()
    _say(f"loading {checkpoint}")
    cfg, task, model, path = load_trained(checkpoint, [])
    layers = memory_modules(model)
    if not layers:
        raise ValueError(
            f"{path} holds a {cfg.model.variant} model, which has no neural memory; memory-check needs LMM, MAC, "
            "MAG or MAL"
        )
    device = next(model.parameters()).device
    _, test_set = make_datasets(cfg, task)
    test_set = test_set[:samples].to(device)

    # 1. writes during evaluation
    stages = 4 if ablations else 3
    _say(f"1/{stages}: the memory's writes on 8 test examples")
    stats = collect_stats(layers, model, test_set.inputs[:8])
    update_norm = [s["update_norm"].mean().item() for s in stats]

    # 2. surprise per repetition of a random block
    block = block or max(8, min(64, task.seq_len // repeats))
    _say(f"2/{stages}: surprise over a random {block}-token block repeated {repeats} times")
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, task.vocab_size, (4, block), generator=gen).to(device)
    stats = collect_stats(layers, model, pattern.repeat(1, repeats))
    per_repeat = []
    curves = []
    for s in stats:
        surprise = s["surprise"][..., -block * repeats :].mean(dim=(0, 1))  # skip persistent-prefix tokens
        curves.append(surprise)
        per_repeat.append([round(surprise[r * block : (r + 1) * block].mean().item(), 4) for r in range(repeats)])

    # 3. metric with and without test-time updates
    _say(f"3/{stages}: {task.metric} on {len(test_set)} test examples with test-time updates, then without")
    with_updates = evaluate(model, task, test_set, cfg.training.batch_size)
    _set_updates(model, False)
    try:
        without_updates = evaluate(model, task, test_set, cfg.training.batch_size)
    finally:
        _set_updates(model, True)

    table = {}
    if ablations:
        _say(f"4/{stages}: {task.metric} and the inner loss under {len(ABLATIONS) - 1} changes to the update rule")
        table = run_ablations(model, layers, task, test_set, cfg.training.batch_size)

    metric = task.metric
    rule = _update_rule(layers[0])
    if cfg.model.variant == "MAC":  # what MAC's memory writes (Eq. 24): the residual stream after attention, or y
        rule["mac_memory_input"] = cfg.model.mac_memory_input
    print(f"memory-check of {path} ({cfg.model.variant}, {task.name}, {len(layers)} memory layers)")
    print(f"  update rule: {_describe(rule)}")
    print(f"  mean write norm ||theta u|| per token, per layer: {', '.join(f'{u:.4g}' for u in update_norm)}")
    for i, reps in enumerate(per_repeat):
        print(f"  layer {i}: mean surprise per repetition of a {block}-token block: {reps}")
    print(
        f"  {metric}: {with_updates[metric]:.4f} with test-time updates, {without_updates[metric]:.4f} without "
        f"(chance {task.chance:.4f})"
    )
    title = f"memory-check: {cfg.model.variant} on {task.name}, {Path(path).parent.name}"
    segment = cfg.model.segment_len if cfg.model.variant == "MAC" else None
    plot = _plot(curves, block, repeats, Path(path).parent / "memory_check.png", title, segment)
    falls = [reps[-1] < reps[0] for reps in per_repeat]
    ablation_plot, verdict = None, None
    if table:
        probe = min(32, len(test_set))
        print(f"  the update rule changed at test time ({len(test_set)} examples; inner loss on the first {probe}):")
        print_table(table, metric, task.chance)
        verdict = critique_verdict(table)
        print(
            "  the KV-binding critique (judged on test loss): a larger step lowers the inner loss but hurts the task: "
            f"{_yes(verdict['larger_step_lowers_inner_loss_but_hurts_task'])}; gradient ascent works about as well "
            f"as descent: {_yes(verdict['ascent_about_as_good_as_descent'])}"
        )
        ablation_plot = plot_ablations(
            table, metric, task.chance, Path(path).parent / "memory_ablations.png", f"{title}: update-rule ablations"
        )
    return {
        "variant": cfg.model.variant,
        "task": task.name,
        "checkpoint": str(path),
        "update_rule": rule,
        "update_norm_per_layer": update_norm,
        "surprise_per_repeat": per_repeat,
        "surprise_falls": all(falls),
        f"{metric}_with_updates": with_updates[metric],
        f"{metric}_without_updates": without_updates[metric],
        "chance": task.chance,
        "plot": str(plot),
        "ablations": table,
        "critique": verdict,
        "ablation_plot": str(ablation_plot) if ablation_plot else None,
        "wall_s": round(time.time() - start, 2),
    }


def _update_rule(memory: NeuralMemory) -> dict[str, Any]:
    """How the checkpoint's memory writes (the same in every layer of a model): the step it started from, the chunk,
    where the inner gradients are taken and whether they carry momentum (`memory.theta_init`,
    `memory.exact_last_layer` and `memory.momentum`, resolved per variant when the config left them null)."""
    return {
        "theta_init": memory.theta_init,
        "chunk_size": memory.chunk_size,
        "exact_last_layer": memory.exact_last_layer,
        "momentum": memory.momentum,
    }


def _describe(rule: dict[str, Any]) -> str:
    where = (
        "the last layer's inner gradient at the current weights (exact_last_layer), the others' at the chunk start"
        if rule["exact_last_layer"]
        else "every inner gradient at the chunk start (Eq. 16)"
    )
    surprise = "with momentum (Eq. 14)" if rule["momentum"] else "without momentum (each token's gradient applied once)"
    text = f"theta_t from {rule['theta_init']:g} at initialisation, chunks of {rule['chunk_size']}, {where}, {surprise}"
    if "mac_memory_input" in rule:
        written = {"residual": "the residual stream after attention (h + y)", "attention": "the attention output y"}
        text += f"; MAC's memory writes {written[rule['mac_memory_input']]}"
    return text


def _yes(holds: bool) -> str:
    return "holds" if holds else "does not hold"


def _say(text: str) -> None:
    # Progress of a command that takes a minute: one line per stage, so a redirected run is never silent.
    print(f"memory-check: {text}", flush=True)


def _plot(
    curves: list[torch.Tensor], block: int, repeats: int, path: Path, title: str, segment_len: int | None = None
) -> Path:
    """Surprise per position of the repeated block. Dotted lines mark the block's repetitions; for MAC, dashed lines
    mark its segment boundaries, where the surprise can also drop: each segment retrieves from the memory committed
    at the end of the previous one (Eq. 21), so what the memory learned reaches the writes there."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for i, curve in enumerate(curves):
        ax.plot(curve.cpu().numpy(), label=f"memory layer {i}", linewidth=1)
    for r in range(1, repeats):
        ax.axvline(r * block, color="grey", linestyle=":", linewidth=0.8, label="block repeats" if r == 1 else None)
    if segment_len:
        for i, edge in enumerate(range(segment_len, block * repeats, segment_len)):
            label = "MAC segment boundary (retrieval reads the memory committed there)" if i == 0 else None
            ax.axvline(edge, color="tab:red", linestyle="--", linewidth=0.6, alpha=0.6, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"position (a random {block}-token block, repeated {repeats} times)")
    ax.set_ylabel("surprise  ||M(k_t) - v_t||^2")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
