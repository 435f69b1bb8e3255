"""The fused memory scan: `chunked_memory`'s contract and results as one op with a hand-written backward.

`chunked_memory` is the readable dual form, differentiated by autograd through a checkpointed loop over chunks: a
long chain of small ops, each with autograd bookkeeping. `fused_memory` computes the same function as one op over
the whole call (`csrc/scan.cpp`, or the same algorithm in tensor ops, `scan_torch.py`):

1. Forward: per chunk, the coefficients of the dual form from the gates (decays, carries, the masked mixes
   C_{t,i} theta_i), the keys through the anchor network, the outputs, the chunk-end state. For the backward it
   keeps every chunk's start state and intermediates, or, when they would not fit `KEEP_ALL_BYTES` (or a group
   size is given), one start state per group of chunks (`scan_stride`); it builds no autograd graph.
2. Backward: the reverse scan. Per chunk, from its kept state (or a group recomputed from the last kept one), the
   chunk's vector-Jacobian product by hand, down to the gates; the gradients of (W, S) carried to the chunk before.

The options it does not cover run `chunked_memory` unchanged: channel-wise forgetting, residual + LayerNorm inside
the memory, and calls that collect `stats` (see `fused_supports`). Tests hold `fused_memory` equal to
`chunked_memory` and `naive_memory` in outputs, states and every gradient (float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from titans.memory import scan_torch
from titans.memory.chunked import chunked_memory
from titans.memory.inputs import GateArg, LayerGates, prepare
from titans.memory.network import MemoryMLP
from titans.memory.scan_torch import ScanGates, ScanSettings
from titans.memory.state import MemoryState

BACKENDS = ("auto", "cpp", "torch", "triton")


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


# The automatic checkpoint policy keeps every chunk while a call's kept tensors fit this many bytes (per call of the
# layer): the backward then recomputes nothing. Above it, groups of about sqrt(chunks x memories / threads) chunks
# balance the kept states (chunks / group x memories) against a group's recomputed states (group x threads).
KEEP_ALL_BYTES = 512 << 20


def scan_stride(
    checkpoint_every: int | None, n: int, memories: int, network: MemoryMLP, chunk_size: int, itemsize: int
) -> int:
    """Chunks per kept state: 1 keeps every chunk (and its intermediates), k > 1 recomputes groups of k in backward."""
    if checkpoint_every is not None:
        return checkpoint_every if 0 < checkpoint_every < n else 1
    state = sum(2 * d_out * d_in for d_out, d_in in network.shapes)
    # the kept intermediates per chunk (csrc/scan.cpp, SlotLayout): K, G, B, Z (hidden layers), G (last), R, scales
    slot = sum(chunk_size * d_out * (4 if i < network.depth - 1 else 1) for i, (d_out, _) in enumerate(network.shapes))
    slot += network.depth * (chunk_size * chunk_size + chunk_size)
    if n * memories * (state + slot) * itemsize <= KEEP_ALL_BYTES:
        return 1
    group = round(math.sqrt(n * memories / max(torch.get_num_threads(), 1)))
    return min(max(group, 2), n)


# "auto" on CUDA runs the Triton kernels where they apply (`scan_triton`); False runs the tensor-op scan there
# instead (benchmarks/bench_cuda.py times both).
TRITON_ON_CUDA = True


def _kernels(backend: str, q: Tensor, network: MemoryMLP, settings: ScanSettings):
    """The module whose scan_forward / scan_backward run this call: `scan_triton` ("triton", or "auto" on CUDA when
    triton imports; the calls its kernels do not cover run `scan_torch`), the C++ op ("cpp", "auto" on CPU), or
    `scan_torch` ("torch"; "auto" elsewhere or when the C++ op cannot be built)."""
    device = q.device
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and TRITON_ON_CUDA):
        from titans.memory import scan_triton

        if (problem := scan_triton.unavailable(q)) is not None:
            if backend == "triton":
                raise RuntimeError(problem)
            return scan_torch  # auto on CUDA without triton
        return scan_torch if scan_triton.unsupported(network, settings, q) is not None else scan_triton
    if backend == "torch" or (backend == "auto" and device.type != "cpu"):
        return scan_torch
    from titans.memory import scan_cpp

    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"fused_memory backend 'cpp' runs on CPU tensors, got {device.type}; use 'auto'")
        return scan_cpp.kernels(required=True)
    return scan_cpp.kernels(required=False) or scan_torch


class _FusedScan(torch.autograd.Function):
    """scan_forward with scan_backward as its backward. Tensors after the settings: q, k, v [N, T, D]; theta per
    layer; eta per layer (with momentum); alpha per layer (with forgetting); weights, momentum and (when the call
    resumes mid-chunk) anchor per layer."""

    @staticmethod
    def forward(ctx, settings: ScanSettings, kernels, layout: tuple[int, bool, bool, bool], save: bool, *tensors):
        depth, momentum, forgetting, separate_anchor = layout
        groups = _split(tensors, layout)
        q, k, v = groups["qkv"]
        gates = _gates(groups, depth)
        y, w_end, s_end, w_last, saved = kernels.scan_forward(
            q, k, v, gates, groups["weights"], groups["momentum"], groups["anchor"], settings, save
        )
        n_inputs = 3 + depth * (1 + momentum + forgetting)  # q, k, v and the gates lead `tensors`
        if save:
            ctx.save_for_backward(*tensors[:n_inputs], *groups["anchor"], *saved)
        ctx.settings, ctx.kernels, ctx.layout, ctx.n_inputs = settings, kernels, layout, n_inputs
        ctx.state_shapes = [w.shape for w in groups["weights"]]
        return (y, *w_end, *s_end, *w_last)

    @staticmethod
    def backward(ctx, grad_y: Tensor, *grads: Tensor):
        depth, momentum, forgetting, separate_anchor = ctx.layout
        saved, n_inputs = ctx.saved_tensors, ctx.n_inputs
        groups = _split(saved[:n_inputs], (depth, momentum, forgetting, False), states=False)
        q, k, v = groups["qkv"]
        gates = _gates(groups, depth)
        anchor = saved[n_inputs : n_inputs + (depth if separate_anchor else 0)]
        kept = saved[n_inputs + len(anchor) :]

        def filled(gs: Sequence[Tensor | None]) -> list[Tensor]:
            return [
                (g if g is not None else q.new_zeros(shape)).contiguous()
                for g, shape in zip(gs, ctx.state_shapes, strict=True)
            ]

        grad_y = torch.zeros_like(q) if grad_y is None else grad_y.contiguous()
        grad_w, grad_s, grad_last = (filled(grads[i * depth : (i + 1) * depth]) for i in range(3))
        dq, dk, dv, d_gates, d_w, d_s, d_anchor = ctx.kernels.scan_backward(
            grad_y, grad_w, grad_s, grad_last, q, k, v, gates, anchor, kept, ctx.settings
        )
        d_theta = [g.theta for g in d_gates]
        d_eta = [g.eta for g in d_gates] if momentum else []
        d_alpha = [g.alpha for g in d_gates] if forgetting else []
        return (None, None, None, None, dq, dk, dv, *d_theta, *d_eta, *d_alpha, *d_w, *d_s, *d_anchor)


def _split(tensors: Sequence[Tensor], layout: tuple[int, bool, bool, bool], states: bool = True) -> dict:
    """The op's flat tensor arguments by role (see `_FusedScan`)."""
    depth, momentum, forgetting, separate_anchor = layout
    counts = [("qkv", 3), ("theta", depth), ("eta", depth if momentum else 0), ("alpha", depth if forgetting else 0)]
    if states:
        counts += [("weights", depth), ("momentum", depth), ("anchor", depth if separate_anchor else 0)]
    out, i = {}, 0
    for name, count in counts:
        out[name] = list(tensors[i : i + count])
        i += count
    return out


