"""The fused memory scan in plain tensor ops: forward over chunks, and the reverse scan with a hand-written backward.

This is the portable implementation of the op behind `fused_memory` (`fused.py`); `csrc/scan.cpp` is the same
algorithm in C++ and both are tested against `chunked_memory` and each other. Neither builds an autograd graph:
the forward keeps only chunk-start states, the backward recomputes each chunk from its stored state and applies
the chunk's vector-Jacobian product by hand (derivation: `titans/memory/README.md`, "The fused scan").

Layout (N = batch * heads independent memories, n chunks of b rows, the last rows of a chunk may be padding):
    q, k, v                      [N, n, b, D]
    per layer l, `ScanCoefficients` (built with autograd by `fused.py` from the gates):
      decay   A_t                [N, n, b]      carry  rho_t     [N, n, b] (empty without momentum)
      mix     C_{t,i} theta_i    [N, n, b, b]   (zero above the diagonal)
      end_decay, end_carry       [N, n]         A and rho at the chunk's last real row r - 1
      end_mix                    [N, n, b]      mix[r - 1, :]  (omega)
      mom_decay  E_r             [N, n]         (empty without momentum)
      mom_mix    theta_i E_r/E_i [N, n, b]      (without momentum: theta at row r - 1, zero elsewhere)
    weights, momentum            per layer [N, d_l, d_{l-1}]: the state at the start of the first chunk
    anchor                       per layer, or empty: the first chunk's anchor when it resumes mid-chunk
    lengths                      real rows of each chunk (b, except a first or last partial chunk)

Per chunk with start state (W, S), anchor W' (W itself unless resumed mid-chunk), and inner-gradient scale
s_t^l = clip / max(clip, |g_t^l| |a_t^l|) (1 without clipping):
    key path at W'   A^1 = k, K^l = A^l W'^lT, A^{l+1} = sigma(K^l)
                     G^L = 2(K^L - v), G^l = (G^{l+1} W'^{l+1}) sigma'(K^l)
    query path       Z^l = A.(Q^{l-1} W^T) + rho.(Q^{l-1} S^T) - ((Q^{l-1} A^lT) * mix * s) G^l
                     Q^l = sigma(Z^l), y = Z^L
    end state        W_r = A_r W + rho_r S - G^T ((omega s) . A),  S_r = E_r S - G^T ((mom_mix s) . A)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from titans.memory.network import activation_and_derivative, activation_second_derivative

COEFFICIENTS_PER_LAYER = 8


class ScanCoefficients(NamedTuple):
    """One layer's chunk coefficients (shapes in the module docstring); carry, end_carry, mom_decay are empty
    tensors without momentum."""

    decay: Tensor
    carry: Tensor
    mix: Tensor
    end_decay: Tensor
    end_carry: Tensor
    end_mix: Tensor
    mom_decay: Tensor
    mom_mix: Tensor


class ScanSettings(NamedTuple):
    """Everything about a scan that is not a tensor."""

    lengths: tuple[int, ...]  # real rows of each chunk
    activation: str  # "gelu" | "silu"
    clip: float  # per-token inner-gradient norm bound; 0 = off
    stride: int  # chunk-start states kept every `stride` chunks (the backward recomputes the ones in between)
    momentum: bool


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class _KeyPath(NamedTuple):
    """The keys through the anchor network (rows of one chunk): inputs A^l, pre-activations K^l, sigma'(K^l),
    pre-activation gradients G^l, B^l = G^{l+1} W'^{l+1} (for the second-order terms), and the clip scales."""

    inputs: list[Tensor]
    pre: list[Tensor]
    derivs: list[Tensor]
    grads: list[Tensor]
    back: list[Tensor]
    scales: list[Tensor | None]


def _key_path(anchor: Sequence[Tensor], k: Tensor, v: Tensor, settings: ScanSettings) -> _KeyPath:
    depth = len(anchor)
    inputs, pre, derivs, h = [], [], [], k
    for i, w in enumerate(anchor):
        inputs.append(h)
        z = torch.bmm(h, _t(w))
        pre.append(z)
        if i < depth - 1:
            h, d = activation_and_derivative(z, settings.activation)
            derivs.append(d)
    g = 2.0 * (pre[-1] - v)
    grads, back = [g], []
    for i in range(depth - 1, 0, -1):
        b = torch.bmm(g, anchor[i])
        g = b * derivs[i - 1]
        back.append(b)
        grads.append(g)
    grads.reverse()
    back.reverse()
    scales: list[Tensor | None] = [None] * depth
    if settings.clip > 0:
        scales = [
            settings.clip / (g.norm(dim=-1) * a.norm(dim=-1)).clamp_min(settings.clip)
            for g, a in zip(grads, inputs, strict=True)
        ]
    return _KeyPath(inputs, pre, derivs, grads, back, scales)


