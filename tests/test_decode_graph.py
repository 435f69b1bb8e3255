"""generate's decode step replayed from static buffers (`TitansLM.graph_decode`, titans/models/decode_graph.py).

A CUDA graph cannot be recorded without a GPU; `eager_capture` keeps everything else of `DecodeGraph` (the static
token and states, the warm-up that must leave them alone, the copy of each new state over the old one, one static
logits tensor) and runs the step eagerly at each replay. These tests hold that bookkeeping to the plain fixed-shape
decode, which tests/test_decode.py holds to one forward; tests/test_cuda.py checks the recorded graph on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncs
from test_decode import variant_config

from titans.models import build_model
from titans.models.decode_graph import DecodeGraph, eager_capture

DT = torch.float64
VARIANTS = ["baseline", "baseline-full", "LMM", "MAC", "MAC-attention", "MAG", "MAL"]


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_replayed_decode_equals_the_eager_step(variant: str) -> None:
    """Greedy and sampled generation past segment (6), chunk (4) and window (5) boundaries, twice in a row (each
    generate records its own step): the same tokens as the eager fixed-shape step."""
    torch.manual_seed(0)
    model = build_model(variant_config(variant)).to(DT).eval()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 19, temperature=0.0)
    sampled = model.generate(prompt, 19, temperature=1.3, generator=torch.Generator().manual_seed(2))
    model._decode_capture = eager_capture
    for _ in range(2):
        assert torch.equal(model.generate(prompt, 19, temperature=0.0), greedy)
    again = model.generate(prompt, 19, temperature=1.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again, sampled)


@torch.no_grad()
def test_replayed_logits_equal_the_eager_step_token_by_token() -> None:
    """The static logits after each replay equal the eager step's, and the warm-up leaves the stream where it was."""
    torch.manual_seed(0)
    model = build_model(variant_config("MAC")).to(DT).eval()
    idx = torch.randint(0, 11, (2, 21), generator=torch.Generator().manual_seed(3))
    _, _, state = model(idx[:, :4])
    fixed = model._fixed_states(state, capacity=21)
    graph = DecodeGraph(model._fixed_step, idx[:, 4:5], fixed, eager_capture)
    for t in range(4, 21):
        expected, fixed = model._fixed_step(idx[:, t : t + 1], fixed)
        assert torch.equal(graph(idx[:, t : t + 1]), expected)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_the_recorded_decode_step_could_be_a_cuda_graph(variant: str) -> None:
    """What DecodeGraph records (the fixed-shape step and the copies over the static states) reads no value on the
    host and builds no tensor from host data."""

    def checked_capture(record, warm_up):
        warm_up()
        with HostSyncs() as found:
            logits = record()
        assert not found.hits, f"the recorded decode step reads values on the host: {dict(found.hits)}"
        return record, logits

    torch.manual_seed(0)
    model = build_model(variant_config(variant)).to(DT).eval()
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    _, _, state = model(prompt)
    DecodeGraph(model._fixed_step, prompt[:, -1:], model._fixed_states(state, capacity=12), checked_capture)


def _swapping_step(token: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor]):
    """A step whose new states are its old ones exchanged: each new state is the other static buffer, the case where
    copying in order would read a value already overwritten."""
    a, b = states
    return a.sum(-1, keepdim=True) + token, (b, a)


def test_new_states_that_alias_static_buffers_are_copied_safely() -> None:
    a0, b0 = torch.arange(3.0).expand(2, 3).clone(), torch.full((2, 3), 10.0)
    graph = DecodeGraph(_swapping_step, torch.zeros(2, 1), (a0, b0), eager_capture)
    states = (a0, b0)
    for token in (1.0, 2.0, 3.0, 4.0):
        expected, states = _swapping_step(torch.full((2, 1), token), states)
        assert torch.equal(graph(torch.full((2, 1), token)), expected)
        assert torch.equal(graph.states[0], states[0]) and torch.equal(graph.states[1], states[1])
    assert torch.equal(a0, torch.arange(3.0).expand(2, 3)), "the caller's states are copied, never written"


def test_a_step_that_changes_its_state_structure_is_refused() -> None:
    def dropping(token, states):
        return token * 1.0, states[:1]

    with pytest.raises(RuntimeError, match="returned 1 state tensors for 2"):
        DecodeGraph(dropping, torch.zeros(1, 1), (torch.zeros(1), torch.zeros(1)), eager_capture)(torch.zeros(1, 1))


def test_graph_decode_needs_a_cuda_model() -> None:
    model = build_model(variant_config("LMM"))
    with pytest.raises(ValueError, match="the model is on cpu"):
        model.graph_decode()
    model.graph_decode(False)
    assert model._decode_capture is None
