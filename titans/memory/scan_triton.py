"""The fused memory scan as Triton kernels: every chunk of a memory in one program, the state on chip.

`scan_torch.scan_forward` loops over chunks in Python, a few dozen tensor ops per chunk and layer; on a GPU each is
a kernel launch, and the host cannot launch them as fast as the GPU runs them. Here the whole forward of one memory
(one sequence and head) is one Triton program: it loads the start state (W, S per layer) once, walks the chunks in
order with the state in registers, and writes the outputs, the end state, the weights at the start of the last span
and (for the backward) the chunk-start states every `settings.stride` chunks, in the layout `scan_torch` keeps. The
backward, `scan_backward`, is the reverse scan as one kernel too (`scan_triton_backward.py`).

What the kernel computes per span (the dual form of `scan_torch`, titans/memory/README.md "The fused scan"):
    key path at the anchor W'   K^1 = k W'^1T, A^2 = sigma(K^1), K^2 = A^2 W'^2T, G^2 = 2 (K^2 - v),
                                G^1 = (G^2 W'^2) sigma'(K^1)                      (depth 1: G^1 = 2 (k W'^1T - v))
    clip scales                 s^l = clip / max(clip, |G^l| |A^l|) per row (1 without the clip)
    query path                  Z^l = decay . (Q W^lT) + carry . (Q S^lT) - ((Q A^lT) * mix * s^l) G^l, Q <- sigma(Z)
    end state                   W <- A_r W + rho_r S - G^T ((omega s) . A),  S <- E_r S - G^T ((mom_mix s) . A)
The gates' coefficients (decay, carry, mix, the end row) are built before the launch for all spans at once, in
tensor ops (`_coefficients`); they are O(T x chunk) numbers next to the state's O(T x width^2) arithmetic.

Coverage: memories of depth 1 and 2 (NeurIPS §3.3's default L_M = 2, and the linear memory), GELU and SiLU,
momentum on or off, forgetting on or off (one gate per token; channel-wise forgetting and residual + LayerNorm
already route to `chunked_memory` in `fused.py`), the inner-gradient clip, partial first and last spans and a first
span that resumes mid-chunk with its own anchor, float32 and float64. Widths and the chunk are padded to powers of
two of at least 16 (`tl.dot`'s smallest tile) with zeros, which leave every result unchanged: a zero row of W stays
zero and adds nothing. The exact last layer (`exact_last_layer`) is solved row by row inside each span in the forward
kernel (`_exact_last_layer`); its backward runs in tensor ops. `unsupported` names what is not covered (deeper
memories, states too wide for the forward kernel); `fused_memory` runs those calls with `scan_torch` instead.
Depth-2 layers wider than UNTILED_MAX_LAYER_ELEMENTS run the forward and reverse scan tiled over the hidden width
(`scan_triton_tiled_forward.py`, `scan_triton_tiled.py`), except the exact last layer (the untiled forward, and the
tensor-op reverse scan as for wide depth-1 memories).

On a GPU the kernels are compiled; with TRITON_INTERPRET=1 set before Python starts they run in Triton's interpreter
(numpy), on CPU tensors too: that is how tests/test_scan_triton.py checks them without a GPU.
Float32 products use `input_precision="ieee"`: TF32 would round the inner gradients to 10 bits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from titans.memory import scan_torch, scan_triton_tiled
from titans.memory.network import MemoryMLP
from titans.memory.scan_torch import ScanGates, ScanSettings
from titans.memory.scan_triton_backward import scan_backward as _kernel_backward
from titans.memory.scan_triton_parts import (
    INTERPRETING,
    _activation,
    _block,
    _clip_scale,
    _coefficients,
    _dual_layer,
    _end_state,
    _key_gradients,
    _span_coefficients,
    _span_rows,
    _span_tensors,
    _two_layers,
    jit,
    tl,
    triton,
)
from titans.memory.scan_triton_tiled import _scan_backward_tiled_kernel
from titans.memory.scan_triton_tiled_forward import _scan_tiled_kernel

# The largest layer (out x in, padded) the kernels cover, and the largest the untiled kernels (whole layers in
# registers) run: wider depth-2 memories take the kernels tiled over the hidden width (`scan_triton_tiled*.py`).
# Chosen from ptxas's reports, compiled for sm_90 here with chunks of 16 (register spills per thread, untiled /
# tiled): 64 x 16 forward 1.0 KB / none, backward 23 KB / 72 B; 128 x 32 forward 31 KB / none, backward 92 KB /
# 0.5 KB; 256 x 64 forward 110 KB / none, backward (untiled 151 KB of shared memory already at 128 x 32) / 1.9 KB.
# The untiled kernels stay the path of depth-1 memories and of the exact last layer's forward; the untiled backward
# launches up to 32 x 128 (151 KB of shared memory there, of an H100's 227 KB).
MAX_LAYER_ELEMENTS = 64 * 256
UNTILED_MAX_LAYER_ELEMENTS = 16 * 32
UNTILED_BACKWARD_MAX_LAYER_ELEMENTS = 32 * 128
_warned: set[str] = set()


def unavailable(q: Tensor) -> str | None:
    """None when the kernel can run on q's device in this process, else why not (fused_memory raises it)."""
    if triton is None:
        return "memory impl 'triton' needs the triton package (pip install triton==3.9.0)"
    if q.device.type == "cpu" and not INTERPRETING:
        return (
            "memory impl 'triton' runs on CUDA tensors; on CPU only in Triton's interpreter (set TRITON_INTERPRET=1 "
            "before Python starts; slow, for tests): use impl 'fused' on CPU"
        )
    if q.device.type not in ("cpu", "cuda"):
        return f"memory impl 'triton' runs on CUDA tensors, got {q.device.type}"
    return None


