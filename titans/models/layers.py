"""Shared model layers: RMSNorm, SwiGLU, rotary embeddings and causal (sliding-window, prefixed) attention.

Every variant builds on these. Shapes: sequences are [B, T, D]; inside attention [B, H, T, Dh] with Dh = D / H.

Attention semantics (one rule, used by the fast path, the streaming path and the dense reference): a query at absolute
stream position t sees the key at position s iff s <= t and (t - s < window or s < n_prefix). window=None is full causal
attention. The n_prefix rule is the paper's "sliding window attention with prefix" (Eqs. 26-27 and 29-31): persistent
tokens prepended to the sequence stay visible to every later query however far back they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titans.matmul import Linear
from titans.memory.step import decode_linear, rms_norm_rows
from titans.models.flex import ATTENTION_IMPLS, flex_available, flex_window_attention

if TYPE_CHECKING:
    from titans.config import ModelConfig

_FULL_PRECISION = (torch.float32, torch.float64)  # dtypes RMSNorm computes in directly


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim. x [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"RMSNorm dim must be >= 1, got {dim}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype in _FULL_PRECISION and x.dtype == self.weight.dtype and not torch.is_grad_enabled():
            return rms_norm_rows(x, self.weight, self.eps)  # decoding rows [B, dim]: the same function, fewer ops
        # normalise in at least float32 so bf16 activations do not lose the mean square; float64 stays float64
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x if x.dtype == compute_dtype else x.to(compute_dtype)  # no-op casts still cost a call per token
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y if y.dtype == x.dtype else y.to(x.dtype)) * self.weight


class ResidualProjection(Linear):
    """A bias-free linear layer that writes into the residual stream.

    It is a plain Linear; the type only tells TitansLM's init to scale its std by 1/sqrt(2 * n_layers) (GPT-2), so
    the residual stream's variance does not grow with depth.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)


