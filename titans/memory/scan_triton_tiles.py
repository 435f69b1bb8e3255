"""Tiles of the hidden width for `scan_triton_tiled`'s reverse scan: addressing, the key path and the recompute.

A depth-2 memory's layers are W^1 [hidden, d_in] and W^2 [d_out, hidden]; a tile is BH rows of the first
(`_first`: [BH, d_in]) or BH columns of the second (`_second`: [d_out, BH]), and [rows x BH] of a scratch slot
(`_slot`). `_key_passes` runs the key path at the anchor over the tiles (K^2 sums over them), and `_recompute_tiled`
rebuilds a group's span-start states tile by tile from the state the forward kept, as `_recompute_group` does at
full width.
"""

from __future__ import annotations

from titans.memory.scan_triton_parts import _activation, _span_coefficients, jit, tl


@jit
def _first(base, h0, I1: tl.constexpr, O1: tl.constexpr, BH: tl.constexpr, BI1: tl.constexpr):
    """Pointers and mask of rows h0 .. h0+BH of a layer-1 matrix [O1, I1] at base: a [BH, BI1] tile."""
    h, i = h0 + tl.arange(0, BH), tl.arange(0, BI1)
    return base + h[:, None] * I1 + i[None, :], (h[:, None] < O1) & (i[None, :] < I1)


@jit
def _second(base, h0, O1: tl.constexpr, O2: tl.constexpr, BH: tl.constexpr, BO2: tl.constexpr):
    """Pointers and mask of columns h0 .. h0+BH of a layer-2 matrix [O2, O1] at base: a [BO2, BH] tile."""
    o, h = tl.arange(0, BO2), h0 + tl.arange(0, BH)
    return base + o[:, None] * O1 + h[None, :], (o[:, None] < O2) & (h[None, :] < O1)


@jit
def _slot(scratch, m, slot, h0, R: tl.constexpr, BH: tl.constexpr, BO1: tl.constexpr):
    """Pointers of tile h0 of one [R, BO1] scratch slot of memory m; the slots (jit code cannot read module
    constants): 0 H^1, 1 sigma'(K^1), 2 B^1, 3 G^1, 4 Q^1, 5 sigma'(Z^1), 6 dZ^1, 7 dA^2, 8 dK^1."""
    r, h = tl.arange(0, R), h0 + tl.arange(0, BH)
    return scratch + (m * 9 + slot) * R * BO1 + r[:, None] * BO1 + h[None, :]


@jit
def _load(pointers_mask):
    pointers, mask = pointers_mask
    return tl.load(pointers, mask=mask, other=0.0)


@jit
def _key_passes(
    kc, vc, w1, w2, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """Passes 1 and 2 at the anchor (w1, w2: bases of P1, P2): returns G^2 [R, BO2], |H^1|^2 and |G^1|^2 per row;
    H^1, D^1, B^1, G^1 go to scratch."""
    K2 = tl.zeros_like(vc)
    h_norm = tl.sum(vc, 1) * 0.0
    for h0 in range(0, BO1, BH):
        K1 = tl.dot(kc, tl.trans(_load(_first(w1, h0, I1, O1, BH, BI1))), input_precision="ieee")
        H1, D1 = _activation(K1, SILU)
        K2 += tl.dot(H1, tl.trans(_load(_second(w2, h0, O1, O2, BH, BO2))), input_precision="ieee")
        h_norm += tl.sum(H1 * H1, 1)
        tl.store(_slot(scratch, m, 0, h0, R, BH, BO1), H1)
        tl.store(_slot(scratch, m, 1, h0, R, BH, BO1), D1)
    G2 = 2.0 * (K2 - vc)
    g_norm = h_norm * 0.0
    tl.debug_barrier()
    for h0 in range(0, BO1, BH):
        B1 = tl.dot(G2, _load(_second(w2, h0, O1, O2, BH, BO2)), input_precision="ieee")
        G1 = B1 * tl.load(_slot(scratch, m, 1, h0, R, BH, BO1))
        g_norm += tl.sum(G1 * G1, 1)
        tl.store(_slot(scratch, m, 2, h0, R, BH, BO1), B1)
        tl.store(_slot(scratch, m, 3, h0, R, BH, BO1), G1)
    tl.debug_barrier()
    return G2, h_norm, g_norm


@jit
def _store_tile(pointers_mask, value):
    pointers, mask = pointers_mask
    tl.store(pointers, value, mask=mask)


@jit
def _add_tile(pointers_mask, value):
    pointers, mask = pointers_mask
    tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + value, mask=mask)


