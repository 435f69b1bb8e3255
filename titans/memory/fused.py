"""The fused memory scan: `chunked_memory`'s contract and results as one op with a hand-written backward.

`chunked_memory` is the readable dual form, differentiated by autograd through a checkpointed loop over chunks: a
long chain of small ops, each with autograd bookkeeping. `fused_memory` computes the same function in three steps:

1. The gates become chunk coefficients (decays, carries, the masked mixes C_{t,i} theta_i, the chunk-end rows) for
   every chunk at once, through `ChunkCoefficients.build` with autograd: a few batched ops for the whole call.
2. One op scans the chunks (`scan_torch.scan_forward`, or the same algorithm in C++, `csrc/scan.cpp`). It keeps
   only chunk-start states (every `checkpoint_every` chunks when a call has more chunks than that, else all), and
   builds no autograd graph.
3. Its backward is the reverse scan: per chunk, recompute the chunk from its start state, apply the chunk's
   vector-Jacobian product by hand, and carry the gradients of (W, S) to the previous chunk. Gradients of the
   coefficients go back through step 1's graph to theta, eta and alpha.

The options it does not cover run `chunked_memory` unchanged: channel-wise forgetting, residual + LayerNorm inside
the memory, and calls that collect `stats` (see `fused_supports`). Tests hold `fused_memory` equal to
`chunked_memory` and `naive_memory` in outputs, states and every gradient (float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from titans.memory import scan_torch
from titans.memory.chunked import ChunkCoefficients, chunked_memory
from titans.memory.inputs import GateArg, LayerGates, prepare
from titans.memory.network import MemoryMLP
from titans.memory.scan_torch import COEFFICIENTS_PER_LAYER, ScanCoefficients, ScanSettings
from titans.memory.state import MemoryState

BACKENDS = ("auto", "cpp", "torch")


def fused_supports(network: MemoryMLP, gates: Sequence[LayerGates], stats: dict | None) -> str | None:
    """None when the fused scan computes this call, else the reason it falls back to `chunked_memory`."""
    if stats is not None:
        return "stats are collected"
    if network.residual_norm:
        return "residual + LayerNorm memory"
    if any(g.alpha is not None and g.alpha.dim() == 4 for g in gates):
        return "channel-wise forgetting"
    return None


def span_lengths(position: int, length: int, chunk_size: int) -> list[int]:
    """Tokens of each span of a call: spans follow the stream's chunk grid (a stream stopped mid-chunk first
    finishes that chunk), so all but the first and the last have `chunk_size` tokens."""
    lengths, start = [], 0
    while start < length:
        stop = min(length, start + chunk_size - (position + start) % chunk_size)
        lengths.append(stop - start)
        start = stop
    return lengths


def to_chunks(t: Tensor, lengths: Sequence[int], chunk_size: int, fill: float) -> Tensor:
    """[B, H, T, ...] -> [B, H, n, b, ...]: each span in its own chunk, a short first or last span padded with
    `fill` after its tokens (so the chunk's products from its start are unchanged on its real rows)."""
    n, b = len(lengths), chunk_size
    if all(r == b for r in lengths):
        return t.reshape(*t.shape[:2], n, b, *t.shape[3:])
    # the first span, the whole chunks in the middle (None), the last span
    parts = [lengths[0], None, lengths[-1]] if n > 1 else [lengths[0]]
    pieces = t.split([lengths[0], sum(lengths[1:-1]), lengths[-1]] if n > 1 else [lengths[0]], dim=2)
    out = []
    for piece, r in zip(pieces, parts, strict=True):
        if r is None:  # the whole chunks in the middle
            out.append(piece.reshape(*t.shape[:2], -1, b, *t.shape[3:]))
            continue
        pad = [0, 0] * (t.dim() - 3) + [0, b - r]
        out.append(F.pad(piece, pad, value=fill).unsqueeze(2))
    return torch.cat(out, dim=2)


def from_chunks(y: Tensor, lengths: Sequence[int], chunk_size: int) -> Tensor:
    """[B, H, n, b, D] -> [B, H, T, D], dropping the padding rows that `to_chunks` added."""
    n, b = len(lengths), chunk_size
    flat = y.reshape(y.shape[0], y.shape[1], n * b, y.shape[-1])
    if all(r == b for r in lengths):
        return flat
    if n == 1:
        return flat[:, :, : lengths[0]]
    middle = (n - 2) * b
    return torch.cat(
        [flat[:, :, : lengths[0]], flat[:, :, b : b + middle], flat[:, :, (n - 1) * b :][:, :, : lengths[-1]]], 2
    )


def scan_coefficients(gates: LayerGates, lengths: Sequence[int], chunk_size: int) -> ScanCoefficients:
    """The scan's coefficients of one layer ([B, H, n, ...], see `scan_torch`) from its gates, with autograd."""
    theta = to_chunks(gates.theta, lengths, chunk_size, 0.0)
    # padding rows: no write (theta 0), eta 1 and alpha 0, so the products up to a real row are the real ones
    eta = None if gates.eta is None else to_chunks(gates.eta, lengths, chunk_size, 1.0)
    alpha = None if gates.alpha is None else to_chunks(gates.alpha, lengths, chunk_size, 0.0)
    co = ChunkCoefficients.build(theta, eta, alpha)
    n = len(lengths)
    last = torch.tensor(lengths, device=theta.device) - 1
    chunk = torch.arange(n, device=theta.device)
    end_decay, end_mix = co.decay[:, :, chunk, last], co.mix[:, :, chunk, last, :]
    empty = theta.new_zeros(0)
    if co.carry is None:
        one_hot = torch.nn.functional.one_hot(last, chunk_size).to(theta)  # [n, b]: theta_r at the last real row
        return ScanCoefficients(co.decay, empty, co.mix, end_decay, empty, end_mix, empty, theta * one_hot)
    # E_r and theta_i E_r / E_i from the padded last row equal those of row r - 1 (padding has eta 1)
    end_carry = co.carry[:, :, chunk, last]
    return ScanCoefficients(co.decay, co.carry, co.mix, end_decay, end_carry, end_mix, co.mom_decay, co.mom_mix)


def _kernels(backend: str):
    """The module whose scan_forward / scan_backward run the scan: the C++ op, or `scan_torch`."""
    if backend == "torch":
        return scan_torch
    from titans.memory import scan_cpp

    if backend == "cpp":
        return scan_cpp.kernels(required=True)
    return scan_cpp.kernels(required=False) or scan_torch


class _FusedScan(torch.autograd.Function):
    """scan_forward with scan_backward as its backward. Inputs after the settings: q, k, v [N, n, b, D], 8 per-layer
    coefficients (ScanCoefficients order), weights, momentum and (maybe) anchor per layer."""

    @staticmethod
    def forward(ctx, settings: ScanSettings, kernels, depth: int, save: bool, *tensors: Tensor):
        q, k, v = tensors[:3]
        split = 3 + COEFFICIENTS_PER_LAYER * depth
        flat_co = tensors[3:split]
        coefficients = [
            ScanCoefficients(*flat_co[i * COEFFICIENTS_PER_LAYER : (i + 1) * COEFFICIENTS_PER_LAYER])
            for i in range(depth)
        ]
        weights, momentum = tensors[split : split + depth], tensors[split + depth : split + 2 * depth]
        anchor = tensors[split + 2 * depth :]
        y, w_end, s_end, w_last, saved = kernels.scan_forward(
            q, k, v, coefficients, weights, momentum, anchor, settings, save
        )
        if save:
            ctx.save_for_backward(q, k, v, *flat_co, *anchor, *saved)
        ctx.settings, ctx.kernels, ctx.depth, ctx.n_anchor = settings, kernels, depth, len(anchor)
        ctx.state_like = [(w.shape, w.dtype) for w in weights]
        return (y, *w_end, *s_end, *w_last)

    @staticmethod
    def backward(ctx, grad_y: Tensor, *grads: Tensor):
        depth, settings = ctx.depth, ctx.settings
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        split = 3 + COEFFICIENTS_PER_LAYER * depth
        flat_co = saved[3:split]
        coefficients = [
            ScanCoefficients(*flat_co[i * COEFFICIENTS_PER_LAYER : (i + 1) * COEFFICIENTS_PER_LAYER])
            for i in range(depth)
        ]
        anchor = saved[split : split + ctx.n_anchor]
        kept = saved[split + ctx.n_anchor :]

        def filled(gs: Sequence[Tensor | None]) -> list[Tensor]:
            return [
                g if g is not None else q.new_zeros(shape) for g, (shape, _) in zip(gs, ctx.state_like, strict=True)
            ]

        grad_y = grad_y if grad_y is not None else torch.zeros_like(q)
        grad_w, grad_s, grad_last = (filled(grads[i * depth : (i + 1) * depth]) for i in range(3))
        dq, dk, dv, d_co, d_w, d_s, d_anchor = ctx.kernels.scan_backward(
            grad_y.contiguous(),
            [g.contiguous() for g in grad_w],
            [g.contiguous() for g in grad_s],
            [g.contiguous() for g in grad_last],
            q, k, v, coefficients, anchor, kept, settings,
        )  # fmt: skip
        flat_d_co = [None if g.numel() == 0 else g for layer in d_co for g in layer]
        return (None, None, None, None, dq, dk, dv, *flat_d_co, *d_w, *d_s, *d_anchor)


def fused_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: GateArg,
    eta: GateArg,
    alpha: GateArg,
    network: MemoryMLP,
    state: MemoryState | None = None,
    chunk_size: int = 16,
    stats: dict[str, Tensor] | None = None,
    grad_clip: float | None = None,
    checkpoint_every: int = 16,
    backend: str = "auto",
) -> tuple[Tensor, MemoryState]:
    """Same contract and results as `chunked_memory` and `naive_memory`; q, k, v [B, H, T, D] -> y [B, H, T, D].

    checkpoint_every: a call of more chunks than this keeps the chunk-start state only every this many chunks for
    backward and recomputes the others (0 keeps every one). backend: "cpp" (the compiled op; an error if it cannot
    be built), "torch" (tensor ops), or "auto" (the C++ op when it builds and loads, else tensor ops).
    """
    if backend not in BACKENDS:
        raise ValueError(f"fused_memory backend must be one of {BACKENDS}, got {backend!r}")
    gates, state = prepare(q, k, v, theta, eta, alpha, network, state, chunk_size)
    length = q.shape[2]
    if fused_supports(network, gates, stats) is not None or length == 0:
        return chunked_memory(
            q, k, v, theta, eta, alpha, network, state, chunk_size, stats, grad_clip, checkpoint_every
        )
    batch, heads, _, dim = q.shape
    lengths = span_lengths(state.position, length, chunk_size)
    n = len(lengths)
    depth = network.depth

    # coefficients once per distinct gate set (shared gates are one set for every layer)
    built: dict[tuple[int, ...], ScanCoefficients] = {}
    coefficients = []
    for g in gates:
        key = (id(g.theta), id(g.eta), id(g.alpha))
        if key not in built:
            built[key] = scan_coefficients(g, lengths, chunk_size)
        coefficients.append(built[key])

    def flat(t: Tensor) -> Tensor:  # [B, H, ...] -> [N, ...], contiguous for the op
        return t.reshape(batch * heads, *t.shape[2:]).contiguous()

    q_c, k_c, v_c = (flat(to_chunks(t, lengths, chunk_size, 0.0)) for t in (q, k, v))
    flat_co = [flat(t) if t.numel() else t for layer in coefficients for t in layer]
    weights = [flat(w) for w in state.weights]
    momentum = [flat(s) for s in state.momentum]
    resumes_mid_chunk = state.position % chunk_size != 0
    anchor = [flat(a) for a in state.anchor] if resumes_mid_chunk else []

    tensors = (q_c, k_c, v_c, *flat_co, *weights, *momentum, *anchor)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    stride = checkpoint_every if 0 < checkpoint_every < n else 1
    settings = ScanSettings(tuple(lengths), network.activation, float(grad_clip or 0.0), stride, eta_used(gates))
    outputs = _FusedScan.apply(settings, _kernels(backend), depth, save, *tensors)

    def unflat(t: Tensor) -> Tensor:
        return t.reshape(batch, heads, *t.shape[1:])

    y = from_chunks(unflat(outputs[0]), lengths, chunk_size)
    w_end = tuple(unflat(t) for t in outputs[1 : 1 + depth])
    s_end = tuple(unflat(t) for t in outputs[1 + depth : 1 + 2 * depth])
    position = state.position + length
    if position % chunk_size == 0:
        anchor_end = w_end
    elif n > 1 or not resumes_mid_chunk:  # the last span started a chunk: its start weights are the anchor
        anchor_end = tuple(unflat(t) for t in outputs[1 + 2 * depth :])
    else:  # the whole call stayed inside the chunk the stream was in
        anchor_end = tuple(state.anchor)
    del dim
    return y, MemoryState(w_end, s_end, anchor_end, position)


def eta_used(gates: Sequence[LayerGates]) -> bool:
    """Whether momentum is on (eta given); the contract has it on for every layer or for none."""
    return gates[0].eta is not None
