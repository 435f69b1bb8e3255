"""The fused scan's reverse scan for memories too wide to keep on chip: the Triton kernel tiled over the hidden width.

`scan_triton_backward._scan_backward_kernel` holds every layer's weights, momentum and their gradients in registers,
which ptxas spills (tens of KB per thread from heads of 16 at expansion 4, layers of 64 x 16; heads of 64 have 256 x
64 and 64 x 256). This kernel is the same reverse scan for depth-2 memories (the default), with the hidden
width cut into tiles of HIDDEN_TILE: per span, the key path, the query path and the span's vector-Jacobian product
(the formulas of `_span_backward`, unchanged) run as passes over the tiles. What crosses tiles is small and stays in
registers: the row sums and [rows x rows] products of the clip scales, the coefficients' gradients and the dual
form, and the [rows x d] products that sum over the hidden width (K^2, dG^2, dq, dk). What is [rows x hidden] lives
in a per-memory scratch buffer between passes (H^1, sigma'(K^1), B^1, G^1, Q^1, sigma'(Z^1), dZ^1, dA^2, dK^1: nine
slots), and the gradients of the state (dW, dS per layer), carried from span to span, live in the output buffers,
updated tile by tile. Each span's start state is recomputed per group of `stride` spans by the full-width
`_recompute_group`, as in the untiled kernel (it holds what the forward kernel holds, which fits at 64 x 256).

The passes of one span, in their order (tile t; sums over t marked Σ):
  1  K^1_t = k P1_t^T, H^1_t = sigma(K^1_t), D^1_t = sigma'(K^1_t); K^2 = Σ H^1_t P2_t^T, |H^1|^2 = Σ
  2  G^2 = 2 (K^2 - v); B^1_t = G^2 P2_t, G^1_t = B^1_t D^1_t, |G^1|^2 = Σ      -> the clip scales s^1, s^2
  3  Z^1_t (dual form), Q^1_t = sigma(Z^1_t); layer 2's sums: Q^1 H^1^T, the decay and carry gradients, its end
     state's (G^2 o_t, H^1 o_t^T, o . W)
  4  layer 2's tile VJP: dW^2_t, dS^2_t (into the carried buffers), dA^2_t, dZ^1_t = dh_t sigma'(Z^1_t); layer 1's
     sums: dZ^1 W^1, dZ^1 G^1^T, its end state's
  5  layer 1's tile VJP: dG^1_t, dW^1_t, dS^1_t; the key path's second-order terms: dK^1 (part), dG^2 += Σ, dP2_t
  6  dA^2_t += 2 dG^2 P2_t, dP2_t, dK^1_t, dk = Σ dK^1_t P1_t, dP1_t
`scan_triton_backward.scan_backward` launches it (`tiled=True`); tests/test_scan_triton.py holds it to the references
with tiles of 16 over hidden widths of 32 and 64.
"""

from __future__ import annotations

from titans.memory.scan_triton_backward import _activation_second, _store_coefficient_grads
from titans.memory.scan_triton_parts import _span_coefficients, _span_rows, jit, tl
from titans.memory.scan_triton_tiles import (
    _add_tile,
    _copy_tiles,
    _first,
    _hidden_tile,
    _key_passes,
    _load,
    _recompute_tiled,
    _second,
    _slot,
    _store_tile,
)

# Hidden columns per tile, and the launch options of both tiled kernels. Compiled for sm_90 at 64 x 256 with chunks of
# 16, this backward kernel took: with the default three pipeline stages 316 KB of shared memory (every tile load kept
# three times; 75 KB with one stage); with four warps 94 KB of register spills per thread (3.4 KB with eight); with
# tiles of 32 and eight warps 46 KB of shared memory and 1.9 KB of spills. Chunks of 64 spill far more at any tile.
HIDDEN_TILE = 32
LAUNCH = {"num_stages": 1, "num_warps": 8}
SLOTS = 9  # [rows x hidden] scratch slots per memory, as `_slot` numbers them (the host allocates them)