def _scaled(x: Tensor, scale: Tensor | None) -> Tensor:
    """x [N, r] or [N, r, r] with the token (last) axis scaled by the clip scale [N, r]."""
    if scale is None:
        return x
    return x * (scale.unsqueeze(-2) if x.dim() == 3 else scale)


def _chunk_coefficients(co: Sequence[ScanCoefficients], c: int, r: int) -> list[ScanCoefficients]:
    """The coefficients of chunk c restricted to its r real rows."""
    out = []
    for layer in co:
        out.append(
            ScanCoefficients(
                layer.decay[:, c, :r],
                layer.carry[:, c, :r] if layer.carry.numel() else layer.carry,
                layer.mix[:, c, :r, :r],
                layer.end_decay[:, c],
                layer.end_carry[:, c] if layer.end_carry.numel() else layer.end_carry,
                layer.end_mix[:, c, :r],
                layer.mom_decay[:, c] if layer.mom_decay.numel() else layer.mom_decay,
                layer.mom_mix[:, c, :r],
            )
        )
    return out


def _end_state(
    w: Tensor, s: Tensor, kp: _KeyPath, i: int, co: ScanCoefficients, momentum: bool
) -> tuple[Tensor, Tensor]:
    """(W_r, S_r) of layer i from the chunk-start (W, S)."""
    g, a = kp.grads[i], kp.inputs[i]
    omega = _scaled(co.end_mix, kp.scales[i])
    varsigma = _scaled(co.mom_mix, kp.scales[i])
    w_new = co.end_decay[:, None, None] * w - torch.bmm(_t(g * omega.unsqueeze(-1)), a)
    s_new = -torch.bmm(_t(g * varsigma.unsqueeze(-1)), a)
    if momentum:
        w_new = w_new + co.end_carry[:, None, None] * s
        s_new = s_new + co.mom_decay[:, None, None] * s
    return w_new, s_new


def _query_path(q: Tensor, ws: Sequence[Tensor], ss: Sequence[Tensor], kp: _KeyPath, co, settings: ScanSettings):
    """Outputs of the chunk's rows (dual form); also returns each layer's input Q^{l-1}, the masked mixes
    P^l = (Q^{l-1} A^lT) * mix * s, R^l = Q^{l-1} A^lT, and sigma'(Z^l) for l < L."""
    depth = len(ws)
    h, hs, rs, ps, derivs = q, [], [], [], []
    for i in range(depth):
        hs.append(h)
        z = co[i].decay.unsqueeze(-1) * torch.bmm(h, _t(ws[i]))
        if settings.momentum:
            z = z + co[i].carry.unsqueeze(-1) * torch.bmm(h, _t(ss[i]))
        r = torch.bmm(h, _t(kp.inputs[i]))
        p = r * _scaled(co[i].mix, kp.scales[i])
        z = z - torch.bmm(p, kp.grads[i])
        rs.append(r)
        ps.append(p)
        if i < depth - 1:
            h, d = activation_and_derivative(z, settings.activation)
            derivs.append(d)
        else:
            h = z
    return h, hs, rs, ps, derivs


