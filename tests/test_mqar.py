"""MQAR follows Zoology's layout: reference example, per-example invariants, gap law, scoring, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from titans.tasks.base import IGNORE_INDEX, Batch
from titans.tasks.mqar import MQAR, mqar_layout


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_layout_reproduces_zoology_reference_example():
    # Zoology's reference example: vocab 64, seq 16, 3 pairs, random_non_queries=False; queries in order 30, 3, 14.
    keys = torch.tensor([[3, 30, 14]])
    values = torch.tensor([[54, 59, 48]])
    gaps = torch.tensor([[1, 0, 4]])
    inputs, targets = mqar_layout(keys, values, gaps, seq_len=16)
    assert inputs.tolist() == [[3, 54, 30, 59, 14, 48, 30, 0, 3, 0, 0, 0, 0, 0, 14, 0]]
    expected = [IGNORE_INDEX] * 16
    expected[6], expected[8], expected[14] = 59, 54, 48
    assert targets.tolist() == [expected]


def _check_invariants(task: MQAR, batch: Batch) -> None:
    n_pairs, half = task.num_kv_pairs, task.vocab_size // 2
    context_size = 2 * n_pairs * task.num_passes
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        keys, values = inputs[0 : 2 * n_pairs : 2], inputs[1 : 2 * n_pairs : 2]
        assert len(set(keys)) == n_pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == n_pairs and all(half <= v < task.vocab_size for v in values)
        assert inputs[:context_size] == inputs[: 2 * n_pairs] * task.num_passes
        pair = dict(zip(keys, values, strict=True))
        scored = [t for t, y in enumerate(targets) if y != IGNORE_INDEX]
        assert len(scored) == n_pairs
        # Every query is a context key, asked once, on an even offset after the context, answered by its value.
        assert sorted(inputs[t] for t in scored) == sorted(keys)
        for t in scored:
            assert t >= context_size and (t - context_size) % 2 == 0
            assert targets[t] == pair[inputs[t]]


@pytest.mark.parametrize("num_passes", [1, 2])
def test_samples_satisfy_zoology_invariants(num_passes):
    task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=8, num_passes=num_passes, random_non_queries=False)
    batch = task.sample(64, _gen(0))
    _check_invariants(task, batch)
    # Without random non-queries the query region holds only filler 0 besides the queries, and each key
    # appears exactly once in the context and once as a query.
    query_region = batch.inputs[:, 2 * task.num_kv_pairs * num_passes :]
    assert ((query_region == 0) == (batch.targets[:, 2 * task.num_kv_pairs * num_passes :] == IGNORE_INDEX)).all()
    for row in batch.inputs.tolist():
        context = row[: 2 * task.num_kv_pairs]
        for k in context[0::2]:
            assert context.count(k) == 1 and row.count(k) == num_passes + 1


def test_random_filler_only_replaces_filler_slots():
    plain = MQAR(vocab_size=256, seq_len=128, num_kv_pairs=8, random_non_queries=False)
    noisy = dataclasses.replace(plain, random_non_queries=True)
    a, b = plain.sample(32, _gen(3)), noisy.sample(32, _gen(3))
    filler = a.inputs == 0
    # Same draws for keys, values and gaps; only filler slots change, so queries and targets are untouched.
    assert torch.equal(a.targets, b.targets)
    assert torch.equal(a.inputs[~filler], b.inputs[~filler])
    assert (b.inputs[filler] != 0).float().mean() > 0.9
    assert b.inputs.min() >= 0 and b.inputs.max() < noisy.vocab_size
    _check_invariants(noisy, b)


def test_determinism_given_generator_state():
    task = MQAR(vocab_size=512, seq_len=128, num_kv_pairs=16)
    a, b, c = task.sample(8, _gen(7)), task.sample(8, _gen(7)), task.sample(8, _gen(8))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_gap_distribution_is_zoology_power_law():
    task = MQAR(vocab_size=128, seq_len=64, num_kv_pairs=1, power_a=0.01, random_non_queries=False)
    p = task.gap_probabilities()
    space = 31
    i = torch.arange(1, space + 1, dtype=torch.float64)
    torch.testing.assert_close(p, i**-0.99 / (i**-0.99).sum())
    # With one pair, the query offset is 2 + 2 * gap; its empirical law matches p.
    batch = task.sample(2000, _gen(1))
    gaps = ((batch.targets != IGNORE_INDEX).float().argmax(dim=1) - 2) // 2
    freq = torch.bincount(gaps, minlength=space).double() / gaps.numel()
    assert (freq - p).abs().max() < 0.04


def test_score_counts_only_query_positions():
    task = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4)
    batch = task.sample(6, _gen(2))
    scored = batch.targets != IGNORE_INDEX
    # Perfect on queries, deliberately wrong (token 0) everywhere else: still 1.0.
    logits = torch.zeros(6, 32, 64)
    logits[..., 0] = 1.0
    logits[scored] = torch.nn.functional.one_hot(batch.targets[scored], 64).float() * 5
    assert task.score(logits, batch) == {"mqar_accuracy": 1.0, "mqar_in_context": 1.0}
    # Break exactly one query in the first example: that example scores 3/4, the mean is 1 - 1/24.
    t = scored[0].nonzero()[0, 0]
    logits[0, t] = 0.0
    assert task.score(logits, batch)["mqar_accuracy"] == pytest.approx(1 - 1 / 24)
    assert task.chance == 1 / 32


def test_in_context_separates_the_bag_of_values_from_recall():
    task = MQAR(vocab_size=64, seq_len=32, num_kv_pairs=4)
    batch = task.sample(6, _gen(3))
    scored = batch.targets != IGNORE_INDEX
    values = batch.inputs[:, 1:8:2]  # [6, 4]
    logits = torch.zeros(6, 32, 64)
    # Every query answered with the value of the next pair (v_{i+1}): always a context value, never the right one.
    for row in range(6):
        for t in scored[row].nonzero()[:, 0]:
            wrong = values[row][(values[row] == batch.targets[row, t]).nonzero()[0, 0].add(1) % 4]
            logits[row, t, wrong] = 1.0
    assert task.score(logits, batch) == {"mqar_accuracy": 0.0, "mqar_in_context": 1.0}
    # Token 0 (the filler) everywhere: neither right nor a context value.
    assert task.score(torch.zeros(6, 32, 64), batch) == {"mqar_accuracy": 0.0, "mqar_in_context": 0.0}


def test_length_extrapolation_keeps_invariants():
    train = MQAR(vocab_size=2048, seq_len=128, num_kv_pairs=16, random_non_queries=False)
    long = dataclasses.replace(train, seq_len=1024)
    batch = long.sample(16, _gen(5))
    assert batch.inputs.shape == (16, 1024)
    _check_invariants(long, batch)
    # The power law still reaches past the training length.
    assert (batch.targets[:, 128:] != IGNORE_INDEX).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 63}, "even"),
        ({"vocab_size": 64, "seq_len": 64}, "vocab_size > seq_len"),
        ({"seq_len": 32, "num_kv_pairs": 9}, "seq_len >= 36"),
        ({"power_a": 0.0}, "power_a"),
        ({"num_kv_pairs": 0}, "num_kv_pairs"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQAR(**kwargs)
