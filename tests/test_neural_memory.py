"""NeuralMemory as a layer: causal, per-sequence, streamable, trainable end to end, and really learning at test time."""

from __future__ import annotations

import pytest
import torch

from titans.memory import NeuralMemory

DT = torch.float64


def make_memory(**kw) -> NeuralMemory:
    torch.manual_seed(0)
    options = dict(dim=16, heads=2, depth=2, expansion=2, chunk_size=4)
    options.update(kw)
    return NeuralMemory(**options).to(DT)


def test_causal() -> None:
    mem = make_memory()
    x = torch.randn(2, 23, 16, dtype=DT)
    y, _ = mem(x)
    for t in (0, 3, 4, 9, 17):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2, _ = mem(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_sequences_in_a_batch_do_not_share_memory() -> None:
    mem = make_memory()
    x = torch.randn(3, 19, 16, dtype=DT)
    y, _ = mem(x)
    for b in range(3):
        yb, _ = mem(x[b : b + 1])
        torch.testing.assert_close(yb[0], y[b])
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    y2, _ = mem(x2)
    torch.testing.assert_close(y2[0], y[0], rtol=0, atol=0)
    torch.testing.assert_close(y2[2], y[2], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["chunked", "naive"])
@pytest.mark.parametrize("split", [[1] * 21, [5, 1, 9, 6], [4, 4, 13], [11, 10]], ids=str)
def test_streaming_equals_one_call(impl: str, split: list[int]) -> None:
    mem = make_memory(impl=impl, channelwise_forget=True)
    x = torch.randn(2, sum(split), 16, dtype=DT)
    full, full_state = mem(x)
    state, outs, start = None, [], 0
    for n in split:
        y, state = mem(x[:, start : start + n], state)
        outs.append(y)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    torch.testing.assert_close(state.conv, full_state.conv)
    for a, b in zip(state.memory.weights, full_state.memory.weights, strict=True):
        torch.testing.assert_close(a, b)


def test_naive_and_chunked_layers_agree_with_gradients() -> None:
    chunked = make_memory(impl="chunked", residual_norm=True)
    naive = make_memory(impl="naive", residual_norm=True)
    naive.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 14, 16, dtype=DT)
    y1, _ = chunked(x)
    y2, _ = naive(x)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), list(chunked.parameters()))
    g2 = torch.autograd.grad(y2.square().sum(), list(naive.parameters()))
    for (name, _), a, b in zip(chunked.named_parameters(), g1, g2, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("options", [{}, {"channelwise_forget": True, "residual_norm": True}], ids=["default", "all"])
def test_every_parameter_learns_through_the_inner_updates(options) -> None:
    """The outer loss reaches W_Q, W_K, W_V, the conv, every gate projection and M_0 (no detached inner loop)."""
    mem = make_memory(**options)
    x = torch.randn(2, 13, 16, dtype=DT)
    y, _ = mem(x)
    y.square().sum().backward()
    for name, p in mem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_test_time_learning_lowers_the_surprise_of_repeated_pairs() -> None:
    """Presenting the same sequence again: the inner loss l(M; k_t, v_t) on the repeat is far below the first pass."""
    mem = make_memory(dim=32, heads=1, expansion=4, chunk_size=4)
    mem.reset_gates(theta=0.1, alpha=0.001)  # a visible step; little forgetting over the 96 tokens
    x = torch.randn(1, 24, 32, dtype=DT)
    stats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        mem(torch.cat([x, x, x, x], dim=1), stats=stats)
    per_pass = stats["surprise"][0, 0].view(4, 24).mean(dim=1)
    assert (per_pass[1:] < per_pass[:-1]).all(), per_pass
    assert per_pass[3] < 0.5 * per_pass[0], per_pass
    assert stats["update_norm"].shape == (1, 1, 96) and (stats["update_norm"] > 0).all()


def test_switching_updates_off_freezes_the_memory() -> None:
    mem = make_memory()
    x = torch.randn(2, 9, 16, dtype=DT)
    mem.update_memory = False
    _, state = mem(x)
    for w, w0 in zip(state.memory.weights, mem.network.initial_weights, strict=True):
        torch.testing.assert_close(w, w0.expand_as(w))


def test_inner_loop_runs_in_float32_under_bfloat16_autocast() -> None:
    mem = make_memory().float()
    x = torch.randn(2, 11, 16)
    reference, _ = mem(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mem(x)
    assert state.memory.weights[0].dtype == torch.float32
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.05)


def test_bad_input_is_rejected_early() -> None:
    mem = make_memory()
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        mem(torch.randn(2, 5, 8, dtype=DT))
    with pytest.raises(TypeError, match="floating-point"):
        mem(torch.ones(2, 5, 16, dtype=torch.long))
    _, state = mem(torch.randn(2, 5, 16, dtype=DT))
    with pytest.raises(ValueError, match="batch size 3"):
        mem(torch.randn(3, 5, 16, dtype=DT), state)
    with pytest.raises(ValueError, match="must divide"):
        NeuralMemory(dim=10, heads=3)
