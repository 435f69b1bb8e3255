"""Evaluation: test loss and the task's metrics on a fixed batch; shared by train.py and `titans eval`.

Evaluation is a plain forward pass, so the neural memory still learns at test time exactly as the paper intends
(§3.1: the inner update is part of the forward computation): every test sequence starts from the learned initial
memory M_0 and writes into it token by token. What evaluation never does is change the outer (meta-learned)
parameters — there is no backward pass and no optimizer step.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from titans.progress import Progress
from titans.tasks.base import IGNORE_INDEX, Batch, Task


def evaluate(
    model: nn.Module,
    task: Task,
    batch: Batch,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy over scored targets, plus `task.score` metrics, on `batch`.

    model: `model(idx) -> (logits [B, T, V], loss, state)`; its train/eval mode is restored afterwards.
    batch: inputs / targets [N, T]; evaluated in slices of `batch_size` examples, each starting from a fresh
        memory state (state=None), so the result does not depend on `batch_size`.
    autocast_dtype: run the forward under autocast in this dtype (e.g. torch.bfloat16), as training does.
    Returns {"test_loss": float, **task.score(logits, batch)}.
    """
    if batch_size < 1:
        raise ValueError(f"evaluate batch_size must be >= 1, got {batch_size}")
    if len(batch) == 0:
        raise ValueError("evaluate got an empty batch; set data.test_fraction or training.eval_samples above 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens, all_logits = 0.0, 0, []
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    # Quiet unless slow: a line every HEARTBEAT_S seconds once an evaluation has run that long (a loaded machine).
    progress = Progress(-(-len(batch) // batch_size), "batch", "evaluating", bar=False, announce_first=False)
    try:
        with torch.no_grad(), autocast, progress:
            for start in range(0, len(batch), batch_size):
                part = batch[start : start + batch_size].to(device)
                logits, _, _ = model(part.inputs)
                logits = logits.float()
                # Summed (not averaged) so slices of different sizes weigh by their scored-token count.
                total_loss += F.cross_entropy(
                    logits.flatten(0, 1), part.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                total_tokens += int((part.targets != IGNORE_INDEX).sum())
                # Scored once on the whole batch below so every task metric is exact whatever its averaging.
                all_logits.append(logits.cpu())
                progress.update()
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError(f"the evaluation batch has no scored targets (all targets are IGNORE_INDEX={IGNORE_INDEX})")
    metrics = {"test_loss": total_loss / total_tokens}
    metrics.update({name: float(value) for name, value in task.score(torch.cat(all_logits), batch).items()})
    return metrics