def _gates(groups: dict, depth: int) -> list[ScanGates]:
    return [
        ScanGates(
            groups["theta"][i],
            groups["eta"][i] if groups["eta"] else None,
            groups["alpha"][i] if groups["alpha"] else None,
        )
        for i in range(depth)
    ]


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
    checkpoint_every: int | None = None,
    backend: str = "auto",
    exact_last_layer: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Same contract and results as `chunked_memory` and `naive_memory`; q, k, v [B, H, T, D] -> y [B, H, T, D].

    checkpoint_every: a call of more chunks than this keeps the chunk-start state only every this many chunks for
    backward and recomputes the others (0 keeps every one; None: every one while the kept tensors of the call fit
    KEEP_ALL_BYTES, else groups sized by `scan_stride`; results are identical either way).
    backend: "cpp" (the compiled CPU op; an error if it cannot be built), "torch" (tensor ops, any device),
    "triton" (the Triton kernels, `scan_triton`; tensor ops for what they do not cover; an error without triton), or
    "auto" (CPU: the C++ op when it builds and loads, else tensor ops; CUDA: as "triton" when triton imports, else
    tensor ops).
    """
    if backend not in BACKENDS:
        raise ValueError(f"fused_memory backend must be one of {BACKENDS}, got {backend!r}")
    gates, state = prepare(q, k, v, theta, eta, alpha, network, state, chunk_size)
    length = q.shape[2]
    if fused_supports(network, gates, stats) is not None or length == 0:
        return chunked_memory(
            q, k, v, theta, eta, alpha, network, state, chunk_size, stats, grad_clip, checkpoint_every,
            exact_last_layer=exact_last_layer,
        )  # fmt: skip
    batch, heads = q.shape[:2]
    lengths = span_lengths(state.position, length, chunk_size)
    n, depth = len(lengths), network.depth

    def flat(t: Tensor) -> Tensor:  # [B, H, ...] -> [N, ...], contiguous for the op
        return t.reshape(batch * heads, *t.shape[2:]).contiguous()

    momentum, forgetting = gates[0].eta is not None, gates[0].alpha is not None
    thetas = [flat(g.theta) for g in gates]
    etas = [flat(g.eta) for g in gates] if momentum else []
    alphas = [flat(g.alpha) for g in gates] if forgetting else []
    resumes_mid_chunk = state.position % chunk_size != 0
    anchor = [flat(a) for a in state.anchor] if resumes_mid_chunk else []
    tensors = (
        flat(q), flat(k), flat(v), *thetas, *etas, *alphas,
        *(flat(w) for w in state.weights), *(flat(s) for s in state.momentum), *anchor,
    )  # fmt: skip
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    stride = scan_stride(checkpoint_every, n, batch * heads, network, chunk_size, q.element_size())
    clip = float(grad_clip or 0.0)
    settings = ScanSettings(tuple(lengths), chunk_size, network.activation, clip, stride, exact_last_layer)
    layout = (depth, momentum, forgetting, resumes_mid_chunk)
    outputs = _FusedScan.apply(settings, _kernels(backend, q, network, settings), layout, save, *tensors)

    def unflat(t: Tensor) -> Tensor:
        return t.reshape(batch, heads, *t.shape[1:])

    y = unflat(outputs[0])
    w_end = tuple(unflat(t) for t in outputs[1 : 1 + depth])
    s_end = tuple(unflat(t) for t in outputs[1 + depth : 1 + 2 * depth])
    position = state.position + length
    if position % chunk_size == 0:
        anchor_end = w_end
    elif n > 1 or not resumes_mid_chunk:  # the last span started a chunk: its start weights are the anchor
        anchor_end = tuple(unflat(t) for t in outputs[1 + 2 * depth :])
    else:  # the whole call stayed inside the chunk the stream was in
        anchor_end = tuple(state.anchor)
    return y, MemoryState(w_end, s_end, anchor_end, position)
