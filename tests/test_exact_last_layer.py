"""`exact_last_layer`: the last layer's inner gradient at the current weights, the others' at the chunk start. What it
must be: the anchored reference at chunk 1, the per-token (chunk 1) memory at any chunk for a linear memory, different
from the anchor otherwise, differentiable; and its chunk-parallel form (a triangular system per chunk, solved by
forward substitution through the clip) equal to the per-token reference in outputs, states and every gradient."""

from __future__ import annotations

import functools

import pytest
import torch
from test_fused import BACKENDS
from test_memory import OPTIONS, assert_same_run, make_inputs

from titans.config import ConfigError, load_config
from titans.memory import NeuralMemory, chunked_memory, naive_memory
from titans.memory.fused import fused_memory

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
    inputs = make_inputs(11, 2)
    run(inputs, 4, exact=True)[0].square().sum().backward()
    for name in ("q", "k", "v", "theta", "eta", "alpha"):
        assert inputs[name].grad is not None and inputs[name].grad.abs().sum() > 0, name


CHUNKED_OPTIONS = {name: opts for name, opts in OPTIONS.items() if not opts.get("residual_norm")}


@pytest.mark.parametrize("clip", [None, 0.3], ids=["no-clip", "clip0.3"])
@pytest.mark.parametrize("option", list(CHUNKED_OPTIONS))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size, T", [(1, 7), (4, 19), (16, 19)])
def test_the_chunk_parallel_form_equals_the_reference(option, depth, chunk_size, T, clip) -> None:
    # clip 0.3 binds on most tokens here, so the substitution's per-row scales are exercised
    inputs = make_inputs(T, depth, seed=depth + 7, **CHUNKED_OPTIONS[option])
    assert_same_run(inputs, chunk_size, grad_clip=clip, exact_last_layer=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.3], ids=["no-clip", "clip0.3"])
@pytest.mark.parametrize("option", ["no-momentum", "no-forgetting", "neither", "shared-gates", "defaults"])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size, T, checkpoint_every", [(1, 7, 0), (4, 19, 0), (16, 37, 0), (4, 37, 3)])
def test_the_fused_scan_equals_the_reference(option, depth, chunk_size, T, checkpoint_every, clip, backend) -> None:
    # the hand-written reverse substitution (C++ and tensor ops) against autograd through the per-token reference
    inputs = make_inputs(T, depth, seed=depth + 3, **CHUNKED_OPTIONS.get(option, {}))
    impl = functools.partial(fused_memory, backend=backend)
    assert_same_run(inputs, chunk_size, checkpoint_every, impl=impl, grad_clip=clip, exact_last_layer=True)


def test_the_clip_binds_in_the_substitution() -> None:
    # without this the clipped equivalence above could hold by never clipping the last layer
    inputs = make_inputs(19, 2, seed=9)
    clipped = chunked_memory(**inputs, chunk_size=4, grad_clip=0.3, exact_last_layer=True)[0]
    assert not torch.allclose(clipped, chunked_memory(**inputs, chunk_size=4, exact_last_layer=True)[0])


def test_a_layer_norm_memory_has_no_chunk_parallel_form() -> None:
    inputs = make_inputs(9, 2, residual_norm=True)
    with pytest.raises(ValueError, match="no chunk-parallel form for a residual \\+ LayerNorm memory"):
        chunked_memory(**inputs, chunk_size=4, exact_last_layer=True)
    with pytest.raises(ValueError, match="exact_last_layer with residual_norm needs impl='naive'"):
        NeuralMemory(16, heads=2, residual_norm=True, exact_last_layer=True)
    with pytest.raises(ConfigError, match="model.memory.exact_last_layer = true with model.memory.residual_norm"):
        load_config("config.yaml", ["model.memory.exact_last_layer=true", "model.memory.residual_norm=true"])
    both = ["model.memory.exact_last_layer=true", "model.memory.residual_norm=true"]
    assert load_config("config.yaml", [*both, "model.memory.impl=naive"]).model.memory.exact_last_layer


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_the_layer_decodes_token_by_token_as_in_one_pass(impl: str) -> None:
    cfg = load_config("config.yaml", ["model.memory.exact_last_layer=true", f"model.memory.impl={impl}"])
    memory = NeuralMemory.from_config(cfg.model).double()
    assert memory.exact_last_layer and memory.plain  # one-token decoding takes the rank-one step
    x = torch.randn(2, 37, memory.dim, dtype=DT)
    whole, _ = memory(x)
    with torch.no_grad():
        y, state = memory(x[:, :5])
        fixed = memory.fixed_state(state)
        for t in range(5, 37):  # past two chunk boundaries of the default chunk 16
            y_t, state = memory(x[:, t : t + 1], state)
            torch.testing.assert_close(y_t[:, 0], whole[:, t].detach(), rtol=0, atol=1e-12)
            y_f, fixed = memory.decode_fixed(x[:, t], fixed)
            torch.testing.assert_close(y_f, whole[:, t].detach(), rtol=0, atol=1e-12)
