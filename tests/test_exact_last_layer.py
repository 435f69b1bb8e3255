"""naive_memory's `exact_last_layer`: the last layer's inner gradient at the current weights, the others' at the
chunk start. What it must be: the anchored reference at chunk 1, the per-token (chunk 1) memory at any chunk for a
linear memory, different from the anchor otherwise, differentiable, and reachable only through the reference impl."""

from __future__ import annotations

import pytest
import torch
from test_memory import make_inputs

from titans.config import ConfigError, load_config
from titans.memory import NeuralMemory, naive_memory

DT = torch.float64


def run(inputs: dict, chunk: int, exact: bool):
    return naive_memory(**inputs, chunk_size=chunk, grad_clip=1.0, exact_last_layer=exact)


def assert_same(a, b) -> None:
    (ya, sa), (yb, sb) = a, b
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    for x, y in zip((*sa.weights, *sa.momentum), (*sb.weights, *sb.momentum), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_at_chunk_1_it_is_the_anchored_reference(depth: int) -> None:
    inputs = make_inputs(9, depth)
    assert_same(run(inputs, 1, exact=True), run(inputs, 1, exact=False))


@pytest.mark.parametrize("chunk", [4, 16])
def test_a_linear_memory_learns_token_by_token_whatever_the_chunk(chunk: int) -> None:
    inputs = make_inputs(13, 1)  # depth 1: the only layer is the last, so no gradient is anchored
    assert_same(run(inputs, chunk, exact=True), run(inputs, 1, exact=False))
    assert not torch.allclose(run(inputs, chunk, exact=False)[0], run(inputs, 1, exact=False)[0])


def test_a_deep_memory_is_neither_the_anchored_nor_the_per_token_one() -> None:
    inputs = make_inputs(13, 2)
    exact = run(inputs, 4, exact=True)[0]
    assert not torch.allclose(exact, run(inputs, 4, exact=False)[0])
    assert not torch.allclose(exact, run(inputs, 1, exact=False)[0])


def test_the_gradients_reach_every_input() -> None:
    # streaming (any split == one call) is tested with the other impls in test_memory.py
    inputs = make_inputs(11, 2)
    run(inputs, 4, exact=True)[0].square().sum().backward()
    for name in ("q", "k", "v", "theta", "eta", "alpha"):
        assert inputs[name].grad is not None and inputs[name].grad.abs().sum() > 0, name


def test_only_the_reference_impl_takes_it() -> None:
    with pytest.raises(ValueError, match="exact_last_layer needs impl='naive'"):
        NeuralMemory(16, heads=2, exact_last_layer=True)
    with pytest.raises(ConfigError, match="model.memory.exact_last_layer = true needs model.memory.impl=naive"):
        load_config("config.yaml", ["model.memory.exact_last_layer=true"])
    cfg = load_config("config.yaml", ["model.memory.exact_last_layer=true", "model.memory.impl=naive"])
    memory = NeuralMemory.from_config(cfg.model).double()
    assert memory.exact_last_layer and not memory.plain  # no fast path implements it: decoding takes the reference
    x = torch.randn(2, 9, memory.dim, dtype=DT)
    whole, _ = memory(x)
    with torch.no_grad():
        y, state = memory(x[:, :5])
        for t in range(5, 9):
            y_t, state = memory(x[:, t : t + 1], state)
            torch.testing.assert_close(y_t[:, 0], whole[:, t].detach(), rtol=0, atol=1e-12)
