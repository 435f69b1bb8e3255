"""memory-check end to end on tiny checkpoints of every memory variant: writes, surprise, rule ablations."""

from __future__ import annotations

import math

import pytest

from titans.config import load_config
from titans.memory_ablations import ABLATIONS
from titans.memory_check import memory_check
from titans.train import train


@pytest.mark.parametrize("variant", ["LMM", "MAC", "MAG", "MAL"])
def test_memory_check_reports_updates_surprise_and_ablation(tmp_path, variant: str) -> None:
    cfg = load_config(
        None,
        [
            f"model.variant={variant}",
            "model.d_model=16",
            "model.n_heads=2",
            "model.segment_len=8",
            "model.window=8",
            "data.dataset=copy_task",
            "data.seq_len=24",
            "data.copy_length=4",
            "data.num_samples=64",
            "training.batch_size=8",
            "training.max_steps=2",
            "training.eval_every=0",
            "training.warmup_steps=1",
            "training.progress=false",
            f"training.out_dir={tmp_path}",
            "training.run_name=run",
        ],
    )
    train(cfg)
    result = memory_check(str(tmp_path / "run"), repeats=3, block=8, samples=16)
    # the rule the checkpoint writes with: the variant's defaults (LMM: theta 0.25 and the exact last layer; the
    # others: theta 0.05 and Eq. 16), read from the rebuilt model, not from the config's nulls
    strong = variant == "LMM"
    expected_rule = {
        "theta_init": 0.25 if strong else 0.05,
        "chunk_size": 16,
        "exact_last_layer": strong,
        "momentum": not strong,
    }
    if variant == "MAC":  # and what its memory writes: by default the residual stream after attention
        expected_rule["mac_memory_input"] = "residual"
    assert result["update_rule"] == expected_rule
    assert len(result["update_norm_per_layer"]) == 2
    assert all(u > 0 for u in result["update_norm_per_layer"])
    assert all(len(r) == 3 and all(math.isfinite(x) for x in r) for r in result["surprise_per_repeat"])
    assert 0.0 <= result["copy_accuracy_without_updates"] <= 1.0
    assert (tmp_path / "run" / "memory_check.png").stat().st_size > 0

    # the update-rule ablations: every row for a depth-2 memory with momentum and forgetting; an LMM has no momentum
    # to switch off
    table = result["ablations"]
    assert list(table) == [name for name in ABLATIONS if not (strong and name == "momentum off")]
    for name, row in table.items():
        assert 0.0 <= row["metric"] <= 1.0 and math.isfinite(row["test_loss"]), name
        assert len(row["inner_loss_per_layer"]) == 2 and all(v >= 0 for v in row["inner_loss_per_layer"]), name
    # the table's end points are the measurements above, taken another way
    assert table["as trained"]["metric"] == pytest.approx(result["copy_accuracy_with_updates"])
    assert table["frozen at M_0"]["metric"] == pytest.approx(result["copy_accuracy_without_updates"])
    # writing lowers the inner loss on held-out data below M_0's, ascent raises it
    assert (
        table["as trained"]["inner_loss"]
        < table["frozen at M_0"]["inner_loss"]
        < table["ascent (theta x -1)"]["inner_loss"]
    )
    assert (tmp_path / "run" / "memory_ablations.png").stat().st_size > 0
    assert set(result["critique"]) == {
        "larger_step_lowers_inner_loss_but_hurts_task",
        "ascent_about_as_good_as_descent",
    }


def test_memory_check_refuses_a_model_without_memory(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            "model.variant=baseline",
            "model.d_model=16",
            "model.n_heads=2",
            "data.seq_len=24",
            "data.copy_length=4",
            "data.num_samples=32",
            "training.batch_size=8",
            "training.max_steps=1",
            "training.warmup_steps=1",
            "training.progress=false",
            f"training.out_dir={tmp_path}",
            "training.run_name=base",
        ],
    )
    train(cfg)
    with pytest.raises(ValueError, match="no neural memory"):
        memory_check(str(tmp_path / "base"))