def scan_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: Sequence[ScanCoefficients],
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    anchor: Sequence[Tensor],
    settings: ScanSettings,
    save: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Returns y [N, n, b, D] (zero on padding rows), the final weights and momentum, the weights at the start of the
    last chunk, and (when `save`) what the backward needs: the kept weights then momentum, per layer
    [N, n_kept, d_l, d_{l-1}]."""
    n = len(settings.lengths)
    ws, ss = list(weights), list(momentum)
    y = torch.zeros_like(q)
    kept_w: list[list[Tensor]] = [[] for _ in ws]
    kept_s: list[list[Tensor]] = [[] for _ in ws]
    last_start = ws
    for c, r in enumerate(settings.lengths):
        if save and c % settings.stride == 0:
            for i in range(len(ws)):
                kept_w[i].append(ws[i])
                kept_s[i].append(ss[i])
        if c == n - 1:
            last_start = ws
        anc = anchor if (c == 0 and anchor) else ws
        co = _chunk_coefficients(coefficients, c, r)
        kp = _key_path(anc, k[:, c, :r], v[:, c, :r], settings)
        y[:, c, :r] = _query_path(q[:, c, :r], ws, ss, kp, co, settings)[0]
        ends = [_end_state(ws[i], ss[i], kp, i, co[i], settings.momentum) for i in range(len(ws))]
        ws, ss = [e[0] for e in ends], [e[1] for e in ends]
    saved = [torch.stack(x, dim=1) for x in kept_w + kept_s] if save else []
    return y, ws, ss, list(last_start), saved


def _chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dy: Tensor,
    co: list[ScanCoefficients],
    ws: list[Tensor],
    ss: list[Tensor],
    anc: list[Tensor],
    omega: list[Tensor],
    psi: list[Tensor],
    settings: ScanSettings,
):
    """VJP of one chunk (rows r). omega, psi: gradients of the chunk's end (W_r, S_r). Returns dq, dk, dv, the
    coefficient gradients (ScanCoefficients of this chunk's rows), dW, dS (of the chunk-start state) and dW' (of the
    anchor; summed into dW by the caller when the anchor is W)."""
    depth = len(ws)
    momentum = settings.momentum
    kp = _key_path(anc, k, v, settings)
    _, hs, rs, ps, qderivs = _query_path(q, ws, ss, kp, co, settings)
    d_inputs = [torch.zeros_like(a) for a in kp.inputs]
    d_grads = [torch.zeros_like(g) for g in kp.grads]
    d_scales = [torch.zeros_like(kp.inputs[0][..., 0]) for _ in range(depth)]
    d_w, d_s, d_co = [None] * depth, [None] * depth, [None] * depth
    dz = dy
    # query path (dual form), last layer first
    for i in range(depth - 1, -1, -1):
        h, c, scale = hs[i], co[i], kp.scales[i]
        x = torch.bmm(dz, ws[i])
        d_decay = (x * h).sum(-1)
        dh = c.decay.unsqueeze(-1) * x
        d_carry = c.carry
        if momentum:
            xs = torch.bmm(dz, ss[i])
            d_carry = (xs * h).sum(-1)
            dh = dh + c.carry.unsqueeze(-1) * xs
        hg = torch.bmm(dz, _t(kp.grads[i]))  # H[t, i] = dz_t . g_i
        hm = hg * _scaled(c.mix, scale)  # H * M: lower triangular
        dh = dh - torch.bmm(hm, kp.inputs[i])
        d_inputs[i] = d_inputs[i] - torch.bmm(_t(hm), h)
        d_grads[i] = d_grads[i] - torch.bmm(_t(ps[i]), dz)
        d_w[i] = torch.bmm(_t(c.decay.unsqueeze(-1) * dz), h)
        d_s[i] = torch.bmm(_t(c.carry.unsqueeze(-1) * dz), h) if momentum else torch.zeros_like(ss[i])
        d_mixed = -(hg * rs[i]).tril()  # d loss / d (mix * s)
        d_mix = _scaled(d_mixed, scale)
        if scale is not None:
            d_scales[i] = d_scales[i] + (d_mixed * c.mix).sum(-2)
        d_co[i] = [d_decay, d_carry, d_mix]
        if i > 0:
            dz = dh * qderivs[i - 1]
    dq = dh
    # chunk-end state
    for i in range(depth):
        c, scale, g, a = co[i], kp.scales[i], kp.grads[i], kp.inputs[i]
        o, p = omega[i], psi[i]
        d_w[i] = d_w[i] + c.end_decay[:, None, None] * o
        d_end_decay = (o * ws[i]).sum((-1, -2))
        d_end_carry, d_mom_decay = c.end_carry, c.mom_decay
        if momentum:
            d_s[i] = d_s[i] + c.end_carry[:, None, None] * o + c.mom_decay[:, None, None] * p
            d_end_carry = (o * ss[i]).sum((-1, -2))
            d_mom_decay = (p * ss[i]).sum((-1, -2))
        om, vs = _scaled(c.end_mix, scale), _scaled(c.mom_mix, scale)
        u, w_ = torch.bmm(g, o), torch.bmm(g, p)
        d_inputs[i] = d_inputs[i] - om.unsqueeze(-1) * u - vs.unsqueeze(-1) * w_
        d_grads[i] = d_grads[i] - om.unsqueeze(-1) * torch.bmm(a, _t(o)) - vs.unsqueeze(-1) * torch.bmm(a, _t(p))
        d_om, d_vs = -(u * a).sum(-1), -(w_ * a).sum(-1)
        d_end_mix, d_mom_mix = _scaled(d_om, scale), _scaled(d_vs, scale)
        if scale is not None:
            d_scales[i] = d_scales[i] + d_om * c.end_mix + d_vs * c.mom_mix
        d_co[i] = ScanCoefficients(
            d_co[i][0], d_co[i][1], d_co[i][2], d_end_decay, d_end_carry, d_end_mix, d_mom_decay, d_mom_mix
        )
    # inner-gradient clip: s = clip / max(clip, |g| |a|)
    if settings.clip > 0:
        for i in range(depth):
            g, a = kp.grads[i], kp.inputs[i]
            gn, an = g.norm(dim=-1), a.norm(dim=-1)
            norm = gn * an
            bound = norm > settings.clip
            d_norm = torch.where(bound, -d_scales[i] * settings.clip / norm.square().clamp_min(1e-30), 0.0)
            d_grads[i] = d_grads[i] + (d_norm * an / gn.clamp_min(1e-30)).unsqueeze(-1) * g
            d_inputs[i] = d_inputs[i] + (d_norm * gn / an.clamp_min(1e-30)).unsqueeze(-1) * a
    # key path at the anchor (second-order terms: the anchor is also where the inner gradients are taken)
    d_anc = [torch.zeros_like(w) for w in anc]
    d_pre: list[Tensor | None] = [None] * depth
    for i in range(depth - 1):
        d_back = d_grads[i] * kp.derivs[i]
        d_pre[i] = d_grads[i] * kp.back[i] * activation_second_derivative(kp.pre[i], settings.activation)
        d_grads[i + 1] = d_grads[i + 1] + torch.bmm(d_back, _t(anc[i + 1]))
        d_anc[i + 1] = d_anc[i + 1] + torch.bmm(_t(kp.grads[i + 1]), d_back)
    d_pre[depth - 1] = 2.0 * d_grads[depth - 1]
    dv = -2.0 * d_grads[depth - 1]
    for i in range(depth - 1, -1, -1):
        d_inputs[i] = d_inputs[i] + torch.bmm(d_pre[i], anc[i])
        d_anc[i] = d_anc[i] + torch.bmm(_t(d_pre[i]), kp.inputs[i])
        if i > 0:
            d_pre[i - 1] = d_pre[i - 1] + d_inputs[i] * kp.derivs[i - 1]
    dk = d_inputs[0]
    return dq, dk, dv, d_co, d_w, d_s, d_anc


def scan_backward(
    grad_y: Tensor,
    grad_weights: Sequence[Tensor],
    grad_momentum: Sequence[Tensor],
    grad_last_start: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: Sequence[ScanCoefficients],
    anchor: Sequence[Tensor],
    saved: Sequence[Tensor],
    settings: ScanSettings,
):
    """The reverse scan. Returns dq, dk, dv [N, n, b, D], per-layer coefficient gradients (ScanCoefficients, zero
    on padding and above the diagonal), dW and dS of the initial state, and the anchor's gradient (empty when the
    first chunk's anchor is its start state)."""
    n, lengths, depth = len(settings.lengths), settings.lengths, len(coefficients)
    saved_w, saved_s = saved[:depth], saved[depth:]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_co = [ScanCoefficients(*(torch.zeros_like(t) for t in layer)) for layer in coefficients]
    omega, psi = list(grad_weights), list(grad_momentum)
    d_anchor: list[Tensor] = []
    stride = settings.stride
    for group_start in range(((n - 1) // stride) * stride, -1, -stride):
        # recompute the chunk-start states of this group from the kept one (state path only)
        ws = [w[:, group_start // stride] for w in saved_w]
        ss = [s[:, group_start // stride] for s in saved_s]
        starts = []
        for c in range(group_start, min(group_start + stride, n)):
            starts.append((ws, ss))
            if c + 1 < min(group_start + stride, n):
                r = lengths[c]
                anc = anchor if (c == 0 and anchor) else ws
                co = _chunk_coefficients(coefficients, c, r)
                kp = _key_path(anc, k[:, c, :r], v[:, c, :r], settings)
                ends = [_end_state(ws[i], ss[i], kp, i, co[i], settings.momentum) for i in range(depth)]
                ws, ss = [e[0] for e in ends], [e[1] for e in ends]
        for c in range(min(group_start + stride, n) - 1, group_start - 1, -1):
            ws, ss = starts[c - group_start]
            r = lengths[c]
            separate = c == 0 and bool(anchor)
            anc = list(anchor) if separate else ws
            co = _chunk_coefficients(coefficients, c, r)
            out = _chunk_backward(
                q[:, c, :r], k[:, c, :r], v[:, c, :r], grad_y[:, c, :r], co, ws, ss, anc, omega, psi, settings
            )
            dq[:, c, :r], dk[:, c, :r], dv[:, c, :r] = out[0], out[1], out[2]
            for i in range(depth):
                for j, grad in enumerate(out[3][i]):
                    if grad.numel() == 0:
                        continue
                    target = d_co[i][j]
                    if grad.dim() == 1:
                        target[:, c] = grad
                    elif grad.dim() == 2:
                        target[:, c, :r] = grad
                    else:
                        target[:, c, :r, :r] = grad
            d_w, d_s, d_anc = out[4], out[5], out[6]
            if separate:
                d_anchor = d_anc
                omega = list(d_w)
            else:
                omega = [dw + da for dw, da in zip(d_w, d_anc, strict=True)]
            psi = list(d_s)
            if c == n - 1:
                omega = [o + g for o, g in zip(omega, grad_last_start, strict=True)]
    return dq, dk, dv, d_co, omega, psi, d_anchor
