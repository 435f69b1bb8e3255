"""Memory does work attention cannot: with the attention window (and MAC segment) shorter than the dependency
distance, the memory variants learn to recall what the same-window baseline cannot see (a unit-scale version of the
copy experiment in docs/results.md)."""

from __future__ import annotations

import pytest
import torch

from titans.config import load_config
from titans.models import build_model
from titans.tasks import make_task

# (variant, optimiser steps, accuracy it must beat); chance is 1/8. MAC learns slowest: its cross-segment read
# (Eq. 21) and its writes (of the attention output, Eq. 24) go through different projections that must align.
CASES = [("LMM", 150, 0.4), ("MAG", 150, 0.4), ("MAL", 150, 0.4), ("MAC", 300, 0.25)]


def copy_recall(variant: str, steps: int) -> tuple[float, float, int]:
    """Train on an 8-symbol copy task whose copies sit 20 tokens after their source, window 8; return
    (held-out copy accuracy, chance, dependency distance)."""
    cfg = load_config(
        None,
        [
            f"model.variant={variant}",
            "model.d_model=32",
            "model.n_heads=2",
            "model.window=8",
            "model.segment_len=8",
            "model.baseline_attention=sliding",
            "model.persistent_memory_size=2",
            "model.memory.chunk_size=8",
            "data.dataset=copy_task",
            "data.seq_len=24",
            "data.copy_length=4",
            "data.vocab_size=8",
        ],
    )
    task = make_task(cfg.data)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = task.sample(32, generator)
        _, loss, _ = model(batch.inputs, batch.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = task.sample(256, torch.Generator().manual_seed(999))
    with torch.no_grad():
        logits, _, _ = model(test.inputs)
    return task.score(logits, test)["copy_accuracy"], task.chance, task.dependency_distance


@pytest.mark.slow
@pytest.mark.parametrize("variant, steps, threshold", CASES, ids=[c[0] for c in CASES])
def test_memory_variants_recall_beyond_the_window(variant: str, steps: int, threshold: float) -> None:
    accuracy, chance, distance = copy_recall(variant, steps)
    assert distance > 2 * (8 - 1)  # beyond the 14 tokens that two stacked 8-token windows reach, not just one window
    assert accuracy > threshold, f"{variant}: copy accuracy {accuracy:.3f} (chance {chance:.3f})"


@pytest.mark.slow
def test_same_window_baseline_stays_at_chance() -> None:
    accuracy, chance, _ = copy_recall("baseline", 300)
    assert accuracy < 1.6 * chance, f"baseline: copy accuracy {accuracy:.3f} (chance {chance:.3f})"