@jit
def _copy_tiles(src1, dst1, src2, dst2, I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr,
                BI1: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, BH: tl.constexpr):  # fmt: skip
    """dst1 <- src1 (a layer-1 matrix) and dst2 <- src2 (a layer-2 matrix), tile by tile."""
    for h0 in range(0, BO1, BH):
        _store_tile(_first(dst1, h0, I1, O1, BH, BI1), _load(_first(src1, h0, I1, O1, BH, BI1)))
        _store_tile(_second(dst2, h0, O1, O2, BH, BO2), _load(_second(src2, h0, O1, O2, BH, BO2)))


@jit
def _end_state_tiles(
    kc, G2, w1, s1, w2, s2, n1, t1, n2, t2, co1, co2, scale1, scale2, scratch, m,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """A span's end state (`_end_state` per layer) tile by tile, from its start state (w, s) into (n, t); co: the
    layer's coefficients from `_span_coefficients`, scale the clip scales; G^1 and H^1 from scratch."""
    _, _, _, omega1, mom1, ed1, ec1, md1 = co1
    _, _, _, omega2, mom2, ed2, ec2, md2 = co2
    for h0 in range(0, BO1, BH):
        G1 = tl.load(_slot(scratch, m, 3, h0, R, BH, BO1))
        H1 = tl.load(_slot(scratch, m, 0, h0, R, BH, BO1))
        W1, W2 = _load(_first(w1, h0, I1, O1, BH, BI1)), _load(_second(w2, h0, O1, O2, BH, BO2))
        new_w1 = ed1 * W1 - tl.dot(tl.trans(G1 * (omega1 * scale1)[:, None]), kc, input_precision="ieee")
        new_s1 = -tl.dot(tl.trans(G1 * (mom1 * scale1)[:, None]), kc, input_precision="ieee")
        new_w2 = ed2 * W2 - tl.dot(tl.trans(G2 * (omega2 * scale2)[:, None]), H1, input_precision="ieee")
        new_s2 = -tl.dot(tl.trans(G2 * (mom2 * scale2)[:, None]), H1, input_precision="ieee")
        if MOMENTUM:
            S1, S2 = _load(_first(s1, h0, I1, O1, BH, BI1)), _load(_second(s2, h0, O1, O2, BH, BO2))
            new_w1 += ec1 * S1
            new_s1 += md1 * S1
            new_w2 += ec2 * S2
            new_s2 += md2 * S2
        _store_tile(_first(n1, h0, I1, O1, BH, BI1), new_w1)
        _store_tile(_first(t1, h0, I1, O1, BH, BI1), new_s1)
        _store_tile(_second(n2, h0, O1, O2, BH, BO2), new_w2)
        _store_tile(_second(t2, h0, O1, O2, BH, BO2), new_s2)
    tl.debug_barrier()


@jit
def _recompute_tiled(
    k_ptr, v_ptr, kw1_ptr, ks1_ptr, kw2_ptr, ks2_ptr, sw1_ptr, ss1_ptr, sw2_ptr, ss2_ptr, a1, a2,
    decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, start_ptr, length_ptr, scratch,
    m, g, first, count, n_mem, T, n, n_kept, stride, clip,
    I1: tl.constexpr, O1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr,
    BO2: tl.constexpr, BH: tl.constexpr, R: tl.constexpr, SILU: tl.constexpr, MOMENTUM: tl.constexpr,
    ANCHOR: tl.constexpr, CLIP: tl.constexpr,
):  # fmt: skip
    """`_recompute_group` tile by tile: the start states of the group's `count` spans, from the one the forward kept
    (g), into scratch slots 0..count-1 (slot j + 1 is span first + j's end state)."""
    rows, i1, o2r = tl.arange(0, R), tl.arange(0, BI1), tl.arange(0, BO2)
    size1, size2 = O1 * I1, O2 * O1
    kept1, kept2 = (m * n_kept + g) * size1, (m * n_kept + g) * size2
    slot1, slot2 = m * stride * size1, m * stride * size2
    _copy_tiles(kw1_ptr + kept1, sw1_ptr + slot1, kw2_ptr + kept2, sw2_ptr + slot2, I1, O1, O2, BI1, BO1, BO2, BH)
    _copy_tiles(ks1_ptr + kept1, ss1_ptr + slot1, ks2_ptr + kept2, ss2_ptr + slot2, I1, O1, O2, BI1, BO1, BO2, BH)
    tl.debug_barrier()
    for j in range(0, count - 1):
        c = first + j
        w1, s1 = sw1_ptr + slot1 + j * size1, ss1_ptr + slot1 + j * size1
        w2, s2 = sw2_ptr + slot2 + j * size2, ss2_ptr + slot2 + j * size2
        anchor_span = c < 0  # False
        if ANCHOR:
            anchor_span = c == 0
        key1, key2 = tl.where(anchor_span, a1, w1), tl.where(anchor_span, a2, w2)
        tok = m * T + tl.load(start_ptr + c) + rows
        row_in = rows < tl.load(length_ptr + c)
        kc = tl.load(k_ptr + tok[:, None] * I1 + i1[None, :], mask=row_in[:, None] & (i1[None, :] < I1), other=0.0)
        vc = tl.load(v_ptr + tok[:, None] * O2 + o2r[None, :], mask=row_in[:, None] & (o2r[None, :] < O2), other=0.0)
        G2, h_norm, g_norm = _key_passes(kc, vc, key1, key2, scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, SILU)
        co1 = _span_coefficients(decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, m * n + c, R)
        co2 = _span_coefficients(decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, (n_mem + m) * n + c, R)
        scale1, scale2 = h_norm * 0.0 + 1.0, h_norm * 0.0 + 1.0
        if CLIP:
            scale1 = clip / tl.maximum(clip, tl.sqrt(g_norm) * tl.sqrt(tl.sum(kc * kc, 1)))
            scale2 = clip / tl.maximum(clip, tl.sqrt(tl.sum(G2 * G2, 1)) * tl.sqrt(h_norm))
        _end_state_tiles(
            kc, G2, w1, s1, w2, s2, w1 + size1, s1 + size1, w2 + size2, s2 + size2, co1, co2, scale1, scale2,
            scratch, m, I1, O1, O2, BI1, BO1, BO2, BH, R, MOMENTUM,
        )  # fmt: skip


@jit
def _hidden_tile(
    qc, mixed1, dec1, car1, w1, s1, scratch, m, h0,
    I1: tl.constexpr, O1: tl.constexpr, BI1: tl.constexpr, BO1: tl.constexpr, BH: tl.constexpr, R: tl.constexpr,
    SILU: tl.constexpr, MOMENTUM: tl.constexpr,
):  # fmt: skip
    """Layer 1's query path on hidden tile h0 (`_dual_layer` on a tile): Z^1_t = decay . (q W^1_t^T) + carry .
    (q S^1_t^T) - mixed1 G^1_t with mixed1 = (q k^T) * mix^1 * s^1; returns sigma(Z^1_t), sigma'(Z^1_t) and H^1_t
    (G^1_t and H^1_t from scratch)."""
    G1 = tl.load(_slot(scratch, m, 3, h0, R, BH, BO1))
    Z1 = dec1[:, None] * tl.dot(qc, tl.trans(_load(_first(w1, h0, I1, O1, BH, BI1))), input_precision="ieee")
    Z1 -= tl.dot(mixed1, G1, input_precision="ieee")
    if MOMENTUM:
        Z1 += car1[:, None] * tl.dot(qc, tl.trans(_load(_first(s1, h0, I1, O1, BH, BI1))), input_precision="ieee")
    Q1, QD1 = _activation(Z1, SILU)
    return Q1, QD1, tl.load(_slot(scratch, m, 0, h0, R, BH, BO1))
