"""scripts/niah_copy_probe.py: the spans it scores are the keys and the answer, and a run is probed end to end."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from titans.config import load_config
from titans.tasks.niah import NEEDLE, SNIAH
from titans.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import niah_copy_probe  # noqa: E402


def _batch(n: int = 4, seq_len: int = 450):
    return SNIAH(seq_len=seq_len, train_on="text").sample(n, torch.Generator().manual_seed(5))


def test_key_spans_are_the_needles_and_the_questions_key() -> None:
    batch = _batch()
    for row in range(4):
        text = bytes(batch.inputs[row].tolist())
        needle_start, needle_end = niah_copy_probe.key_span(text, niah_copy_probe.NEEDLE_KEY_PREFIX)
        question_start, question_end = niah_copy_probe.key_span(text, niah_copy_probe.QUESTION_KEY_PREFIX)
        key = text[needle_start:needle_end].decode()
        assert text[question_start:question_end].decode() == key and needle_end < question_start
        assert NEEDLE.format(key=key, value="")[:-1].encode() in text


def test_a_model_that_copies_only_the_question_key_scores_only_there() -> None:
    batch = _batch()
    uniform = torch.zeros(4, batch.inputs.shape[1], 256)
    losses = niah_copy_probe.copy_losses(uniform, batch.inputs, batch.targets)
    assert losses["needle_key"] == losses["question_key"] == round(math.log(256), 4)
    # certain of the true next byte inside the question's key only (its bytes are predicted one position earlier)
    for row in range(4):
        start, end = niah_copy_probe.key_span(bytes(batch.inputs[row].tolist()), niah_copy_probe.QUESTION_KEY_PREFIX)
        uniform[row, start : end - 1, :] = -1e4
        uniform[row, torch.arange(start, end - 1), batch.targets[row, start : end - 1]] = 0.0
    losses = niah_copy_probe.copy_losses(uniform, batch.inputs, batch.targets)
    assert losses["question_key"] == 0.0 and losses["needle_key"] == round(math.log(256), 4)
    assert losses["answer_digits"] == [round(math.log(256), 3)] * 7


def test_a_run_is_probed(tmp_path, capsys) -> None:
    overrides = [
        "model.variant=baseline", "model.d_model=16", "model.n_heads=2", "model.n_layers=1", "data.dataset=niah",
        "data.seq_len=400", "training.batch_size=2", "training.max_steps=1", "training.eval_every=0",
        "training.threads=1", "training.progress=false", f"training.out_dir={tmp_path}", "training.run_name=probe",
    ]  # fmt: skip
    train(load_config(None, overrides))
    assert niah_copy_probe.main([str(tmp_path / "probe"), "--samples", "3", "--length", "420"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert result["length"] == 420 and len(result["answer_digits"]) == 7
    assert all(0 < x < 10 for x in [result["needle_key"], result["question_key"], *result["answer_digits"]])