def unsupported(network: MemoryMLP, settings: ScanSettings, q: Tensor) -> str | None:
    """None when the kernel covers this call, else what it does not cover (the call then runs `scan_torch`)."""
    if network.depth not in (1, 2):
        return f"memory depth {network.depth} (the kernel covers depth 1 and 2)"
    if q.dtype not in (torch.float32, torch.float64):
        return f"dtype {q.dtype} (the memory's inner arithmetic is float32 or float64)"
    if any(_block(d_out) * _block(d_in) > MAX_LAYER_ELEMENTS for d_out, d_in in network.shapes):
        return f"layers {network.shapes} wider than the untiled kernel keeps on chip ({MAX_LAYER_ELEMENTS} elements)"
    return None


@jit
def _scan_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    w1_ptr, s1_ptr, a1_ptr, w2_ptr, s2_ptr, a2_ptr,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, start_ptr, length_ptr,
    w1_end, s1_end, w1_last, w2_end, s2_end, w2_last, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr,
    n_mem, T, n, n_kept, stride, clip,
    DEPTH: tl.constexpr, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr, ANCHOR: tl.constexpr, CLIP: tl.constexpr, SAVE: tl.constexpr,
    EXACT: tl.constexpr,
):  # fmt: skip
    """One memory (program_id 0 of N) through every span. Layer 1 is [O1, I1]; layer 2 (DEPTH 2) [O2, O1]; the
    output width is O2 (at depth 1, O2 = O1); B* are the padded widths, R the padded chunk. Tensors are contiguous,
    in the layouts `scan_forward` and `_coefficients` document; at depth 1 the layer-2 pointers are unused."""
    m = tl.program_id(0)
    i1, o1, o2 = tl.arange(0, BI1), tl.arange(0, BO1), tl.arange(0, BO2)
    at1, in1 = m * O1 * I1 + o1[:, None] * I1 + i1[None, :], (o1[:, None] < O1) & (i1[None, :] < I1)
    at2, in2 = m * O2 * O1 + o2[:, None] * O1 + o1[None, :], (o2[:, None] < O2) & (o1[None, :] < O1)
    W1, S1 = tl.load(w1_ptr + at1, mask=in1, other=0.0), tl.load(s1_ptr + at1, mask=in1, other=0.0)
    P1 = tl.load(a1_ptr + at1, mask=in1, other=0.0)  # the first span's anchor (W1 itself unless ANCHOR)
    if DEPTH == 2:
        W2, S2 = tl.load(w2_ptr + at2, mask=in2, other=0.0), tl.load(s2_ptr + at2, mask=in2, other=0.0)
        P2 = tl.load(a2_ptr + at2, mask=in2, other=0.0)
    for c in range(0, n):
        tok, in_rows, out_rows, qc, kc, vc = _span_rows(
            q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, m, T, c, I1, O2, BI1, BO2, R
        )
        # the anchor is the span's start weights, except for a first span resumed mid-chunk (ANCHOR)
        if ANCHOR:
            P1 = tl.where(c == 0, P1, W1)
        else:
            P1 = W1
        dec1, car1, mix1, om1, vs1, ed1, ec1, md1 = _span_coefficients(
            decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, m * n + c, R
        )
        # key path at the anchor (the exact last layer at its current weights): the gradients G^l of the inner loss
        if DEPTH == 2:
            if ANCHOR:
                P2 = tl.where(c == 0, P2, W2)
            else:
                P2 = W2
            H1, G1, G2 = _key_gradients(
                kc, vc, P1, P2, W2, S2, decay_ptr, carry_ptr, mix_ptr, (n_mem + m) * n + c, clip,
                DEPTH, SILU, EXACT, CLIP, MOMENTUM, R,
            )  # fmt: skip
        else:
            H1, G1, G2 = _key_gradients(
                kc, vc, P1, P1, W1, S1, decay_ptr, carry_ptr, mix_ptr, m * n + c, clip,
                DEPTH, SILU, EXACT, CLIP, MOMENTUM, R,
            )  # fmt: skip
        if CLIP:
            s1 = _clip_scale(G1, kc, clip)
            mix1, om1, vs1 = mix1 * s1[None, :], om1 * s1, vs1 * s1
        # query path (dual form); layer 2's coefficients follow layer 1's N * n spans later
        Z = _dual_layer(qc, W1, S1, kc, G1, dec1, car1, mix1, MOMENTUM)
        if DEPTH == 2:
            dec2, car2, mix2, om2, vs2, ed2, ec2, md2 = _span_coefficients(
                decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, (n_mem + m) * n + c, R
            )
            if CLIP:
                s2 = _clip_scale(G2, H1, clip)
                mix2, om2, vs2 = mix2 * s2[None, :], om2 * s2, vs2 * s2
            Q1, _ = _activation(Z, SILU)
            Z = _dual_layer(Q1, W2, S2, H1, G2, dec2, car2, mix2, MOMENTUM)
        tl.store(y_ptr + tok[:, None] * O2 + o2[None, :], Z, mask=out_rows)
        # the span's start state: kept for the backward every `stride` spans; the last span's start weights
        if SAVE:
            if c % stride == 0:
                kept = (m * n_kept + c // stride) * O1 * I1 - m * O1 * I1
                tl.store(kw1_ptr + kept + at1, W1, mask=in1)
                tl.store(ks1_ptr + kept + at1, S1, mask=in1)
                if DEPTH == 2:
                    kept2 = (m * n_kept + c // stride) * O2 * O1 - m * O2 * O1
                    tl.store(kw2_ptr + kept2 + at2, W2, mask=in2)
                    tl.store(ks2_ptr + kept2 + at2, S2, mask=in2)
        if c == n - 1:
            tl.store(w1_last + at1, W1, mask=in1)
            if DEPTH == 2:
                tl.store(w2_last + at2, W2, mask=in2)
        if DEPTH == 2:
            W2, S2 = _end_state(W2, S2, G2, H1, om2, vs2, ed2, ec2, md2, MOMENTUM)
        W1, S1 = _end_state(W1, S1, G1, kc, om1, vs1, ed1, ec1, md1, MOMENTUM)
    tl.store(w1_end + at1, W1, mask=in1)
    tl.store(s1_end + at1, S1, mask=in1)
    if DEPTH == 2:
        tl.store(w2_end + at2, W2, mask=in2)
        tl.store(s2_end + at2, S2, mask=in2)


def scan_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Sequence[ScanGates],
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    anchor: Sequence[Tensor],
    settings: ScanSettings,
    save: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """`scan_torch.scan_forward` in one kernel launch, same arguments and returns (layouts: scan_torch's docstring):
    y [N, T, D_out], the end weights and momentum, the weights at the start of the last span, and (when `save`) the
    kept chunk-start weights then momentum, per layer [N, n_kept, d_l, d_{l-1}]."""
    n_mem, T, d_in = k.shape
    depth, lengths, n = len(weights), settings.lengths, len(settings.lengths)
    rows = _block(settings.chunk_size)
    decay, carry, mix, ends, end_mixes = _coefficients(gates, lengths, settings.chunk_size, rows)
    starts, spans = _span_tensors(lengths, q.device)
    d_outs = [w.shape[1] for w in weights]
    y = q.new_empty(n_mem, T, d_outs[-1])
    w_end = [torch.empty_like(w) for w in weights]
    s_end = [torch.empty_like(w) for w in weights]
    w_last = [torch.empty_like(w) for w in weights]
    n_kept = math.ceil(n / settings.stride)
    kept = [q.new_empty(n_mem, n_kept, *w.shape[1:]) for w in [*weights, *weights]] if save else []

    w1, w2 = _two_layers(weights)
    s1, s2 = _two_layers(momentum)
    a1, a2 = _two_layers(anchor) if anchor else (w1, w2)
    kw1, kw2 = _two_layers(kept[:depth]) if save else (w1, w2)
    ks1, ks2 = _two_layers(kept[depth:]) if save else (w1, w2)
    arguments = (
        q.contiguous(), k.contiguous(), v.contiguous(), y,
        w1, s1, a1, w2, s2, a2,
        decay, carry, mix, ends, end_mixes, starts, spans,
        w_end[0], s_end[0], w_last[0], w_end[-1], s_end[-1], w_last[-1], kw1, ks1, kw2, ks2,
    )  # fmt: skip
    scalars = (n_mem, T, n, n_kept, settings.stride, float(settings.clip))
    constants = dict(
        DEPTH=depth, I1=d_in, O1=d_outs[0], O2=d_outs[-1],
        BI1=_block(d_in), BO1=_block(d_outs[0]), BO2=_block(d_outs[-1]), R=rows,
        SILU=settings.activation == "silu", MOMENTUM=gates[0].eta is not None, ANCHOR=bool(anchor),
        CLIP=settings.clip > 0, SAVE=save, EXACT=settings.exact_last,
    )  # fmt: skip
    kernel, extra, options = _scan_kernel, [], {}
    if _tiles(weights, settings):
        kernel, extra, options = _scan_tiled_kernel, *_tiled_launch(q, weights, settings)
    try:
        kernel[(n_mem,)](*arguments, *extra, *scalars, **constants, **options)
    except triton.runtime.errors.OutOfResources as err:  # a GPU with less shared memory than the limits assume
        _warn_once("forward", err)
        return scan_torch.scan_forward(q, k, v, gates, weights, momentum, anchor, settings, save)
    return y, w_end, s_end, w_last, kept


def scan_backward(
    grad_y: Tensor,
    grad_weights: Sequence[Tensor],
    grad_momentum: Sequence[Tensor],
    grad_last_start: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Sequence[ScanGates],
    anchor: Sequence[Tensor],
    saved: Sequence[Tensor],
    settings: ScanSettings,
):
    """The reverse scan (`scan_torch.scan_backward`'s arguments and returns): the Triton kernel tiled over the
    hidden width for depth-2 memories wider than UNTILED_MAX_LAYER_ELEMENTS (`scan_triton_tiled.py`), the untiled
    one (`scan_triton_backward.py`) for the others up to UNTILED_BACKWARD_MAX_LAYER_ELEMENTS, else, or where the GPU
    lacks the shared memory, the tensor-op reverse scan on the same kept states."""
    arguments = (grad_y, grad_weights, grad_momentum, grad_last_start, q, k, v, gates, anchor, saved, settings)
    tiles = _tiles(grad_weights, settings)
    if settings.exact_last or (not tiles and _wide(grad_weights, UNTILED_BACKWARD_MAX_LAYER_ELEMENTS)):
        # no kernel has the exact last layer's VJP (its substitution) yet; wide depth-1 memories have no tiled form
        return scan_torch.scan_backward(*arguments)
    tiled = (_scan_backward_tiled_kernel, *_tiled_launch(q, grad_weights, settings)) if tiles else None
    try:
        return _kernel_backward(*arguments, tiled=tiled)
    except triton.runtime.errors.OutOfResources as err:
        _warn_once("backward", err)
        return scan_torch.scan_backward(*arguments)


def _wide(weights: Sequence[Tensor], limit: int) -> bool:
    """Whether some layer (padded) has more than `limit` elements."""
    return any(_block(w.shape[-2]) * _block(w.shape[-1]) > limit for w in weights)


def _tiles(weights: Sequence[Tensor], settings: ScanSettings) -> bool:
    """Whether this call runs the kernels tiled over the hidden width: depth 2, no exact last layer, layers wider
    than UNTILED_MAX_LAYER_ELEMENTS (weights [N, d_out, d_in] per layer, or their gradients)."""
    return len(weights) == 2 and not settings.exact_last and _wide(weights, UNTILED_MAX_LAYER_ELEMENTS)


def _tiled_launch(q: Tensor, weights: Sequence[Tensor], settings: ScanSettings) -> tuple[list[Tensor], dict[str, Any]]:
    """A tiled kernel's extra argument, its scratch [N, SLOTS, rows, hidden], and its launch options (tile, warps,
    stages)."""
    hidden = _block(weights[0].shape[1])
    scratch = q.new_empty(q.shape[0], scan_triton_tiled.SLOTS, _block(settings.chunk_size), hidden)
    return [scratch], {"BH": min(scan_triton_tiled.HIDDEN_TILE, hidden), **scan_triton_tiled.LAUNCH}


def _warn_once(which: str, err: Exception) -> None:
    if which not in _warned:
        _warned.add(which)
        warnings.warn(
            f"titans: the memory scan's Triton {which} kernel does not fit this GPU ({err}); running the tensor-op "
            "scan for it instead (same results, slower)",
            stacklevel=3,
        )
