"""scripts/gradient_growth.py: the training gradient's norm against the sequence length, fresh or trained models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from titans.config import load_config
from titans.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gradient_growth  # noqa: E402
import mqar_diagnosis  # noqa: E402

SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.segment_len=32", "model.window=32"]


def _rows(capsys, argv: list[str]) -> list[dict]:
    assert gradient_growth.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]


def test_growth_separates_a_stable_write_from_an_exploding_one(capsys) -> None:
    """The positive control: MAC's chunk-start update with momentum (Eq. 16 + Eq. 14) at theta 0.5 backpropagates an
    exponentially growing gradient over 512 tokens, at theta 0.05 a shrinking one; the same theta with the last
    layer's gradient at the current weights (the exact last layer), with or without momentum, is stable. The gates the
    memories used are reported: theta near its start value."""
    lengths = ["--lengths", "32,512"]
    eq16 = "model.memory.exact_last_layer=false"
    rows = _rows(capsys, ["--variants", "MAC", "--theta", "0.05,0.5", *lengths, *SMALL, eq16])
    stable, exploding = rows
    assert stable["growth"] < 1 and exploding["growth"] > 100
    assert stable["theta_mean"] == pytest.approx(0.05, rel=0.05) and exploding["theta_mean"] == pytest.approx(
        0.5, rel=0.05
    )
    assert 0 < stable["eta_mean"] < stable["eta_max"] < 1
    assert 1 <= stable["key_gram_mean"] <= stable["key_gram_p90"] <= 16  # unit keys, chunks of 16
    delta_form = ["model.memory.exact_last_layer=true", "model.memory.momentum=false"]
    (row,) = _rows(capsys, ["--variants", "MAC", "--theta", "0.5", *lengths, *SMALL, *delta_form])
    assert row["growth"] < 1 and "eta_mean" not in row
    exact = "model.memory.exact_last_layer=true"
    (with_momentum,) = _rows(capsys, ["--variants", "MAC", "--theta", "0.5", *lengths, *SMALL, exact])
    assert with_momentum["growth"] < 1 and with_momentum["eta_mean"] > 0


def test_a_trained_run_is_measured_on_its_own_task(tmp_path, capsys) -> None:
    overrides = mqar_diagnosis.overrides("mac-residual", vocab=256, steps=1, seed=0, out=tmp_path)
    train(load_config(None, [*overrides, "training.eval_every=0"]))
    (row,) = _rows(capsys, ["--run", str(tmp_path / "mac-residual-seed0"), "--lengths", "64,128", "--batch", "2"])
    assert list(row["grad_norm"]) == ["64", "128"] and all(n > 0 for n in row["grad_norm"].values())
    assert 0 < row["theta_mean"] <= row["theta_max"] < 1
    # the trained weights under the delta rule's form of the last layer: same parameters, another write rule
    args = ["--run", str(tmp_path / "mac-residual-seed0"), "--lengths", "64,128", "--batch", "2"]
    args.append("model.memory.exact_last_layer=true")  # the same examples as above: only the write rule differs
    (exact,) = _rows(capsys, args)
    assert exact["grad_norm"] != row["grad_norm"] and all(n > 0 for n in exact["grad_norm"].values())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        gradient_growth.parse_args(["--lengths", "64"])
    with pytest.raises(SystemExit):
        gradient_growth.parse_args(["--run", "somewhere", "--theta", "0.1"])
    with pytest.raises(SystemExit):
        gradient_growth.parse_args(["training.batch_size=4"])
    with pytest.raises(SystemExit, match="theta_init"):  # the config's own check, one line instead of a traceback
        gradient_growth.main(["--variants", "MAC", "--theta", "2.0", "--lengths", "8,16"])
