"""MAC's default eager path (`_forward_hoisted`: what does not depend on the memory runs once over the whole call)
computes what the reference computes segment by segment (`forward_segments` through `_segment_at_start`).

Float64 throughout: logits, loss, every parameter's gradient and the input's, the carried state (memory, committed
memory, conv history, the segment's keys and values), for calls that start and end mid-segment, streams cut into
uneven pieces, with and without persistent tokens, and under the memory options that change the write.
"""

from __future__ import annotations

import pytest
import torch
from model_configs import VOCAB, tiny_model_config

from titans.models import build_model

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}

CASES = {
    "defaults": {},
    "no persistent tokens": {"persistent_memory_size": 0},
    "strong write, exact last layer": {"theta_init": 0.25, "exact_last_layer": True},
    "no momentum, no forgetting": {"momentum": False, "forgetting": False},
    "memory on the attention output": {"mac_memory_input": "attention"},
}


def mac(case: str, seed: int = 0):
    options = dict(CASES[case])
    persistent = options.pop("persistent_memory_size", 2)
    cfg = tiny_model_config("MAC", **options)
    cfg.persistent_memory_size = persistent
    torch.manual_seed(seed)
    return build_model(cfg).to(DT)


def reference(model) -> None:
    """Route every block of `model` through the segment-by-segment reference."""
    for block in model.blocks:
        block.forward = block.forward_segments


def flat_state(states) -> list[torch.Tensor]:
    """Every tensor of a list of MACStates, in a fixed order."""
    out = []
    for s in states:
        out += [*s.memory.memory.weights, *s.memory.memory.momentum, *s.memory.memory.anchor, s.memory.conv]
        out += [*s.committed.weights, s.retrieve_conv, s.h_keys, s.h_values, s.x_keys, s.x_values]
    return out


def assert_close_all(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_equals_reference(case: str) -> None:
    """T 17 with segments of 6: two whole segments and a partial one; logits, loss and every gradient."""
    tokens = torch.randint(0, VOCAB, (3, 18), generator=torch.Generator().manual_seed(1))
    results = []
    for use_reference in (False, True):
        model = mac(case)
        if use_reference:
            reference(model)
        logits, loss, lm_state = model(tokens[:, :-1], tokens[:, 1:])
        states = lm_state.block_states
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None for g in grads)
        results.append((logits, loss, grads, states))
    (logits, loss, grads, states), (ref_logits, ref_loss, ref_grads, ref_states) = results
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_close_all(grads, ref_grads)
    assert_close_all(flat_state(states), flat_state(ref_states))


def test_uneven_stream_equals_one_reference_pass() -> None:
    """A stream fed in pieces of 5, 1, 7 and 4 tokens (cuts mid-segment and mid-chunk) equals one reference call."""
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    model = mac("defaults")
    with torch.no_grad():
        pieces, states, start = [], None, 0
        for n in (5, 1, 7, 4):
            logits, _, states = model(tokens[:, start : start + n], state=states)
            pieces.append(logits)
            start += n
        reference(model)
        ref_logits, _, ref_lm_state = model(tokens)
    torch.testing.assert_close(torch.cat(pieces, dim=1), ref_logits, **TOL)
    assert_close_all(flat_state(states.block_states), flat_state(ref_lm_state.block_states))


def test_block_from_mid_segment_state_with_input_gradients() -> None:
    """One block from a state three tokens into a segment, over 14 tokens (the rotary positions wrap around at each
    segment boundary): output, state, and the gradients of the input and of every parameter."""
    model = mac("defaults")
    block = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        _, start = block.forward_segments(torch.randn(2, 3, 16, generator=g, dtype=DT))
    x = torch.randn(2, 14, 16, generator=g, dtype=DT)
    results = []
    for forward in (block.forward, block.forward_segments):
        block.zero_grad()
        x_in = x.clone().requires_grad_(True)
        out, state = forward(x_in, start)
        (out * torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out)).sum().backward()
        # M_0 gets no gradient: the start state was made without one
        grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
        results.append((out, state, x_in.grad, grads))
    (out, state, dx, grads), (ref_out, ref_state, ref_dx, ref_grads) = results
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(dx, ref_dx, **TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == sum(1 for _ in block.parameters()) - 2
    assert_close_all(list(grads.values()), list(ref_grads.values()))
    assert_close_all(flat_state([state]), flat_state([ref_state]))
    assert state.position == ref_state.position == 17
