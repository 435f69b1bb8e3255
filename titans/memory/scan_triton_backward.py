"""The fused memory scan's backward as one Triton kernel: the reverse scan of `scan_torch.scan_backward`, per memory.

One program per memory (sequence x head) walks the spans from last to first with the gradients of the state
(dW, dS per layer) in registers. Per group of `stride` spans it first recomputes their start states from the one the
forward kept (`scan_triton.scan_forward`), into a scratch buffer, then for each span, last first: recomputes the
key and query paths from its start state, applies the span's vector-Jacobian product by hand (the formulas of
`scan_torch._chunk_backward` and `_key_path_backward`, line for line: query path, end state, clip, key path with its
second-order terms), writes dq, dk, dv and the gradients of the span's coefficients, and carries (dW, dS) to the span
before. The coefficients' own backward, to the gates theta, eta and alpha, is one autograd call over all spans at
once on the tensor ops that built them (`scan_triton._coefficients`): O(T x chunk) numbers, no loop over chunks.
Coverage is `scan_triton`'s (`unsupported`); the same tests hold it equal to the references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from titans.memory.scan_torch import ScanGates, ScanSettings, _zero_if_none
from titans.memory.scan_triton_parts import (
    _activation,
    _block,
    _clip_scale,
    _coefficients,
    _dual_layer,
    _end_state,
    _span_coefficients,
    _span_rows,
    _span_tensors,
    _two_layers,
    jit,
    tl,
)


@jit
def _activation_second(z, SILU: tl.constexpr):
    """sigma''(z) (as `network.activation_second_derivative`)."""
    if SILU:
        s = tl.sigmoid(z)
        out = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    else:
        out = tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)
    return out


@jit
def _key_path(kc, vc, P1, P2, DEPTH: tl.constexpr, SILU: tl.constexpr):
    """The rows' keys through the anchor (P1, P2): K^1, A^2 = sigma(K^1), sigma'(K^1), G^1, B^1 = G^2 P2, G^2.
    At depth 1 the layer-2 entries repeat G^1 (unused)."""
    K1 = tl.dot(kc, tl.trans(P1), input_precision="ieee")
    if DEPTH == 2:
        H1, D1 = _activation(K1, SILU)
        G2 = 2.0 * (tl.dot(H1, tl.trans(P2), input_precision="ieee") - vc)
        B1 = tl.dot(G2, P2, input_precision="ieee")
        G1 = B1 * D1
    else:
        G1 = 2.0 * (K1 - vc)
        H1, D1, B1, G2 = G1, G1, G1, G1
    return K1, H1, D1, G1, B1, G2


@jit
def _query_layer_backward(dz, h, W, S, A, G, mix_s, decay, carry, MOMENTUM: tl.constexpr, R: tl.constexpr):
    """VJP of one layer of the dual form Z = decay . (h W^T) + carry . (h S^T) - ((h A^T) * mix_s) G at dz: returns
    dh, d decay, d carry, the parts of dA and dG, dW, dS and d(mix_s) (lower triangular)."""
    rows = tl.arange(0, R)
    x = tl.dot(dz, W, input_precision="ieee")
    d_decay = tl.sum(x * h, 1)
    dh = decay[:, None] * x
    dW = tl.dot(tl.trans(decay[:, None] * dz), h, input_precision="ieee")
    if MOMENTUM:
        xs = tl.dot(dz, S, input_precision="ieee")
        d_carry = tl.sum(xs * h, 1)
        dh += carry[:, None] * xs
        dS = tl.dot(tl.trans(carry[:, None] * dz), h, input_precision="ieee")
    else:
        d_carry = tl.zeros_like(d_decay)
        dS = tl.zeros_like(S)
    hg = tl.dot(dz, tl.trans(G), input_precision="ieee")  # hg[t, i] = dz_t . g_i
    hm = hg * mix_s
    dh -= tl.dot(hm, A, input_precision="ieee")
    dA = -tl.dot(tl.trans(hm), h, input_precision="ieee")
    r_mat = tl.dot(h, tl.trans(A), input_precision="ieee")
    dG = -tl.dot(tl.trans(r_mat * mix_s), dz, input_precision="ieee")
    d_mixed = tl.where(rows[:, None] >= rows[None, :], -(hg * r_mat), 0.0)
    return dh, d_decay, d_carry, dA, dG, dW, dS, d_mixed


@jit
def _end_backward(o, p, W, S, G, A, om, vs, end_decay, end_carry, mom_decay, MOMENTUM: tl.constexpr):
    """VJP of one layer's end state (`scan_triton._end_state`) at (o, p) = the gradients of (W_r, S_r), with om, vs
    the clip-scaled end mixes: returns dW, dS, d end decay, d end carry, d momentum decay, dA, dG, d om, d vs."""
    dW = end_decay * o
    d_end_decay = tl.sum(tl.sum(o * W, 1), 0)
    if MOMENTUM:
        dS = end_carry * o + mom_decay * p
        d_end_carry = tl.sum(tl.sum(o * S, 1), 0)
        d_mom_decay = tl.sum(tl.sum(p * S, 1), 0)
    else:
        dS = tl.zeros_like(S)
        d_end_carry = d_end_decay * 0.0
        d_mom_decay = d_end_decay * 0.0
    u = tl.dot(G, o, input_precision="ieee")
    w = tl.dot(G, p, input_precision="ieee")
    dA = -(om[:, None] * u + vs[:, None] * w)
    dG = -(om[:, None] * tl.dot(A, tl.trans(o), input_precision="ieee"))
    dG -= vs[:, None] * tl.dot(A, tl.trans(p), input_precision="ieee")
    return dW, dS, d_end_decay, d_end_carry, d_mom_decay, dA, dG, -tl.sum(u * A, 1), -tl.sum(w * A, 1)


@jit
def _clip_backward(G, A, d_scale, clip):
    """VJP of s = clip / max(clip, |g| |a|) per row at d_scale: the parts of dG and dA."""
    gn = tl.sqrt(tl.sum(G * G, 1))
    an = tl.sqrt(tl.sum(A * A, 1))
    norm = gn * an
    d_norm = tl.where(norm > clip, -d_scale * clip / tl.maximum(norm * norm, 1e-30), 0.0)
    return (d_norm * an / tl.maximum(gn, 1e-30))[:, None] * G, (d_norm * gn / tl.maximum(an, 1e-30))[:, None] * A


@jit
def _store_coefficient_grads(
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, at,
    d_decay, d_carry, d_mix, d_end_mix, d_mom_mix, d_end_decay, d_end_carry, d_mom_decay, R: tl.constexpr,
):  # fmt: skip
    """One layer's coefficient gradients of one span, in `_coefficients`' layout (`at`: the span's grid index)."""
    rows = tl.arange(0, R)
    tl.store(d_decay_ptr + at * R + rows, d_decay)
    tl.store(d_carry_ptr + at * R + rows, d_carry)
    tl.store(d_mix_ptr + at * R * R + rows[:, None] * R + rows[None, :], d_mix)
    tl.store(d_end_mix_ptr + at * 2 * R + rows, d_end_mix)
    tl.store(d_end_mix_ptr + at * 2 * R + R + rows, d_mom_mix)
    tl.store(d_ends_ptr + at * 3, d_end_decay)
    tl.store(d_ends_ptr + at * 3 + 1, d_end_carry)
    tl.store(d_ends_ptr + at * 3 + 2, d_mom_decay)


@jit
def _scaled_coefficients(at, G, A, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, R: tl.constexpr,
                         CLIP: tl.constexpr):  # fmt: skip
    """One layer's span coefficients (`_span_coefficients`) and the clip scale s of its rows (ones without the
    clip): decay, carry, mix, omega, mom_mix, end decay, end carry, momentum decay, s."""
    decay, carry, mix, omega, mom_mix, ed, ec, md = _span_coefficients(
        decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, at, R
    )
    if CLIP:
        s = _clip_scale(G, A, clip)
    else:
        s = tl.full([R], 1.0, decay.dtype)
    return decay, carry, mix, omega, mom_mix, ed, ec, md, s


@jit
def _layer_backward(
    dz, h, W, S, A, G, o, p, co_at, clip,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr,
    R: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """One layer of one span: the query-path VJP at dz (its input h, weights W, S, key-path inputs A and gradients G)
    and the end state's at (o, p), the clip's, and the coefficient gradients stored. Returns dh, dA, dG (before the
    key path's second-order terms), dW, dS."""
    decay, carry, mix, omega, mom_mix, ed, ec, md, s = _scaled_coefficients(
        co_at, G, A, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, R, CLIP
    )
    dh, d_decay, d_carry, dA, dG, dW, dS, d_mixed = _query_layer_backward(
        dz, h, W, S, A, G, mix * s[None, :], decay, carry, MOMENTUM, R
    )
    eW, eS, d_ed, d_ec, d_md, eA, eG, d_om, d_vs = _end_backward(
        o, p, W, S, G, A, omega * s, mom_mix * s, ed, ec, md, MOMENTUM
    )
    dW += eW
    dS += eS
    dA += eA
    dG += eG
    _store_coefficient_grads(
        d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, co_at,
        d_decay, d_carry, d_mixed * s[None, :], d_om * s, d_vs * s, d_ed, d_ec, d_md, R,
    )  # fmt: skip
    if CLIP:
        d_scale = tl.sum(d_mixed * mix, 0) + d_om * omega + d_vs * mom_mix
        cG, cA = _clip_backward(G, A, d_scale, clip)
        dG += cG
        dA += cA
    return dh, dA, dG, dW, dS


@jit
def _recompute_group(
    k_ptr, v_ptr, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr, sw1_ptr, ss1_ptr, sw2_ptr, ss2_ptr, A1, A2,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, start_ptr, length_ptr,
    m, g, first, count, n_mem, T, n, n_kept, stride, clip,
    DEPTH: tl.constexpr, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr, ANCHOR: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """The start states of the group's `count` spans from the one the forward kept (g), into scratch slots 0..."""
    rows = tl.arange(0, R)
    i1, o1, o2 = tl.arange(0, BI1), tl.arange(0, BO1), tl.arange(0, BO2)
    local1, in1 = o1[:, None] * I1 + i1[None, :], (o1[:, None] < O1) & (i1[None, :] < I1)
    local2, in2 = o2[:, None] * O1 + o1[None, :], (o2[:, None] < O2) & (o1[None, :] < O1)
    kept1, kept2 = (m * n_kept + g) * O1 * I1 + local1, (m * n_kept + g) * O2 * O1 + local2
    W1, S1 = tl.load(kw1_ptr + kept1, mask=in1, other=0.0), tl.load(ks1_ptr + kept1, mask=in1, other=0.0)
    if DEPTH == 2:
        W2, S2 = tl.load(kw2_ptr + kept2, mask=in2, other=0.0), tl.load(ks2_ptr + kept2, mask=in2, other=0.0)
    for j in range(0, count):
        slot1, slot2 = (m * stride + j) * O1 * I1 + local1, (m * stride + j) * O2 * O1 + local2
        tl.store(sw1_ptr + slot1, W1, mask=in1)
        tl.store(ss1_ptr + slot1, S1, mask=in1)
        if DEPTH == 2:
            tl.store(sw2_ptr + slot2, W2, mask=in2)
            tl.store(ss2_ptr + slot2, S2, mask=in2)
        if j < count - 1:
            c = first + j
            tok = m * T + tl.load(start_ptr + c) + rows
            row_in = rows < tl.load(length_ptr + c)
            kc = tl.load(k_ptr + tok[:, None] * I1 + i1[None, :], mask=row_in[:, None] & (i1[None, :] < I1), other=0.0)
            vc = tl.load(v_ptr + tok[:, None] * O2 + o2[None, :], mask=row_in[:, None] & (o2[None, :] < O2), other=0.0)
            P1 = W1
            if ANCHOR:
                P1 = tl.where(c == 0, A1, W1)
            P2 = P1
            if DEPTH == 2:
                P2 = W2
                if ANCHOR:
                    P2 = tl.where(c == 0, A2, W2)
            K1, H1, D1, G1, B1, G2 = _key_path(kc, vc, P1, P2, DEPTH, SILU)
            if DEPTH == 2:
                _, _, _, om, vs, ed, ec, md, s = _scaled_coefficients(
                    (n_mem + m) * n + c, G2, H1, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, R, CLIP
                )
                W2, S2 = _end_state(W2, S2, G2, H1, om * s, vs * s, ed, ec, md, MOMENTUM)
            _, _, _, om, vs, ed, ec, md, s = _scaled_coefficients(
                m * n + c, G1, kc, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, R, CLIP
            )
            W1, S1 = _end_state(W1, S1, G1, kc, om * s, vs * s, ed, ec, md, MOMENTUM)


@jit
def _span_backward(
    qc, kc, vc, dz, W1, S1, P1, W2, S2, P2, o_1, p_1, o_2, p_2, co1, co2, clip,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr,
    DEPTH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """The VJP of one span from its start state (W, S per layer; P the anchor) at dz = dy of its rows and (o, p) =
    the gradients of its end state; stores the coefficients' gradients (co1, co2: the span's index in layer 1's and
    layer 2's grid). Returns dq, dk, dv, and per layer dW, dS of the start state and dP of the anchor."""
    K1, H1, D1, G1, B1, G2 = _key_path(kc, vc, P1, P2, DEPTH, SILU)
    if DEPTH == 2:
        # the hidden layer's output Q^1 = sigma(Z^1) of the query path, the last layer's input
        dec1, car1, mix1, _, _, _, _, _, s1 = _scaled_coefficients(
            co1, G1, kc, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, R, CLIP
        )
        Q1, QD1 = _activation(_dual_layer(qc, W1, S1, kc, G1, dec1, car1, mix1 * s1[None, :], MOMENTUM), SILU)
        dh2, dA2, dG2, dW2, dS2 = _layer_backward(
            dz, Q1, W2, S2, H1, G2, o_2, p_2, co2, clip,
            decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
            d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, R, MOMENTUM, CLIP,
        )  # fmt: skip
        dz = dh2 * QD1
    dq, dA1, dG1, dW1, dS1 = _layer_backward(
        dz, qc, W1, S1, kc, G1, o_1, p_1, co1, clip,
        decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
        d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, R, MOMENTUM, CLIP,
    )  # fmt: skip
    # the key path at the anchor, with its second-order terms (the inner gradients' own derivatives)
    if DEPTH == 2:
        d_back = dG1 * D1
        d_pre1 = dG1 * B1 * _activation_second(K1, SILU)
        dG2 += tl.dot(d_back, tl.trans(P2), input_precision="ieee")
        dP2 = tl.dot(tl.trans(G2), d_back, input_precision="ieee")
        dv = -2.0 * dG2
        dA2 += tl.dot(2.0 * dG2, P2, input_precision="ieee")
        dP2 += tl.dot(tl.trans(2.0 * dG2), H1, input_precision="ieee")
        d_pre1 += dA2 * D1
    else:
        d_pre1 = 2.0 * dG1
        dv = -2.0 * dG1
    dA1 += tl.dot(d_pre1, P1, input_precision="ieee")
    dP1 = tl.dot(tl.trans(d_pre1), kc, input_precision="ieee")
    if DEPTH == 1:
        dW2, dS2, dP2 = dW1, dS1, dP1  # unused
    return dq, dA1, dv, dW1, dS1, dP1, dW2, dS2, dP2


@jit
def _carried(dW, dS, dP, d_anchor_ptrs, mask, c, ANCHOR: tl.constexpr):
    """The gradients of a span's start (W, S) carried to the span before: the anchor's gradient joins W's, since the
    anchor is the start weights, except for a first span resumed mid-chunk (ANCHOR), whose anchor keeps its own."""
    o = dW + dP
    if ANCHOR:
        if c == 0:
            tl.store(d_anchor_ptrs, dP, mask=mask)
        o = tl.where(c == 0, dW, o)
    return o, dS


@jit
def _scan_backward_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    kw1_ptr, kw2_ptr, ks1_ptr, ks2_ptr, a1_ptr, a2_ptr,
    gw1_ptr, gw2_ptr, gs1_ptr, gs2_ptr, gl1_ptr, gl2_ptr,
    dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, da1_ptr, da2_ptr, sw1_ptr, sw2_ptr, ss1_ptr, ss2_ptr,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, start_ptr, length_ptr,
    n_mem, T, n, n_kept, stride, clip,
    DEPTH: tl.constexpr, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr, ANCHOR: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """The reverse scan of one memory (program_id 0 of N); layouts as `scan_triton._scan_kernel`'s, pointers in
    layer order (layer 1 then layer 2, which depth 1 repeats and never reads). g*: gradients
    of the end state and of the last span's start weights; d*: the initial state's, the anchor's, the coefficients'
    gradients; s*: scratch for one group's recomputed start states [N, stride, ...]."""
    m = tl.program_id(0)
    i1, o1, o2 = tl.arange(0, BI1), tl.arange(0, BO1), tl.arange(0, BO2)
    local1, in1 = o1[:, None] * I1 + i1[None, :], (o1[:, None] < O1) & (i1[None, :] < I1)
    local2, in2 = o2[:, None] * O1 + o1[None, :], (o2[:, None] < O2) & (o1[None, :] < O1)
    at1, at2 = m * O1 * I1 + local1, m * O2 * O1 + local2
    o_1, p_1 = tl.load(gw1_ptr + at1, mask=in1, other=0.0), tl.load(gs1_ptr + at1, mask=in1, other=0.0)
    A1 = tl.load(a1_ptr + at1, mask=in1, other=0.0)
    o_2, p_2, A2 = o_1, p_1, A1  # depth 1: unused
    if DEPTH == 2:
        o_2, p_2 = tl.load(gw2_ptr + at2, mask=in2, other=0.0), tl.load(gs2_ptr + at2, mask=in2, other=0.0)
        A2 = tl.load(a2_ptr + at2, mask=in2, other=0.0)
    for gi in range(0, n_kept):
        g = n_kept - 1 - gi
        first = g * stride
        count = tl.minimum(stride, n - first)
        _recompute_group(
            k_ptr, v_ptr, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr, sw1_ptr, ss1_ptr, sw2_ptr, ss2_ptr, A1, A2,
            decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, start_ptr, length_ptr,
            m, g, first, count, n_mem, T, n, n_kept, stride, clip,
            DEPTH, I1, O1, O2, BI1, BO1, BO2, R, SILU, MOMENTUM, ANCHOR, CLIP,
        )  # fmt: skip
        tl.debug_barrier()  # the scratch written above is read by other threads of this program below
        for jj in range(0, count):
            j = count - 1 - jj
            c = first + j
            slot1, slot2 = (m * stride + j) * O1 * I1 + local1, (m * stride + j) * O2 * O1 + local2
            W1, S1 = tl.load(sw1_ptr + slot1, mask=in1, other=0.0), tl.load(ss1_ptr + slot1, mask=in1, other=0.0)
            tok, in_rows, out_rows, qc, kc, vc = _span_rows(
                q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, m, T, c, I1, O2, BI1, BO2, R
            )
            dz = tl.load(dy_ptr + tok[:, None] * O2 + o2[None, :], mask=out_rows, other=0.0)
            P1 = W1
            if ANCHOR:
                P1 = tl.where(c == 0, A1, W1)
            W2, S2, P2 = W1, S1, P1  # depth 1: unused
            if DEPTH == 2:
                W2, S2 = tl.load(sw2_ptr + slot2, mask=in2, other=0.0), tl.load(ss2_ptr + slot2, mask=in2, other=0.0)
                P2 = W2
                if ANCHOR:
                    P2 = tl.where(c == 0, A2, W2)
            dq, dA1, dv, dW1, dS1, dP1, dW2, dS2, dP2 = _span_backward(
                qc, kc, vc, dz, W1, S1, P1, W2, S2, P2, o_1, p_1, o_2, p_2, m * n + c, (n_mem + m) * n + c, clip,
                decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
                d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr,
                DEPTH, R, SILU, MOMENTUM, CLIP,
            )  # fmt: skip
            tl.store(dq_ptr + tok[:, None] * I1 + i1[None, :], dq, mask=in_rows)
            tl.store(dk_ptr + tok[:, None] * I1 + i1[None, :], dA1, mask=in_rows)
            tl.store(dv_ptr + tok[:, None] * O2 + o2[None, :], dv, mask=out_rows)
            # (dW, dS) of the span's start state, carried to the span before
            o_1, p_1 = _carried(dW1, dS1, dP1, da1_ptr + at1, in1, c, ANCHOR)
            if DEPTH == 2:
                o_2, p_2 = _carried(dW2, dS2, dP2, da2_ptr + at2, in2, c, ANCHOR)
            if c == n - 1:  # the weights at the start of the last span are an output too
                o_1 += tl.load(gl1_ptr + at1, mask=in1, other=0.0)
                if DEPTH == 2:
                    o_2 += tl.load(gl2_ptr + at2, mask=in2, other=0.0)
    tl.store(dw1_ptr + at1, o_1, mask=in1)
    tl.store(ds1_ptr + at1, p_1, mask=in1)
    if DEPTH == 2:
        tl.store(dw2_ptr + at2, o_2, mask=in2)
        tl.store(ds2_ptr + at2, p_2, mask=in2)


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
    tiled: tuple[Any, list[Tensor], dict[str, Any]] | None = None,
):
    """`scan_torch.scan_backward` in one kernel launch and one autograd call for the gates; same arguments and
    returns: dq, dk, dv [N, T, D], per layer ScanGates of the gates' gradients (None where a gate is off), dW and dS
    of the initial state, the anchor's gradient (empty when the first span's anchor is its start state).
    tiled: (kernel, extra arguments, launch options) of `scan_triton_tiled`'s kernel, launched instead."""
    n_mem, T, d_in = k.shape
    depth, lengths, n = len(gates), settings.lengths, len(settings.lengths)
    rows = _block(settings.chunk_size)
    with torch.enable_grad():
        leaves = [ScanGates(*(None if t is None else t.detach().requires_grad_() for t in g)) for g in gates]
        coefficients = _coefficients(leaves, lengths, settings.chunk_size, rows)
    d_coefficients = [torch.empty_like(t) for t in coefficients]
    starts, spans = _span_tensors(lengths, q.device)
    shapes = [tuple(w.shape[1:]) for w in grad_weights]
    d_outs = [s[0] for s in shapes]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d_w, d_s = [q.new_empty(n_mem, *s) for s in shapes], [q.new_empty(n_mem, *s) for s in shapes]
    d_anchor = [q.new_empty(n_mem, *s) for s in shapes] if anchor else []
    scratch = [q.new_empty(n_mem, settings.stride, *s) for s in shapes + shapes]

    kw, ks = _two_layers(saved[:depth]), _two_layers(saved[depth:])
    a = _two_layers(anchor) if anchor else kw
    gw, gs, gl = _two_layers(grad_weights), _two_layers(grad_momentum), _two_layers(grad_last_start)
    da = _two_layers(d_anchor) if anchor else kw
    kernel, extra, options = tiled if tiled is not None else (_scan_backward_kernel, [], {})
    kernel[(n_mem,)](
        q.contiguous(), k.contiguous(), v.contiguous(), grad_y.contiguous(), dq, dk, dv,
        *kw, *ks, *a, *gw, *gs, *gl, *_two_layers(d_w), *_two_layers(d_s), *da,
        *_two_layers(scratch[:depth]), *_two_layers(scratch[depth:]),
        *coefficients, *d_coefficients, starts, spans, *extra,
        n_mem, T, n, saved[0].shape[1], settings.stride, float(settings.clip),
        DEPTH=depth, I1=d_in, O1=d_outs[0], O2=d_outs[-1],
        BI1=_block(d_in), BO1=_block(d_outs[0]), BO2=_block(d_outs[-1]), R=rows,
        SILU=settings.activation == "silu", MOMENTUM=gates[0].eta is not None, ANCHOR=bool(anchor),
        CLIP=settings.clip > 0, **options,
    )  # fmt: skip
    # the gates' gradients: the coefficients' backward, every span at once
    pairs = [(t, d) for t, d in zip(coefficients, d_coefficients, strict=True) if t.requires_grad]
    wanted = [t for g in leaves for t in g if t is not None]
    grads = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [d for _, d in pairs], allow_unused=True))
    d_gates = [ScanGates(*(None if t is None else _zero_if_none(next(grads), t) for t in g)) for g in leaves]
    return dq, dk, dv, d_gates, d_w, d_s, d_anchor
