"""Synthetic tasks: deterministic sampling, exact layouts and masks, promised dependency distances, sound scoring."""

from __future__ import annotations

import pytest
import torch

from titans.config import ConfigError, DataConfig, ModelConfig
from titans.tasks import IGNORE_INDEX, TASKS, Batch, CopyTask, NeedleTask, PatternTask, make_task

SMALL = {
    "copy": DataConfig(dataset="copy_task", seq_len=40, vocab_size=6, copy_length=7, copy_gap=9),
    "patterns": DataConfig(dataset="language_modeling", seq_len=40, vocab_size=6, period_min=5, period_max=12),
    "needle-position": DataConfig(dataset="needle_haystack", seq_len=40, vocab_size=6, needle_buckets=5),
    "needle-value": DataConfig(dataset="needle_haystack", seq_len=40, vocab_size=6, needle_query="value"),
    "copy-seed": DataConfig(),  # the seed's sizes: seq_len 96, vocab 10
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=list(SMALL), ids=list(SMALL))
def task(request):
    return make_task(SMALL[request.param])


# The seed's synthetic tasks; mqar, niah and text are registry-tested in test_long_eval.py.
SYNTHETIC = {"copy_task": CopyTask, "language_modeling": PatternTask, "needle_haystack": NeedleTask}


def test_registry_builds_each_named_task():
    assert set(SYNTHETIC) <= set(TASKS) and {"mqar", "niah", "text"} <= set(TASKS)
    for name, cls in SYNTHETIC.items():
        built = make_task(DataConfig(dataset=name))
        assert isinstance(built, cls) and built.name == name
        assert built.metric in built.score(built.oracle_logits(built.sample(2, _gen(0))), built.sample(2, _gen(0)))


def test_sampling_is_deterministic_given_the_generator(task):
    a, b, c = task.sample(8, _gen(1)), task.sample(8, _gen(1)), task.sample(8, _gen(2))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_ids_in_vocabulary_and_targets_line_up_with_inputs(task):
    batch = task.sample(64, _gen(3))
    assert batch.inputs.shape == batch.targets.shape == (64, task.seq_len)
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    scored = batch.targets != IGNORE_INDEX
    assert 0 <= batch.inputs.min() and batch.inputs.max() < task.vocab_size
    assert 0 <= batch.targets[scored].min() and batch.targets[scored].max() < task.vocab_size
    assert set(batch.targets[scored].unique().tolist()) <= set(task.answer_ids)
    # A scored target is the next input token (the last target has no next input to compare with).
    inner = scored[:, :-1]
    assert torch.equal(batch.targets[:, :-1][inner], batch.inputs[:, 1:][inner])
    assert task.chance == pytest.approx(1 / len(task.answer_ids))


def _source_offsets(task, batch: Batch) -> list[int]:
    """For each scored target, how far back (from the target's position t + 1) the token it repeats sits."""
    offsets = []
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        for t, y in enumerate(targets):
            if y == IGNORE_INDEX:
                continue
            if isinstance(task, CopyTask):
                source = t + 1 - task.dependency_distance  # must hold the very symbol
            elif isinstance(task, PatternTask):
                source = t + 1 - (inputs.index(task.sep) + 1)
            elif task.query == "value":
                source = inputs.index(task.needle) + 1
            else:
                source = inputs.index(task.needle)
            if not (isinstance(task, NeedleTask) and task.query == "position"):
                assert inputs[source] == y
            offsets.append(t + 1 - source)
    return offsets


def test_every_dependency_is_at_least_the_promised_distance(task):
    offsets = _source_offsets(task, task.sample(64, _gen(4)))
    assert min(offsets) >= task.dependency_distance
    if isinstance(task, CopyTask):
        assert set(offsets) == {task.copy_length + task.copy_gap + 1}
    if isinstance(task, NeedleTask):
        # Needles are spread over all allowed places: the nearest possible one does occur in 64 draws.
        offsets = _source_offsets(task, task.sample(2000, _gen(5)))
        assert min(offsets) == task.dependency_distance


@pytest.mark.parametrize("dataset", list(SYNTHETIC))
def test_default_distances_exceed_the_default_attention_window(dataset):
    model = ModelConfig()
    for seq_len in (96, 256):
        built = make_task(DataConfig(dataset=dataset, seq_len=seq_len))
        # The token at distance d is visible to an attention window of w positions only if d <= w.
        assert built.dependency_distance > max(model.window, model.segment_len)


def test_copy_layout_and_mask_exactly():
    task = make_task(SMALL["copy"])
    batch = task.sample(16, _gen(6))
    n, gap = 7, 9
    expected_mask = torch.zeros(task.seq_len, dtype=torch.bool)
    expected_mask[1 + n + gap : 1 + 2 * n + gap] = True  # inputs [SEP], x_1 .. x_{n-1} predict x_1 .. x_n
    assert torch.equal(batch.targets != IGNORE_INDEX, expected_mask.expand(16, -1))
    row = batch.inputs[0].tolist()
    content = row[1 : 1 + n]
    assert row[0] == task.bos and row[1 + n : 1 + n + gap] == [task.fill] * gap and row[1 + n + gap] == task.sep
    assert row[2 + n + gap : 2 + 2 * n + gap] == content == batch.targets[0, 1 + n + gap : 1 + 2 * n + gap].tolist()
    assert row[2 + 2 * n + gap :] == [task.pad] * (task.seq_len - 2 - 2 * n - gap)


