"""Shared layers: blocked/streamed attention equals the dense reference, bounded caches, RoPE, norms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from titans.models.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    apply_rope,
    reference_attention,
    rope_cache,
    swiglu_hidden,
)

D, H = 16, 2


def make_attention(window: int | None, n_prefix: int, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(D, H, rope_base=10000.0, window=window, n_prefix=n_prefix).double()


def random_x(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def stream(attn: Attention, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Feed x [B, T, D] in pieces of the given lengths with the carried cache; concatenated outputs."""
    outs, cache, start = [], None, 0
    for n in splits:
        y, cache = attn(x[:, start : start + n], cache)
        outs.append(y)
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


def random_splits(T: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(T - 1, generator=g)[: max(1, T // 4)].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, T], strict=True)]


CASES = [
    # (T, window, n_prefix): T not a multiple of W, W >= T, W = 1, prefix longer than the window, full attention
    (19, 4, 0),
    (19, 4, 3),
    (16, 4, 2),
    (7, 10, 2),
    (9, 1, 0),
    (9, 1, 2),
    (23, 3, 5),
    (13, None, 0),
    (13, None, 3),
]
IDS = [f"T{T}-W{W}-P{P}" for T, W, P in CASES]


def test_reference_mask_matches_the_rule_query_by_query():
    """The dense reference itself: each query's softmax runs over exactly {s <= t, t - s < W or s < P}."""
    torch.manual_seed(0)
    T, W, P = 11, 3, 2
    q, k, v = (torch.randn(1, 1, T, 4, dtype=torch.float64) for _ in range(3))
    got = reference_attention(q, k, v, window=W, n_prefix=P)
    for t in range(T):
        keys = [s for s in range(t + 1) if t - s < W or s < P]
        w = (q[0, 0, t] @ k[0, 0, keys].T / 2.0).softmax(-1)
        torch.testing.assert_close(got[0, 0, t], w @ v[0, 0, keys])


@pytest.mark.parametrize("T, window, n_prefix", CASES, ids=IDS)
def test_attention_matches_dense_reference(T, window, n_prefix):
    attn = make_attention(window, n_prefix)
    x = random_x(T).requires_grad_()
    y, _ = attn(x)
    ref = attn.reference_forward(x)
    torch.testing.assert_close(y, ref)
    # gradients agree too (the blocked path is what training differentiates)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad((y * g).sum(), [x, attn.qkv.weight])
    dx_ref, dw_ref = torch.autograd.grad((ref * g).sum(), [x, attn.qkv.weight])
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)


@pytest.mark.parametrize("T, window, n_prefix", CASES, ids=IDS)
def test_attention_takes_sdpa_outputs_in_any_memory_layout(T, window, n_prefix, monkeypatch):
    """CUDA's fused SDPA kernels return [..., T, Dh] results with heads-last strides (a transposed view); a .view on
    them failed there. Here SDPA's CPU result is handed back in that layout, so the CPU run catches such code."""
    sdpa = F.scaled_dot_product_attention

    def heads_last_layout(*args, **kwargs):
        y = sdpa(*args, **kwargs)
        return y.transpose(-3, -2).contiguous().transpose(-3, -2)  # same values, strides of a [.., T, H, Dh] buffer

    attn = make_attention(window, n_prefix)
    x = random_x(T)
    expected = stream(attn, x, [T])
    monkeypatch.setattr(F, "scaled_dot_product_attention", heads_last_layout)
    torch.testing.assert_close(stream(attn, x, [T]), expected, rtol=0, atol=0)
    torch.testing.assert_close(stream(attn, x, random_splits(T, seed=2)), expected)


def test_window_actually_restricts_attention():
    """Guards against the reference being vacuous: a window changes outputs once the stream is longer than it."""
    x = random_x(12)
    windowed = make_attention(4, 0)
    full = make_attention(None, 0)
    y_w, y_f = windowed(x)[0], full(x)[0]
    torch.testing.assert_close(y_w[:, :4], y_f[:, :4])
    assert (y_w[:, 4:] - y_f[:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("T, window, n_prefix", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["random", "tokens"])
def test_streaming_equals_one_call(T, window, n_prefix, mode):
    attn = make_attention(window, n_prefix)
    x = random_x(T)
    whole, _ = attn(x)
    splits = random_splits(T, seed=T) if mode == "random" else [1] * T
    torch.testing.assert_close(stream(attn, x, splits), whole)


def test_streaming_with_pieces_longer_than_the_window():
    attn = make_attention(3, 2)
    x = random_x(40)
    torch.testing.assert_close(stream(attn, x, [1, 9, 2, 14, 3, 11]), attn(x)[0])


@pytest.mark.parametrize("window, n_prefix", [(4, 0), (4, 3), (1, 2), (3, 6)])
def test_cache_size_is_bounded(window, n_prefix):
    attn = make_attention(window, n_prefix)
    x = random_x(30)
    cache = None
    for t in range(30):
        _, cache = attn(x[:, t : t + 1], cache)
        seen = t + 1
        assert cache.seen == seen
        assert cache.k_prefix.shape[2] == min(n_prefix, seen)
        assert cache.k_recent.shape[2] == min(seen, window - 1)
        assert cache.size <= n_prefix + window
    # a single long call leaves the same bounded cache
    _, cache = attn(x)
    assert cache.size == n_prefix + window - 1


def test_full_attention_cache_keeps_everything():
    attn = make_attention(None, 0)
    _, cache = attn(random_x(9))
    assert cache.size == 9 and cache.seen == 9


def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cache(torch.tensor([m]), 8, 10000.0, torch.float64)
        ck, sk = rope_cache(torch.tensor([n]), 8, 10000.0, torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    for m, n, shift in [(5, 2, 100), (0, 7, 33), (1000, 999, 12345)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift))
    # and they do depend on the difference, so the property is not trivially true
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3


def test_rope_is_a_rotation_and_identity_at_zero():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cos, sin = rope_cache(torch.arange(5), 8, 10000.0, torch.float64)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def test_rms_norm_values():
    norm = RMSNorm(4, eps=0.0).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[3.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(norm(x), x / math.sqrt(3.0) * norm.weight)


def test_swiglu_values_and_width():
    torch.manual_seed(0)
    mlp = SwiGLU(4, 8).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)
    assert swiglu_hidden(64, 4.0) == 176  # 170.67 rounded up to a multiple of 8
    assert swiglu_hidden(48, 4.0) == 128


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=10, n_heads=3), "divisible"),
        (dict(d_model=12, n_heads=4), "even"),
        (dict(d_model=16, n_heads=2, window=0), "window"),
        (dict(d_model=16, n_heads=2, n_prefix=-1), "n_prefix"),
    ],
)
def test_attention_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(rope_base=10000.0, **kwargs)


def test_attention_rejects_a_cache_from_another_batch():
    attn = make_attention(4, 0)
    _, cache = attn(random_x(5, B=2))
    with pytest.raises(ValueError, match="batch size"):
        attn(random_x(1, B=3), cache)