@jit
def _hidden_pass(
    qc, dz, G2, mixed1, dec1, car1, w1, s1, w2, s2, o2, p2, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """Pass 3: layer 1's query path Q^1 = sigma(Z^1) (mixed1 = (q k^T) * mix^1 * s^1), and layer 2's sums over the
    hidden width: r = Q^1 H^1^T, d decay, d carry, -sum(u * H^1) and -sum(w * H^1) (u = G^2 o, w = G^2 p),
    H^1 o^T, H^1 p^T, and o . W, o . S, p . S (the end coefficients' gradients)."""
    r2 = tl.zeros_like(mixed1)
    d_dec = tl.sum(dz, 1) * 0.0
    d_car, d_om, d_vs = d_dec, d_dec, d_dec
    Ea, Eb = tl.zeros_like(dz), tl.zeros_like(dz)
    d_ed = tl.sum(tl.sum(dz, 1), 0) * 0.0
    d_ec, d_md = d_ed, d_ed
    for h0 in range(0, BO1, BH):
        Q1, QD1, H1 = _hidden_tile(
            qc, mixed1, dec1, car1, w1, s1, scratch, m, h0, I1, O1, BI1, BO1, BH, R, SILU, MOMENTUM
        )
        tl.store(_slot(scratch, m, 4, h0, R, BH, BO1), Q1)
        tl.store(_slot(scratch, m, 5, h0, R, BH, BO1), QD1)
        r2 += tl.dot(Q1, tl.trans(H1), input_precision="ieee")
        W2 = _load(_second(w2, h0, O1, O2, BH, BO2))
        O2t, P2t = _load(_second(o2, h0, O1, O2, BH, BO2)), _load(_second(p2, h0, O1, O2, BH, BO2))
        d_dec += tl.sum(tl.dot(dz, W2, input_precision="ieee") * Q1, 1)
        u = tl.dot(G2, O2t, input_precision="ieee")
        w = tl.dot(G2, P2t, input_precision="ieee")
        d_om -= tl.sum(u * H1, 1)
        d_vs -= tl.sum(w * H1, 1)
        Ea += tl.dot(H1, tl.trans(O2t), input_precision="ieee")
        Eb += tl.dot(H1, tl.trans(P2t), input_precision="ieee")
        d_ed += tl.sum(tl.sum(O2t * W2, 1), 0)
        if MOMENTUM:
            S2 = _load(_second(s2, h0, O1, O2, BH, BO2))
            d_car += tl.sum(tl.dot(dz, S2, input_precision="ieee") * Q1, 1)
            d_ec += tl.sum(tl.sum(O2t * S2, 1), 0)
            d_md += tl.sum(tl.sum(P2t * S2, 1), 0)
    tl.debug_barrier()
    return r2, d_dec, d_car, d_om, d_vs, Ea, Eb, d_ed, d_ec, d_md


@jit
def _clip_rows(d_scale, g_norm, a_norm, clip):
    """The clip's VJP as row coefficients: dG += cg * G, dA += ca * A (`_clip_backward`, with the norms given)."""
    norm = g_norm * a_norm
    d_norm = tl.where(norm > clip, -d_scale * clip / tl.maximum(norm * norm, 1e-30), 0.0)
    return d_norm * a_norm / tl.maximum(g_norm, 1e-30), d_norm * g_norm / tl.maximum(a_norm, 1e-30)


@jit
def _layer2_pass(
    dz, G2, hm2, co2, dec2, car2, om2, vs2, c_a2, w2, s2, o2, p2, w1, s1, o1, p1, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """Pass 4: layer 2's tile VJP (query path at dz, end state at the carried (o2, p2), the clip's dA row
    coefficient c_a2), its dW, dS written over (o2, p2); dA^2 and dZ^1 to scratch; and layer 1's sums over the
    hidden width: dZ^1 W^1, dZ^1 S^1, dZ^1 G^1^T, G^1 o1, G^1 p1, o1 . W1, o1 . S1, p1 . S1. co2: (end decay, end
    carry, momentum decay) of layer 2. hm2 = (dz G^2^T) * mix^2 * s^2; om2, vs2: the clip-scaled end mixes."""
    ed2, ec2, md2 = co2
    x1 = tl.zeros([R, BI1], dtype=dz.dtype)
    xs1, u1, w1s = x1, x1, x1
    hg1 = tl.zeros_like(hm2)
    d_ed = tl.sum(tl.sum(dz, 1), 0) * 0.0
    d_ec, d_md = d_ed, d_ed
    for h0 in range(0, BO1, BH):
        H1 = tl.load(_slot(scratch, m, 0, h0, R, BH, BO1))
        Q1 = tl.load(_slot(scratch, m, 4, h0, R, BH, BO1))
        W2 = _load(_second(w2, h0, O1, O2, BH, BO2))
        O2t, P2t = _load(_second(o2, h0, O1, O2, BH, BO2)), _load(_second(p2, h0, O1, O2, BH, BO2))
        dh = dec2[:, None] * tl.dot(dz, W2, input_precision="ieee") - tl.dot(hm2, H1, input_precision="ieee")
        dW = tl.dot(tl.trans(dec2[:, None] * dz), Q1, input_precision="ieee") + ed2 * O2t
        dS = tl.zeros_like(dW)
        if MOMENTUM:
            S2 = _load(_second(s2, h0, O1, O2, BH, BO2))
            dh += car2[:, None] * tl.dot(dz, S2, input_precision="ieee")
            dS = tl.dot(tl.trans(car2[:, None] * dz), Q1, input_precision="ieee") + ec2 * O2t + md2 * P2t
        u = tl.dot(G2, O2t, input_precision="ieee")
        w = tl.dot(G2, P2t, input_precision="ieee")
        dA2 = -tl.dot(tl.trans(hm2), Q1, input_precision="ieee") - om2[:, None] * u - vs2[:, None] * w
        dA2 += c_a2[:, None] * H1
        _store_tile(_second(o2, h0, O1, O2, BH, BO2), dW)
        _store_tile(_second(p2, h0, O1, O2, BH, BO2), dS)
        dz1 = dh * tl.load(_slot(scratch, m, 5, h0, R, BH, BO1))
        tl.store(_slot(scratch, m, 6, h0, R, BH, BO1), dz1)
        tl.store(_slot(scratch, m, 7, h0, R, BH, BO1), dA2)
        G1 = tl.load(_slot(scratch, m, 3, h0, R, BH, BO1))
        W1 = _load(_first(w1, h0, I1, O1, BH, BI1))
        O1t, P1t = _load(_first(o1, h0, I1, O1, BH, BI1)), _load(_first(p1, h0, I1, O1, BH, BI1))
        x1 += tl.dot(dz1, W1, input_precision="ieee")
        hg1 += tl.dot(dz1, tl.trans(G1), input_precision="ieee")
        u1 += tl.dot(G1, O1t, input_precision="ieee")
        w1s += tl.dot(G1, P1t, input_precision="ieee")
        d_ed += tl.sum(tl.sum(O1t * W1, 1), 0)
        if MOMENTUM:
            S1 = _load(_first(s1, h0, I1, O1, BH, BI1))
            xs1 += tl.dot(dz1, S1, input_precision="ieee")
            d_ec += tl.sum(tl.sum(O1t * S1, 1), 0)
            d_md += tl.sum(tl.sum(P1t * S1, 1), 0)
    tl.debug_barrier()
    return x1, xs1, hg1, u1, w1s, d_ed, d_ec, d_md


@jit
def _layer1_pass(
    qc, kc, G2, mixed_t1, co1, dec1, car1, om1, vs1, c_g1, key1, key2, o1, p1, o2, d2, anchor_span, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """Pass 5: layer 1's tile VJP (mixed_t1 = ((q k^T) * mix^1 * s^1)^T; the clip's dG row coefficient c_g1), its
    dW, dS written over (o1, p1); the key path's second-order terms: dK^1 (its dG^1 part) to scratch, G^2^T dB^1
    into P2's gradient (d2: the anchor's buffer for the resumed first span, else o2), and returns Σ dB^1 P2^T."""
    ed1, ec1, md1 = co1
    dG2 = tl.zeros([R, BO2], dtype=qc.dtype)
    for h0 in range(0, BO1, BH):
        dz1 = tl.load(_slot(scratch, m, 6, h0, R, BH, BO1))
        G1 = tl.load(_slot(scratch, m, 3, h0, R, BH, BO1))
        O1t, P1t = _load(_first(o1, h0, I1, O1, BH, BI1)), _load(_first(p1, h0, I1, O1, BH, BI1))
        dG1 = -tl.dot(mixed_t1, dz1, input_precision="ieee") + c_g1[:, None] * G1
        dG1 -= om1[:, None] * tl.dot(kc, tl.trans(O1t), input_precision="ieee")
        dG1 -= vs1[:, None] * tl.dot(kc, tl.trans(P1t), input_precision="ieee")
        dW = tl.dot(tl.trans(dec1[:, None] * dz1), qc, input_precision="ieee") + ed1 * O1t
        dS = tl.zeros_like(dW)
        if MOMENTUM:
            dS = tl.dot(tl.trans(car1[:, None] * dz1), qc, input_precision="ieee") + ec1 * O1t + md1 * P1t
        _store_tile(_first(o1, h0, I1, O1, BH, BI1), dW)
        _store_tile(_first(p1, h0, I1, O1, BH, BI1), dS)
        d_back = dG1 * tl.load(_slot(scratch, m, 1, h0, R, BH, BO1))
        K1 = tl.dot(kc, tl.trans(_load(_first(key1, h0, I1, O1, BH, BI1))), input_precision="ieee")
        d_pre = dG1 * tl.load(_slot(scratch, m, 2, h0, R, BH, BO1)) * _activation_second(K1, SILU)
        tl.store(_slot(scratch, m, 8, h0, R, BH, BO1), d_pre)
        dG2 += tl.dot(d_back, tl.trans(_load(_second(key2, h0, O1, O2, BH, BO2))), input_precision="ieee")
        dP2 = tl.dot(tl.trans(G2), d_back, input_precision="ieee")
        if anchor_span:
            _store_tile(_second(d2, h0, O1, O2, BH, BO2), dP2)
        else:
            _add_tile(_second(o2, h0, O1, O2, BH, BO2), dP2)
    tl.debug_barrier()
    return dG2


@jit
def _key_pass(
    kc, dG2, key1, key2, o1, o2, d1, d2, g1, g2, anchor_span, last_span, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Pass 6: dA^2 += 2 dG^2 P2, P2's other gradient term (2 dG^2)^T H^1, dK^1 += dA^2 sigma'(K^1), P1's gradient
    dK^1^T k, each P's gradient into the carried dW (or, for the resumed first span, the anchor's buffers d1, d2),
    the last span's start-weight gradients (g1, g2) into the carried dW; returns Σ dK^1 P1 (dk's key-path part)."""
    dk = tl.zeros([R, BI1], dtype=kc.dtype)
    for h0 in range(0, BO1, BH):
        P2 = _load(_second(key2, h0, O1, O2, BH, BO2))
        H1 = tl.load(_slot(scratch, m, 0, h0, R, BH, BO1))
        dA2 = tl.load(_slot(scratch, m, 7, h0, R, BH, BO1)) + tl.dot(2.0 * dG2, P2, input_precision="ieee")
        dP2 = tl.dot(tl.trans(2.0 * dG2), H1, input_precision="ieee")
        d_pre = tl.load(_slot(scratch, m, 8, h0, R, BH, BO1)) + dA2 * tl.load(_slot(scratch, m, 1, h0, R, BH, BO1))
        dk += tl.dot(d_pre, _load(_first(key1, h0, I1, O1, BH, BI1)), input_precision="ieee")
        dP1 = tl.dot(tl.trans(d_pre), kc, input_precision="ieee")
        if anchor_span:
            _add_tile(_second(d2, h0, O1, O2, BH, BO2), dP2)
            _store_tile(_first(d1, h0, I1, O1, BH, BI1), dP1)
        else:
            _add_tile(_second(o2, h0, O1, O2, BH, BO2), dP2)
            _add_tile(_first(o1, h0, I1, O1, BH, BI1), dP1)
        if last_span:  # the weights at the start of the last span are an output too
            _add_tile(_second(o2, h0, O1, O2, BH, BO2), _load(_second(g2, h0, O1, O2, BH, BO2)))
            _add_tile(_first(o1, h0, I1, O1, BH, BI1), _load(_first(g1, h0, I1, O1, BH, BI1)))
    tl.debug_barrier()
    return dk


@jit
def _span_tiled(
    qc, kc, vc, dz, w1, s1, w2, s2, key1, key2, o1, p1, o2, p2, d1, d2, g1, g2, anchor_span, last_span,
    at1, at2, clip, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr,
    CLIP: tl.constexpr,
):  # fmt: skip
    """The VJP of one span of a depth-2 memory (`_span_backward`'s formulas, in the passes of the module docstring):
    (w, s) its start state per layer, key1/key2 the key path's weights (the anchor for a resumed first span), (o, p)
    the carried gradients, updated in place to the span start's; at1/at2 its coefficients' grid index per layer.
    Stores the coefficients' gradients; returns dq, dk, dv."""
    rows = tl.arange(0, R)
    lower = rows[:, None] >= rows[None, :]
    G2, h_norm, g_norm = _key_passes(kc, vc, key1, key2, scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, SILU)
    dec1, car1, mix1, omega1, mom1, ed1, ec1, md1 = _span_coefficients(
        decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, at1, R
    )
    dec2, car2, mix2, omega2, mom2, ed2, ec2, md2 = _span_coefficients(
        decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, at2, R
    )
    k_norm, g2_norm = tl.sqrt(tl.sum(kc * kc, 1)), tl.sqrt(tl.sum(G2 * G2, 1))
    scale1, scale2 = k_norm * 0.0 + 1.0, k_norm * 0.0 + 1.0
    if CLIP:
        scale1 = clip / tl.maximum(clip, tl.sqrt(g_norm) * k_norm)
        scale2 = clip / tl.maximum(clip, g2_norm * tl.sqrt(h_norm))
    rq1 = tl.dot(qc, tl.trans(kc), input_precision="ieee")
    r2, d_dec2, d_car2, d_om2, d_vs2, Ea, Eb, d_ed2, d_ec2, d_md2 = _hidden_pass(
        qc, dz, G2, rq1 * mix1 * scale1[None, :], dec1, car1, w1, s1, w2, s2, o2, p2, scratch, m,
        I1, O1, O2, BI1, BO1, BO2, BH, R, SILU, MOMENTUM,
    )  # fmt: skip
    # ---- layer 2: what needs the whole hidden width (its dual form's and end state's row terms, the clip)
    mix_s2 = mix2 * scale2[None, :]
    hg2 = tl.dot(dz, tl.trans(G2), input_precision="ieee")
    om2, vs2 = omega2 * scale2, mom2 * scale2
    dG2 = -tl.dot(tl.trans(r2 * mix_s2), dz, input_precision="ieee") - om2[:, None] * Ea - vs2[:, None] * Eb
    d_mixed2 = tl.where(lower, -(hg2 * r2), 0.0)
    _store_coefficient_grads(
        d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, at2,
        d_dec2, d_car2, d_mixed2 * scale2[None, :], d_om2 * scale2, d_vs2 * scale2, d_ed2, d_ec2, d_md2, R,
    )  # fmt: skip
    c_a2 = k_norm * 0.0
    if CLIP:
        d_scale2 = tl.sum(d_mixed2 * mix2, 0) + d_om2 * omega2 + d_vs2 * mom2
        c_g2, c_a2 = _clip_rows(d_scale2, g2_norm, tl.sqrt(h_norm), clip)
        dG2 += c_g2[:, None] * G2
    x1, xs1, hg1, u1, w1s, d_ed1, d_ec1, d_md1 = _layer2_pass(
        dz, G2, hg2 * mix_s2, (ed2, ec2, md2), dec2, car2, om2, vs2, c_a2, w2, s2, o2, p2, w1, s1, o1, p1,
        scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, MOMENTUM,
    )  # fmt: skip
    # ---- layer 1: its row terms, then its tiles with the key path's second-order terms
    mix_s1 = mix1 * scale1[None, :]
    hm1 = hg1 * mix_s1
    om1, vs1 = omega1 * scale1, mom1 * scale1
    dq = dec1[:, None] * x1 - tl.dot(hm1, kc, input_precision="ieee")
    dk = -tl.dot(tl.trans(hm1), qc, input_precision="ieee") - om1[:, None] * u1 - vs1[:, None] * w1s
    if MOMENTUM:
        dq += car1[:, None] * xs1
    d_mixed1 = tl.where(lower, -(hg1 * rq1), 0.0)
    d_om1, d_vs1 = -tl.sum(u1 * kc, 1), -tl.sum(w1s * kc, 1)
    _store_coefficient_grads(
        d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, at1,
        tl.sum(x1 * qc, 1), tl.sum(xs1 * qc, 1), d_mixed1 * scale1[None, :], d_om1 * scale1, d_vs1 * scale1,
        d_ed1, d_ec1, d_md1, R,
    )  # fmt: skip
    c_g1 = k_norm * 0.0
    if CLIP:
        d_scale1 = tl.sum(d_mixed1 * mix1, 0) + d_om1 * omega1 + d_vs1 * mom1
        c_g1, c_a1 = _clip_rows(d_scale1, tl.sqrt(g_norm), k_norm, clip)
        dk += c_a1[:, None] * kc
    dG2 += _layer1_pass(
        qc, kc, G2, tl.trans(rq1 * mix_s1), (ed1, ec1, md1), dec1, car1, om1, vs1, c_g1, key1, key2, o1, p1, o2, d2,
        anchor_span, scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, SILU, MOMENTUM,
    )  # fmt: skip
    dk += _key_pass(
        kc, dG2, key1, key2, o1, o2, d1, d2, g1, g2, anchor_span, last_span, scratch, m,
        I1, O1, O2, BI1, BO1, BO2, BH, R,
    )  # fmt: skip
    return dq, dk, -2.0 * dG2


@jit
def _scan_backward_tiled_kernel(
    q_ptr, k_ptr, v_ptr, dy_ptr, dq_ptr, dk_ptr, dv_ptr,
    kw1_ptr, kw2_ptr, ks1_ptr, ks2_ptr, a1_ptr, a2_ptr,
    gw1_ptr, gw2_ptr, gs1_ptr, gs2_ptr, gl1_ptr, gl2_ptr,
    dw1_ptr, dw2_ptr, ds1_ptr, ds2_ptr, da1_ptr, da2_ptr, sw1_ptr, sw2_ptr, ss1_ptr, ss2_ptr,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
    d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, start_ptr, length_ptr, scratch,
    n_mem, T, n, n_kept, stride, clip,
    DEPTH: tl.constexpr, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
    BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr, ANCHOR: tl.constexpr, CLIP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """`_scan_backward_kernel` for a depth-2 memory, tiled over the hidden width (BH columns); same arguments, plus
    `scratch` [N, 9, R, BO1]. The carried gradients live in the output buffers dw*, ds* from the start."""
    m = tl.program_id(0)
    i1, o2r = tl.arange(0, BI1), tl.arange(0, BO2)
    size1, size2 = O1 * I1, O2 * O1
    o1, p1, o2, p2 = dw1_ptr + m * size1, ds1_ptr + m * size1, dw2_ptr + m * size2, ds2_ptr + m * size2
    _copy_tiles(gw1_ptr + m * size1, o1, gw2_ptr + m * size2, o2, I1, O1, O2, BI1, BO1, BO2, BH)
    _copy_tiles(gs1_ptr + m * size1, p1, gs2_ptr + m * size2, p2, I1, O1, O2, BI1, BO1, BO2, BH)
    tl.debug_barrier()
    for gi in range(0, n_kept):
        g = n_kept - 1 - gi
        first = g * stride
        count = tl.minimum(stride, n - first)
        _recompute_tiled(
            k_ptr, v_ptr, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr, sw1_ptr, ss1_ptr, sw2_ptr, ss2_ptr,
            a1_ptr + m * size1, a2_ptr + m * size2, decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
            start_ptr, length_ptr, scratch, m, g, first, count, n_mem, T, n, n_kept, stride, clip,
            I1, O1, O2, BI1, BO1, BO2, BH, R, SILU, MOMENTUM, ANCHOR, CLIP,
        )  # fmt: skip
        tl.debug_barrier()
        for jj in range(0, count):
            j = count - 1 - jj
            c = first + j
            w1, s1 = sw1_ptr + (m * stride + j) * size1, ss1_ptr + (m * stride + j) * size1
            w2, s2 = sw2_ptr + (m * stride + j) * size2, ss2_ptr + (m * stride + j) * size2
            anchor_span = c < 0  # False
            if ANCHOR:
                anchor_span = c == 0
            key1 = tl.where(anchor_span, a1_ptr + m * size1, w1)
            key2 = tl.where(anchor_span, a2_ptr + m * size2, w2)
            tok, in_rows, out_rows, qc, kc, vc = _span_rows(
                q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, m, T, c, I1, O2, BI1, BO2, R
            )
            dz = tl.load(dy_ptr + tok[:, None] * O2 + o2r[None, :], mask=out_rows, other=0.0)
            dq, dk, dv = _span_tiled(
                qc, kc, vc, dz, w1, s1, w2, s2, key1, key2, o1, p1, o2, p2,
                da1_ptr + m * size1, da2_ptr + m * size2, gl1_ptr + m * size1, gl2_ptr + m * size2,
                anchor_span, c == n - 1, m * n + c, (n_mem + m) * n + c, clip,
                decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr,
                d_decay_ptr, d_carry_ptr, d_mix_ptr, d_ends_ptr, d_end_mix_ptr, scratch, m,
                I1, O1, O2, BI1, BO1, BO2, BH, R, SILU, MOMENTUM, CLIP,
            )  # fmt: skip
            tl.store(dq_ptr + tok[:, None] * I1 + i1[None, :], dq, mask=in_rows)
            tl.store(dk_ptr + tok[:, None] * I1 + i1[None, :], dk, mask=in_rows)
            tl.store(dv_ptr + tok[:, None] * O2 + o2r[None, :], dv, mask=out_rows)
