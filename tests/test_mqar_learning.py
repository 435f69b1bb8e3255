"""The memory learns associative recall: on a small MQAR it leaves the value prior within a fixed step budget.

The protocol is scripts/mqar_diagnosis.py's (T 64, 4 key-value pairs, vocabulary 256, d_model 64, batch 32 of fresh
examples, AdamW 2e-3), shortened to 400 steps; "left the prior" means held-out accuracy above 5 % (chance 0.8 %;
on the prior, a model predicts the value distribution and stays near chance). Rows: the delta-rule control, the
per-token memory, and the LMM with its defaults (chunks of 16, the exact last layer, theta_init 0.25, no momentum, the
fused scan), the three that learned on every seed (docs/results.md, "MQAR diagnosis").

Leaving the prior is only the first step: a model that names one of the example's four context values at random
scores about 25 %. Recall, binding each key to its value, takes thousands of steps (docs/results.md, "Recall, not
only leaving the prior"), more than a test here can afford.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from titans.config import load_config
from titans.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import mqar_diagnosis  # noqa: E402

STEPS = 400


@pytest.mark.slow
@pytest.mark.parametrize("row", ["delta", "delta+depth2+clip+momentum+forgetting", "lmm-defaults"])
def test_the_memory_leaves_the_value_prior_on_mqar(tmp_path, row: str) -> None:
    overrides = mqar_diagnosis.overrides(row, vocab=256, steps=STEPS, seed=0, out=tmp_path)
    result = train(load_config(None, [*overrides, "training.eval_every=0"]))
    assert result["mqar_accuracy"] > 0.05, f"{row}: MQAR accuracy {result['mqar_accuracy']:.3f} after {STEPS} steps"
