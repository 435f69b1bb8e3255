"""A length curriculum (data.curriculum_lengths): fresh rows drawn at each shorter length for curriculum_steps
optimizer steps, then at data.seq_len; evaluation always at seq_len; bad curricula refused in the config."""

from __future__ import annotations

import pytest
import torch

from titans.config import ConfigError, load_config
from titans.data import TrainData, sample_rows
from titans.tasks import make_task

NIAH = ["data.dataset=niah", "data.seq_len=512", "data.fresh_samples=true", "data.num_samples=20"]


def config(*overrides: str):
    return load_config(None, [*NIAH, "training.batch_size=2", "data.curriculum_steps=2", *overrides])


def test_each_stage_draws_its_length_then_seq_len():
    cfg = config("data.curriculum_lengths=[380,448]")
    task = make_task(cfg.data)
    data = TrainData(cfg, task)
    lengths = [data.micro_batches(step)[0].batch.inputs.shape[1] for step in range(6)]
    assert lengths == [380, 380, 448, 448, 512, 512]
    # the rows are the stage task's fresh rows for that step: the same draw a run at that length would make
    stage = make_task(cfg.data.at_length(448))
    expected = sample_rows(stage, cfg.seed, 3, range(2))
    got = data.micro_batches(3)[0].batch
    assert torch.equal(got.inputs, expected.inputs) and torch.equal(got.targets, expected.targets)
    # only the answer bytes are scored at every length, and the test set stays at seq_len
    assert all(int((data.micro_batches(s)[0].batch.targets >= 0).sum(1).max()) == 7 for s in (0, 2, 4))
    assert data.test_set.inputs.shape[1] == 512


def test_without_a_curriculum_every_step_is_at_seq_len():
    cfg = config()
    data = TrainData(cfg, make_task(cfg.data))
    assert {data.micro_batches(step)[0].batch.inputs.shape[1] for step in (0, 5, 50)} == {512}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.curriculum_lengths=[448,400]"], "must rise and stay below data.seq_len"),
        (["data.curriculum_lengths=[600]"], "must rise and stay below data.seq_len"),
        (["data.curriculum_lengths=[300]"], "curriculum_lengths: at length 300: dataset niah"),
        (["data.curriculum_lengths=[400]", "data.fresh_samples=false"], "needs data.fresh_samples=true"),
        (["data.curriculum_lengths=[400]", "data.curriculum_steps=0"], "curriculum_steps must be >= 1"),
        (["data.curriculum_lengths=400"], "must be a list"),
        (["data.curriculum_lengths=[400, x]"], r"curriculum_lengths\[1\] must be an int"),
    ],
)
def test_bad_curricula_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)
