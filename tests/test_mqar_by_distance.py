"""scripts/mqar_by_distance.py: the distance of every query back to its key, and the per-bin accuracy of a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from titans.config import load_config
from titans.tasks.mqar import mqar_layout
from titans.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mqar_by_distance  # noqa: E402
import mqar_diagnosis  # noqa: E402


def test_query_distances_count_back_to_the_key() -> None:
    # keys 1, 2 at positions 0, 2; gaps 3 and 0 put their queries at 4 + 6 = 10 and 4 + 0 = 4
    inputs, targets = mqar_layout(torch.tensor([[1, 2]]), torch.tensor([[8, 9]]), torch.tensor([[3, 0]]), 16)
    scored, distance = mqar_by_distance.query_distances(inputs, targets, num_pairs=2)
    assert scored[0].nonzero()[:, 0].tolist() == [4, 10]
    assert distance[0, 10].item() == 10 and distance[0, 4].item() == 2


def test_a_run_is_scored_per_distance_bin(tmp_path, capsys) -> None:
    overrides = mqar_diagnosis.overrides("baseline-swa", vocab=256, steps=1, seed=0, out=tmp_path)
    train(load_config(None, [*overrides, "training.eval_every=0"]))
    run = str(tmp_path / "baseline-swa-seed0")
    assert mqar_by_distance.main([run, "--length", "128", "--samples", "16", "--edges", "30,63"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert result["length"] == 128 and list(result["bins"]) == ["1-30", "31-63", "64+"]
    assert sum(b["n"] for b in result["bins"].values()) == 16 * 4  # every query of 16 examples of 4 pairs, once
    assert all(b["accuracy"] is None or 0 <= b["accuracy"] <= 100 for b in result["bins"].values())
