"""scripts/mqar_diagnosis.py end to end on a tiny budget: a row trains, its run is evaluated at longer lengths with
`titans long-eval`, the lengths land in the JSON line and in a PNG, and a plot without lengths is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mqar_diagnosis  # noqa: E402


def test_rows_are_evaluated_at_longer_lengths_and_plotted(tmp_path, capsys) -> None:
    png = tmp_path / "recall.png"
    args = ["--steps", "2", "--rows", "baseline-swa", "--seeds", "0", "--jobs", "1", "--out", str(tmp_path)]
    assert mqar_diagnosis.main([*args, "--lengths", "64,128", "--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert result["row"] == "baseline-swa" and sorted(result["accuracy"]) == ["1", "2"]
    assert [r["length"] for r in result["lengths"]] == [64, 128]
    assert all(0.0 <= r["mqar_accuracy"] <= 1.0 and r["samples"] == 256 for r in result["lengths"])
    assert png.stat().st_size > 0
    assert (tmp_path / "vocab256-steps2" / "baseline-swa-seed0" / "metrics.jsonl").exists()


def test_another_learning_rate_and_layout_train_with_them_in_their_own_folder(tmp_path, capsys) -> None:
    args = ["--steps", "1", "--rows", "mac-defaults", "--seeds", "0", "--out", str(tmp_path), "--lr", "5e-4"]
    assert mqar_diagnosis.main([*args, "--seq-len", "32", "--pairs", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["seq_len"], summary["pairs"], summary["lr"]) == (32, 2, 5e-4)
    assert "accuracy" in summary["results"][0]
    config = (tmp_path / "vocab256-T32-pairs2-steps1-lr0.0005" / "mac-defaults-seed0" / "config.yaml").read_text()
    assert "seq_len: 32" in config and "mqar_num_kv_pairs: 2" in config and "learning_rate: 0.0005" in config


def test_a_plot_needs_lengths(tmp_path) -> None:
    with pytest.raises(SystemExit):
        mqar_diagnosis.main(["--steps", "2", "--rows", "delta", "--out", str(tmp_path), "--plot", "x.png"])