def test_copy_defaults_come_from_seq_len():
    task = make_task(DataConfig(seq_len=96, vocab_size=10))
    assert (task.copy_length, task.copy_gap, task.dependency_distance, task.vocab_size) == (24, 47, 72, 14)
    assert make_task(DataConfig(seq_len=96, copy_length=16)).copy_gap == 63
    assert make_task(DataConfig(seq_len=96, copy_gap=11)).copy_length == 42


def test_pattern_mask_starts_after_the_first_separator():
    task = make_task(SMALL["patterns"])
    batch = task.sample(64, _gen(7))
    periods = (batch.inputs == task.sep).long().argmax(1)
    assert periods.min() >= 5 and periods.max() <= 12 and len(periods.unique()) > 4
    expected_mask = torch.arange(task.seq_len) >= periods[:, None]
    assert torch.equal(batch.targets != IGNORE_INDEX, expected_mask)
    for row, p in zip(batch.inputs.tolist(), periods.tolist(), strict=True):
        unit = row[: p + 1]
        assert unit[-1] == task.sep and task.sep not in unit[:-1]
        assert row == (unit * (task.seq_len // len(unit) + 1))[: task.seq_len]


def test_needle_mask_is_the_answer_only():
    for key in ("needle-position", "needle-value"):
        task = make_task(SMALL[key])
        batch = task.sample(64, _gen(8))
        expected_mask = torch.zeros(task.seq_len, dtype=torch.bool)
        expected_mask[-1] = True
        assert torch.equal(batch.targets != IGNORE_INDEX, expected_mask.expand(64, -1))
        assert (batch.inputs == task.needle).sum(1).eq(1).all()
        assert (batch.inputs[:, 0] == task.bos).all() and (batch.inputs[:, -1] == task.query_token).all()
    # Position answers: bucket b covers needle positions 1 .. 20 (seq_len 40, distance 20) in 5 equal bins of 4.
    task = make_task(SMALL["needle-position"])
    batch = task.sample(256, _gen(9))
    needle_at = (batch.inputs == task.needle).long().argmax(1)
    assert torch.equal(batch.targets[:, -1] - task.answer_ids[0], (needle_at - 1) // 4)


def test_oracle_scores_perfectly_and_reads_only_the_past(task):
    batch = task.sample(32, _gen(10))
    logits = task.oracle_logits(batch)
    metrics = task.score(logits, batch)
    assert metrics[task.metric] == 1.0
    assert all(value == pytest.approx(1.0) for value in metrics.values())
    # Causality: scrambling inputs after position t leaves the oracle's logits up to t unchanged.
    for t in (0, task.seq_len // 2, task.seq_len - 2):
        scrambled = batch.inputs.clone()
        scrambled[:, t + 1 :] = torch.randint(0, task.vocab_size, scrambled[:, t + 1 :].shape, generator=_gen(t))
        again = task.oracle_logits(Batch(scrambled, batch.targets))
        torch.testing.assert_close(again[:, : t + 1], logits[:, : t + 1])


def test_uniform_and_constant_guessers_score_chance(task):
    batch = task.sample(3000 if isinstance(task, NeedleTask) else 400, _gen(11))
    scored = (batch.targets != IGNORE_INDEX).sum().item()
    tolerance = 4 * (task.chance * (1 - task.chance) / scored) ** 0.5  # 4 standard errors of a Bernoulli mean
    answers = torch.tensor(task.answer_ids)
    guesses = answers[torch.randint(0, len(answers), batch.targets.shape, generator=_gen(12))]
    uniform = torch.nn.functional.one_hot(guesses, task.vocab_size).float()
    assert abs(task.score(uniform, batch)[task.metric] - task.chance) < tolerance
    if not isinstance(task, PatternTask):  # pattern answers include [SEP], which is rarer than each symbol
        constant = torch.zeros(*batch.targets.shape, task.vocab_size)
        constant[..., task.answer_ids[0]] = 1.0
        assert abs(task.score(constant, batch)[task.metric] - task.chance) < tolerance


def test_score_and_sample_reject_bad_input(task):
    batch = task.sample(2, _gen(13))
    with pytest.raises(ValueError, match="logits must be"):
        task.score(torch.zeros(2, task.seq_len, task.vocab_size - 1), batch)
    with pytest.raises(ValueError, match="logits must be"):
        task.score(torch.zeros(2, task.seq_len + 1, task.vocab_size), batch)
    with pytest.raises(ValueError, match="positive int"):
        task.sample(0, _gen(0))
    with pytest.raises(TypeError, match="torch.Generator"):
        task.sample(2, 0)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"seq_len": 30, "copy_length": 10, "copy_gap": 15}, "needs data.seq_len >= 36, got 30"),
        ({"seq_len": 30, "copy_gap": 40}, "data.copy_length >= 1"),
        ({"dataset": "language_modeling", "seq_len": 30, "period_min": 8, "period_max": 6}, "period_min 8"),
        ({"dataset": "needle_haystack", "seq_len": 10, "needle_min_distance": 1}, "needle_min_distance = 1"),
        ({"dataset": "needle_haystack", "seq_len": 10, "needle_buckets": 6}, "needle_buckets must lie in [2, 5]"),
    ],
)
def test_layouts_that_do_not_fit_raise_config_error(data, expected):
    with pytest.raises(ConfigError) as error:
        DataConfig(**data)
    assert expected in str(error.value)