def swiglu_hidden(d_model: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: mlp_ratio * d_model * 2/3 (a plain MLP's parameter count), rounded up to a multiple of 8."""
    if d_model < 1 or mlp_ratio <= 0:
        raise ValueError(f"need d_model >= 1 and mlp_ratio > 0, got d_model={d_model}, mlp_ratio={mlp_ratio}")
    return 8 * math.ceil(mlp_ratio * d_model * 2 / 3 / 8)


class SwiGLU(nn.Module):
    """y = W_down(silu(W_gate x) * W_up x), no biases. x [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"SwiGLU needs dim >= 1 and hidden >= 1, got dim={dim}, hidden={hidden}")
        self.gate = Linear(dim, hidden, bias=False)
        self.up = Linear(dim, hidden, bias=False)
        self.down = ResidualProjection(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and not torch.is_grad_enabled():
            # decoding rows [B, dim]: gate and up in one matmul against a cached transposed copy (decode_linear)
            gate, up = decode_linear(x, self.gate, self.up).chunk(2, dim=1)
            return decode_linear(F.silu(gate) * up, self.down)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def rope_cache(
    positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary embeddings at explicit absolute positions.

    positions [T] long -> (cos, sin), each [T, head_dim // 2]. Positions are explicit (not 0..T-1) so a stream fed in
    pieces rotates every token by its position in the whole stream.
    """
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D [T], got shape {tuple(positions.shape)}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim >= 2, got {head_dim}; change d_model or n_heads")
    if base <= 0:
        raise ValueError(f"rope base must be > 0, got {base}")
    # angles in float64: position * frequency loses precision in float32 for long streams
    angles = positions.to(device=device, dtype=torch.float64)[:, None] * _inv_freq(head_dim, base, device)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


_INV_FREQ: dict[tuple[int, float, str], torch.Tensor] = {}


def _inv_freq(head_dim: int, base: float, device: torch.device | str | None) -> torch.Tensor:
    """RoPE frequencies base^(-2i/Dh), float64 [Dh/2], computed once per (head_dim, base, device): decoding asks for
    them every token."""
    key = (head_dim, float(base), str(torch.device(device) if device is not None else torch.device("cpu")))
    freq = _INV_FREQ.get(key)
    if freq is None:
        freq = _INV_FREQ[key] = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x by the position's angles. x [B, H, T, Dh]; cos, sin [T, Dh/2].

    After rotation <q_m, k_n> depends on positions only through m - n (the RoPE relative-position property).
    """
    half = x.shape[-1] // 2
    if cos.shape != (x.shape[-2], half) or sin.shape != cos.shape:
        raise ValueError(
            f"cos/sin must be [T, Dh/2] = [{x.shape[-2]}, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attention_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, window: int | None, n_prefix: int
) -> torch.Tensor:
    """The visibility rule as a dense bool mask (True = visible). q_positions [Tq], k_positions [Tk] -> [Tq, Tk]."""
    t = q_positions[:, None]
    s = k_positions[None, :]
    visible = s <= t
    if window is not None:
        visible = visible & ((t - s < window) | (s < n_prefix))
    return visible


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None, n_prefix: int = 0
) -> torch.Tensor:
    """Dense reference: softmax(q k^T / sqrt(Dh) masked) v for a stream starting at position 0.

    q, k, v [B, H, T, Dh] (already rotated) -> [B, H, T, Dh]. Builds the full T x T mask: for tests only.
    """
    positions = torch.arange(q.shape[-2], device=q.device)
    mask = attention_mask(positions, positions, window, n_prefix)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


@dataclass
class KVCache:
    """Rotated keys/values one Attention layer keeps between calls on the same stream.

    k_prefix, v_prefix [B, H, P, Dh]: the first P = min(n_prefix, seen) positions, kept forever (windowed only).
    k_recent, v_recent [B, H, R, Dh]: the last R positions; R = min(seen, window - 1) for windowed attention, so the
    cache never holds more than n_prefix + window - 1 positions; R = seen (unbounded) for full attention.
    seen: number of stream positions already processed (the absolute position of the next token).
    """

    k_prefix: torch.Tensor
    v_prefix: torch.Tensor
    k_recent: torch.Tensor
    v_recent: torch.Tensor
    seen: int

    @property
    def size(self) -> int:
        """Number of cached positions (prefix + recent)."""
        return self.k_prefix.shape[-2] + self.k_recent.shape[-2]


class FixedKVCache(NamedTuple):
    """A KVCache for fixed-shape decoding (`Attention.decode_fixed`): tensors only, so that one compiled step serves
    every position.

    keys, values [B, H, P + R, Dh]: P = n_prefix prefix slots (windowed attention; slot i holds position i), then a
    ring of R slots where position s lives in slot s mod R: R = window (the last `window` positions), or for full
    attention the capacity (every position the stream will reach). position: 0-d long tensor, the next token's.
    """

    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor


def _blocked_window_attention(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_tail: torch.Tensor,
    v_tail: torch.Tensor,
    seen: int,
    window: int,
    n_prefix: int,
) -> torch.Tensor:
    """Sliding-window attention with prefix in O(T * (window + n_prefix)) memory, never a T x T mask.

    q [B, H, T, Dh]: queries at positions seen .. seen+T-1. k/v_prefix [B, H, P, Dh]: positions 0 .. P-1, P <= n_prefix.
    k/v_tail [B, H, o+T, Dh]: the contiguous positions seen-o .. seen+T-1 with o <= window-1. Returns [B, H, T, Dh].

    Queries are cut into blocks of Q = min(window, T); block b attends to [prefix keys | the Q + window - 1 tail keys
    that end at its last query] with a small per-block mask. Keys already counted in the prefix part (positions
    < n_prefix) are masked out of the window part so no key is seen twice.
    """
    B, H, T, Dh = q.shape
    P = k_prefix.shape[-2]
    o = k_tail.shape[-2] - T
    Q = min(window, T)
    n_blocks = -(-T // Q)
    span = Q + window - 1
    # left padding puts the key of the first query's window start at index 0 of block 0's slice; right padding
    # fills the last block
    pad_left, pad_right = window - 1 - o, n_blocks * Q - T
    tail_k = F.pad(k_tail, (0, 0, pad_left, pad_right)).unfold(2, span, Q).transpose(-1, -2)  # [B, H, nb, span, Dh]
    tail_v = F.pad(v_tail, (0, 0, pad_left, pad_right)).unfold(2, span, Q).transpose(-1, -2)
    k_all = torch.cat([k_prefix[:, :, None].expand(B, H, n_blocks, P, Dh), tail_k], dim=3)  # [B, H, nb, P+span, Dh]
    v_all = torch.cat([v_prefix[:, :, None].expand(B, H, n_blocks, P, Dh), tail_v], dim=3)
    q_blocks = F.pad(q, (0, 0, 0, pad_right)).view(B, H, n_blocks, Q, Dh)

    block_start = seen + torch.arange(n_blocks, device=q.device)[:, None] * Q  # [nb, 1]
    q_pos = block_start + torch.arange(Q, device=q.device)[None, :]  # [nb, Q]
    k_pos = block_start - (window - 1) + torch.arange(span, device=q.device)[None, :]  # [nb, span]
    t, s = q_pos[:, :, None], k_pos[:, None, :]
    window_mask = (s >= n_prefix) & (s <= t) & (t - s < window)  # [nb, Q, span]
    prefix_mask = torch.arange(P, device=q.device)[None, None, :] <= t  # [nb, Q, P]
    # padded query rows (beyond T) still see their own zero key, so no row is fully masked (SDPA would give NaN)
    mask = torch.cat([prefix_mask.expand(n_blocks, Q, P), window_mask], dim=-1)

    y = F.scaled_dot_product_attention(
        q_blocks.reshape(B * H, n_blocks, Q, Dh),
        k_all.reshape(B * H, n_blocks, P + span, Dh),
        v_all.reshape(B * H, n_blocks, P + span, Dh),
        attn_mask=mask,
    )
    # reshape, not view: fused CUDA kernels return y in [B, H, nb, Q, Dh] shape with [B, nb, Q, H, Dh] strides
    return y.reshape(B, H, n_blocks * Q, Dh)[:, :, :T]


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, optional sliding window and an always-visible prefix.

    window None = full causal attention; otherwise a query at position t sees keys t-window+1 .. t and the first
    n_prefix positions of the stream. forward(x [B, T, D], cache) -> (y [B, T, D], new cache); cache None starts a
    stream at position 0, and feeding a stream in pieces with the returned cache gives the same outputs as one call.
    impl: "sdpa" (PyTorch's scaled_dot_product_attention, blocked by window on long inputs) or "flex" (FlexAttention
    with a block-sparse mask, for CUDA; titans/models/flex.py) for calls of more than one token; one-token decoding
    uses SDPA either way.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        rope_base: float,
        window: int | None = None,
        n_prefix: int = 0,
        impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); pick n_heads that divides it"
            )
        if (d_model // n_heads) % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {d_model // n_heads} must be even for RoPE")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None (full attention), got {window}")
        if n_prefix < 0:
            raise ValueError(f"n_prefix must be >= 0, got {n_prefix}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_base = rope_base
        self.window = window
        self.n_prefix = n_prefix
        self.impl = impl
        if impl == "flex":
            flex_available()  # a torch without FlexAttention fails here, when the model is built
        self.qkv = Linear(d_model, 3 * d_model, bias=False)
        self.out = ResidualProjection(d_model, d_model)

    @classmethod
    def persistent_window(cls, cfg: ModelConfig) -> Attention:
        """MAG's and MAL's attention: a sliding window of cfg.window with the N_p persistent tokens as the
        always-visible prefix (Eqs. 26-27, 29), in cfg.attention_impl."""
        return cls(
            cfg.d_model,
            cfg.n_heads,
            cfg.rope_base,
            window=cfg.window,
            n_prefix=cfg.persistent_memory_size,
            impl=cfg.attention_impl,
        )

    def _project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] at positions start .. start+T-1 -> rotated q, k and v, each [B, H, T, Dh]."""
        B, T, _ = x.shape
        # decoding (one token, no gradients): one matmul against a cached transposed copy of the weight
        qkv = decode_linear(x[:, 0], self.qkv) if T == 1 and not torch.is_grad_enabled() else self.qkv(x)
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = rope_cache(positions, self.head_dim, self.rope_base, x.dtype, x.device)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, T, Dh] -> output projection of [B, T, D]."""
        B, H, T, Dh = y.shape
        if T == 1 and not torch.is_grad_enabled():
            return decode_linear(y.reshape(B, H * Dh), self.out).unsqueeze(1)
        return self.out(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        if x.dim() != 3 or x.shape[1] < 1:
            raise ValueError(f"x must be [B, T, D] with T >= 1, got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        seen = 0 if cache is None else cache.seen
        q, k, v = self._project(x, seen)
        if cache is None:
            empty = k.new_zeros(B, self.n_heads, 0, self.head_dim)
            cache = KVCache(empty, empty, empty, empty, 0)
        elif cache.k_recent.shape[0] != B:
            raise ValueError(
                f"cache batch size {cache.k_recent.shape[0]} != input batch size {B}; use one cache per stream"
            )

        k_tail = torch.cat([cache.k_recent, k], dim=2)  # positions seen-R .. seen+T-1
        v_tail = torch.cat([cache.v_recent, v], dim=2)
        k_prefix, v_prefix = self._prefix_with(cache, k, v, seen + T)  # read below and kept in the next cache
        if T == 1:
            # one query (decoding) at position seen sees every key of the tail (for a window, the tail is exactly its
            # last `window` positions) and the prefix positions the tail does not hold: no mask, no blocking
            k_keys, v_keys = k_tail, v_tail
            if self.window is not None and cache.k_prefix.shape[2] > 0:
                cut = min(cache.k_prefix.shape[2], max(0, seen - k_tail.shape[2] + 1))
                if cut > 0:
                    k_keys = torch.cat([cache.k_prefix[:, :, :cut], k_tail], dim=2)
                    v_keys = torch.cat([cache.v_prefix[:, :, :cut], v_tail], dim=2)
            y = F.scaled_dot_product_attention(q, k_keys, v_keys)
        elif self.impl == "flex":
            y = flex_window_attention(q, k_prefix, v_prefix, k_tail, v_tail, seen, self.window)
        elif self.window is None or seen + T <= self.window:
            # every visible key lies in the tail (for a window: nothing has slid out yet), so plain causal attention
            if seen == 0:
                y = F.scaled_dot_product_attention(q, k_tail, v_tail, is_causal=True)
            else:
                positions = torch.arange(seen + T, device=x.device)
                mask = attention_mask(positions[seen:], positions, None, 0)
                y = F.scaled_dot_product_attention(q, k_tail, v_tail, attn_mask=mask)
        else:
            y = _blocked_window_attention(q, k_prefix, v_prefix, k_tail, v_tail, seen, self.window, self.n_prefix)
        return self._merge(y), self._next_cache(k_prefix, v_prefix, seen + T, k_tail, v_tail)

    def _prefix_with(
        self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, seen: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values [B, H, P, Dh] once the stream has seen `seen` positions: the cached ones plus
        those among the new k/v [B, H, T, Dh] (windowed attention; empty for full attention)."""
        n_new_prefix = max(0, min(self.n_prefix, seen) - cache.k_prefix.shape[2])
        if self.window is None or n_new_prefix == 0:  # full attention, or the prefix is complete: no copy per call
            return cache.k_prefix, cache.v_prefix
        k_prefix = torch.cat([cache.k_prefix, k[:, :, :n_new_prefix]], dim=2)
        v_prefix = torch.cat([cache.v_prefix, v[:, :, :n_new_prefix]], dim=2)
        return k_prefix, v_prefix

    def _next_cache(
        self,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
        seen: int,
        k_recent: torch.Tensor,
        v_recent: torch.Tensor,
    ) -> KVCache:
        """The cache after `seen` positions: the prefix (`_prefix_with`) and k_recent/v_recent, the old recent keys
        and values followed by the new ones [B, H, R + T, Dh]; with a window only the last window-1 of them stay."""
        if self.window is None:
            return KVCache(k_prefix, v_prefix, k_recent, v_recent, seen)
        keep = min(seen, self.window - 1)
        start = k_recent.shape[2] - keep
        return KVCache(k_prefix, v_prefix, k_recent[:, :, start:], v_recent[:, :, start:], seen)

    def fixed_cache(self, cache: KVCache, capacity: int) -> FixedKVCache:
        """`cache` laid out in fixed slots for `decode_fixed`; capacity: stream positions the decode may reach (full
        attention holds them all; a window holds `window`)."""
        seen = cache.seen
        batch, heads, _, head_dim = cache.k_recent.shape
        prefix = self.n_prefix if self.window is not None else 0
        ring = self.window if self.window is not None else max(capacity, seen + 1)
        slots = []
        for stored, recent in ((cache.k_prefix, cache.k_recent), (cache.v_prefix, cache.v_recent)):
            buffer = recent.new_zeros(batch, heads, prefix + ring, head_dim)
            buffer[:, :, : stored.shape[2]] = stored
            # the recent keys are positions seen-R' .. seen-1, in order: each goes to slot prefix + (s mod ring)
            recent_positions = torch.arange(seen - recent.shape[2], seen, device=recent.device)
            buffer[:, :, prefix + recent_positions % ring] = recent
            slots.append(buffer)
        return FixedKVCache(slots[0], slots[1], torch.tensor(seen, device=cache.k_recent.device))

    def decode_fixed(self, row: torch.Tensor, fixed: FixedKVCache) -> tuple[torch.Tensor, FixedKVCache]:
        """One token on a fixed-shape cache, forward only: row [B, D] -> (y [B, D], cache after it).

        The same attention as `forward` (tested), with masks in place of growing shapes: the token writes its key and
        value to its ring slot (and, among the first n_prefix positions, to its prefix slot) and attends to the ring
        slots that hold a position (all of them in the window) and to the prefix slots that slid out of the window.
        """
        B, d = row.shape
        H, Dh = self.n_heads, self.head_dim
        p = fixed.position
        prefix = self.n_prefix if self.window is not None else 0
        ring = fixed.keys.shape[2] - prefix
        q, k, v = decode_linear(row, self.qkv).view(B, 3, H, 1, Dh).unbind(1)  # each [B, H, 1, Dh]
        cos, sin = rope_cache(p.view(1), Dh, self.rope_base, row.dtype, row.device)
        q, k = apply_rope(torch.stack([q, k]), cos, sin).unbind(0)
        slots = torch.arange(prefix + ring, device=row.device)
        in_ring = slots - prefix  # ring index of each slot (negative for prefix slots)
        write = torch.where(slots < prefix, slots == p, in_ring == p % ring)[:, None]  # [S, 1]
        keys = torch.where(write, k, fixed.keys)
        values = torch.where(write, v, fixed.values)
        held = p - (p - in_ring) % ring  # the position a ring slot holds after this write (< 0: none yet)
        if self.window is None:
            visible = held >= 0
        else:
            visible = torch.where(slots < prefix, slots <= p - self.window, held >= 0)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[None, :])
        return decode_linear(y.reshape(B, d), self.out), FixedKVCache(keys, values, p + 1)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer computed with the dense reference_attention, for a whole stream from position 0. [B, T, D]."""
        q, k, v = self._project(x, 0)
        return self._merge(reference_attention(q, k, v, self.window, self.n_prefix))


class GatedCombine(nn.Module):
    """The paper's "y (x) M(x)" for MAG (Eq. 28) and MAC (Eq. 25): o = W_o(RMSNorm(y) * sigmoid(RMSNorm(m))).

    "we normalize the outputs y and M(x) using learnable vector-valued weights, followed by a non-linearity" (v1 §4.2):
    the RMSNorm gains are those vectors, and the sigmoid of the normalised memory branch gates the other branch
    channel by channel. y, m [B, T, D] -> [B, T, D], projected into the residual stream.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_y = RMSNorm(dim)
        self.norm_m = RMSNorm(dim)
        self.out = ResidualProjection(dim, dim)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        gated = self.norm_y(y) * torch.sigmoid(self.norm_m(m))
        if gated.dim() == 2 and not torch.is_grad_enabled():
            return decode_linear(gated, self.out)  # decoding rows [B, dim]
        return self.out(gated)
