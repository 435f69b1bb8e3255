"""The fused scan's forward for memories too wide to keep in registers: the Triton kernel tiled over the hidden width.

`scan_triton._scan_kernel` holds each layer's weights and momentum in registers for the whole scan. With heads of 64
at expansion 4 (layers of 256 x 64 and 64 x 256) that is four 64 KB tensors per program: compiled for sm_90, ptxas
spills about 110 KB per thread of it. This kernel is the same forward for depth-2 memories without the exact last
layer, with the running state in the end-state output buffers, updated tile by tile, and each span as passes over
hidden tiles of BH columns (`scan_triton_tiles.py`):
  1-2  the key path at the anchor (`_key_passes`: H^1 and G^1 to scratch, G^2 and the clip norms in registers)
  3    the query path: Q^1_t = sigma(Z^1_t) per tile; the output sums Q^1_t W^2_t^T, Q^1_t S^2_t^T and Q^1 H^1^T
       over the tiles, then subtracts ((Q^1 H^1^T) * mix^2 * s^2) G^2
  4    the end state, in place (`_end_state_tiles`)
Before each span the state is copied to the kept-states buffer every `stride` spans and, for the last span, to the
last span's start weights, in `scan_torch`'s layout, as the untiled kernel stores them. `scan_triton.scan_forward`
launches it for layers wider than UNTILED_MAX_LAYER_ELEMENTS; tests/test_scan_triton.py holds it to the references
with tiles of 16.
"""

from __future__ import annotations

from titans.memory.scan_triton_parts import _span_coefficients, _span_rows, jit, tl
from titans.memory.scan_triton_tiles import _copy_tiles, _end_state_tiles, _hidden_tile, _key_passes, _load, _second


@jit
def _query_tiles(
    qc, G2, mixed1, dec1, car1, dec2, car2, mix_s2, w1, s1, w2, s2, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """Pass 3: the span's outputs [R, BO2] through both layers of the dual form (`_dual_layer` twice), the hidden
    width in tiles; mixed1 = (q k^T) * mix^1 * s^1, mix_s2 = mix^2 * s^2; G^1 and H^1 from scratch."""
    y = tl.zeros([R, BO2], dtype=qc.dtype)
    r2 = tl.zeros_like(mixed1)
    for h0 in range(0, BO1, BH):
        Q1, _, H1 = _hidden_tile(
            qc, mixed1, dec1, car1, w1, s1, scratch, m, h0, I1, O1, BI1, BO1, BH, R, SILU, MOMENTUM
        )
        y += dec2[:, None] * tl.dot(Q1, tl.trans(_load(_second(w2, h0, O1, O2, BH, BO2))), input_precision="ieee")
        if MOMENTUM:
            y += car2[:, None] * tl.dot(Q1, tl.trans(_load(_second(s2, h0, O1, O2, BH, BO2))), input_precision="ieee")
        r2 += tl.dot(Q1, tl.trans(H1), input_precision="ieee")
    return y - tl.dot(r2 * mix_s2, G2, input_precision="ieee")


@jit
def _scan_tiled_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,
    w1_ptr, s1_ptr, a1_ptr, w2_ptr, s2_ptr, a2_ptr,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, start_ptr, length_ptr,
    w1_end, s1_end, w1_last, w2_end, s2_end, w2_last, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr, scratch,
    n_mem, T, n, n_kept, stride, clip,
    DEPTH: tl.constexpr, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr, ANCHOR: tl.constexpr, CLIP: tl.constexpr, SAVE: tl.constexpr,
    EXACT: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """`_scan_kernel` for a depth-2 memory without the exact last layer (DEPTH and EXACT are accepted and ignored),
    tiled over the hidden width; same arguments, plus `scratch` [N, 9, R, BO1]."""
    m = tl.program_id(0)
    o2r = tl.arange(0, BO2)
    size1, size2 = O1 * I1, O2 * O1
    w1, s1, w2, s2 = w1_end + m * size1, s1_end + m * size1, w2_end + m * size2, s2_end + m * size2
    _copy_tiles(w1_ptr + m * size1, w1, w2_ptr + m * size2, w2, I1, O1, O2, BI1, BO1, BO2, BH)
    _copy_tiles(s1_ptr + m * size1, s1, s2_ptr + m * size2, s2, I1, O1, O2, BI1, BO1, BO2, BH)
    tl.debug_barrier()
    for c in range(0, n):
        # the span's start state: kept for the backward every `stride` spans; the last span's start weights
        if SAVE:
            if c % stride == 0:
                at = m * n_kept + c // stride
                _copy_tiles(w1, kw1_ptr + at * size1, w2, kw2_ptr + at * size2, I1, O1, O2, BI1, BO1, BO2, BH)
                _copy_tiles(s1, ks1_ptr + at * size1, s2, ks2_ptr + at * size2, I1, O1, O2, BI1, BO1, BO2, BH)
        if c == n - 1:
            _copy_tiles(w1, w1_last + m * size1, w2, w2_last + m * size2, I1, O1, O2, BI1, BO1, BO2, BH)
        tl.debug_barrier()
        anchor_span = c < 0  # False
        if ANCHOR:
            anchor_span = c == 0
        key1, key2 = tl.where(anchor_span, a1_ptr + m * size1, w1), tl.where(anchor_span, a2_ptr + m * size2, w2)
        tok, in_rows, out_rows, qc, kc, vc = _span_rows(
            q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, m, T, c, I1, O2, BI1, BO2, R
        )
        G2, h_norm, g_norm = _key_passes(kc, vc, key1, key2, scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, SILU)
        co1 = _span_coefficients(decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, m * n + c, R)
        co2 = _span_coefficients(decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, (n_mem + m) * n + c, R)
        dec1, car1, mix1, _, _, _, _, _ = co1
        dec2, car2, mix2, _, _, _, _, _ = co2
        scale1, scale2 = h_norm * 0.0 + 1.0, h_norm * 0.0 + 1.0
        if CLIP:
            scale1 = clip / tl.maximum(clip, tl.sqrt(g_norm) * tl.sqrt(tl.sum(kc * kc, 1)))
            scale2 = clip / tl.maximum(clip, tl.sqrt(tl.sum(G2 * G2, 1)) * tl.sqrt(h_norm))
        mixed1 = tl.dot(qc, tl.trans(kc), input_precision="ieee") * mix1 * scale1[None, :]
        y = _query_tiles(
            qc, G2, mixed1, dec1, car1, dec2, car2, mix2 * scale2[None, :], w1, s1, w2, s2, scratch, m,
            I1, O1, O2, BI1, BO1, BO2, BH, R, SILU, MOMENTUM,
        )  # fmt: skip
        tl.store(y_ptr + tok[:, None] * O2 + o2r[None, :], y, mask=out_rows)
        tl.debug_barrier()
        _end_state_tiles(
            kc, G2, w1, s1, w2, s2, w1, s1, w2, s2, co1, co2, scale1, scale2, scratch, m,
            I1, O1, O2, BI1, BO1, BO2, BH, R, MOMENTUM,
        )  # fmt: skip
