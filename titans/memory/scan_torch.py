"""The fused memory scan in plain tensor ops: forward over chunks, and the reverse scan with a hand-written backward.

This is the portable implementation of the op behind `fused_memory` (`fused.py`); `csrc/scan.cpp` is the same
algorithm in C++ and both are tested against `chunked_memory` and each other. Neither builds an autograd graph
across chunks: the forward keeps only chunk-start states, the backward recomputes each chunk from its stored state
and applies the chunk's vector-Jacobian product by hand (derivation: `titans/memory/README.md`, "The fused scan").

Layout (N = batch * heads independent memories, T tokens cut into spans of `lengths`, each within one chunk):
    q, k, v                [N, T, D]
    gates                  per layer `ScanGates`: theta, eta (None = no momentum), alpha (None = no forgetting),
                           each [N, T]
    weights, momentum      per layer [N, d_l, d_{l-1}]: the state at the start of the first span
    anchor                 per layer, or empty: the first span's anchor when it resumes mid-chunk

Per span of r tokens, the gates give the coefficients of the dual form (`ChunkCoefficients.build`, products from
the span's start): decay A_t, carry rho_t, mix C_{t,i} theta_i and, at the last row, the end coefficients (here
in tensor ops with autograd, for their backward to the gates; `csrc/scan.cpp` builds and differentiates them by
hand). With start state (W, S), anchor W' (W itself unless resumed mid-chunk), and inner-gradient scale
s_t^l = clip / max(clip, |g_t^l| |a_t^l|) (1 without clipping):
    key path at W'   A^1 = k, K^l = A^l W'^lT, A^{l+1} = sigma(K^l)
                     G^L = 2(K^L - v), G^l = (G^{l+1} W'^{l+1}) sigma'(K^l)
    query path       Z^l = A.(Q^{l-1} W^T) + rho.(Q^{l-1} S^T) - ((Q^{l-1} A^lT) * mix * s) G^l
                     Q^l = sigma(Z^l), y = Z^L
    end state        W_r = A_r W + rho_r S - G^T ((omega s) . A),  S_r = E_r S - G^T ((mom_mix s) . A)
with omega = mix's last row and mom_mix_i = theta_i E_r / E_i (theta_r at i = r without momentum).
With `exact_last` the last layer's G^L comes from M^L_{t-1} instead of the anchor (`_exact_key_path`; its backward
`_exact_back_backward` and `_exact_errors_backward`); titans/memory/README.md, "The exact last layer".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from titans.memory.chunked import ChunkCoefficients
from titans.memory.network import activation_and_derivative, activation_second_derivative


class ScanGates(NamedTuple):
    """One layer's gates over the call, [N, T] each (eta / alpha None when switched off)."""

    theta: Tensor
    eta: Tensor | None
    alpha: Tensor | None


class ScanCoefficients(NamedTuple):
    """One layer's coefficients for one span of r tokens: decay, carry [N, r] (carry None without momentum), mix
    [N, r, r], the end row's end_decay, end_carry [N] and end_mix [N, r], mom_decay [N] (None without momentum),
    mom_mix [N, r]."""

    decay: Tensor
    carry: Tensor | None
    mix: Tensor
    end_decay: Tensor
    end_carry: Tensor | None
    end_mix: Tensor
    mom_decay: Tensor | None
    mom_mix: Tensor


class ScanSettings(NamedTuple):
    """Everything about a scan that is not a tensor."""

    lengths: tuple[int, ...]  # tokens of each span (the chunk size, except a first or last partial chunk)
    chunk_size: int
    activation: str  # "gelu" | "silu"
    clip: float  # per-token inner-gradient norm bound; 0 = off
    stride: int  # chunk-start states kept every `stride` chunks (the backward recomputes the ones in between)
    exact_last: bool = False  # the last layer's inner gradient at the current weights (`exact_last_layer`)


def span_coefficients(gates: Sequence[ScanGates], start: int, r: int) -> list[ScanCoefficients]:
    """The coefficients of every layer for the span of r tokens at `start` (autograd records them if enabled)."""
    out = []
    for g in gates:
        theta = g.theta[:, start : start + r]
        eta = None if g.eta is None else g.eta[:, start : start + r]
        alpha = None if g.alpha is None else g.alpha[:, start : start + r]
        co = ChunkCoefficients.build(theta, eta, alpha)
        carry = co.carry
        out.append(
            ScanCoefficients(
                co.decay,
                carry,
                co.mix,
                co.decay[:, -1],
                None if carry is None else carry[:, -1],
                co.mix[:, -1],
                co.mom_decay,
                co.mom_mix,
            )  # fmt: skip
        )
    return out


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
    activation: str
    exact: _ExactLast | None = None


class _ExactLast(NamedTuple):
    """What `exact_last_layer`'s last layer was solved with: M^L_{t-1} = decay_t W + carry_t S - sum_{i<t} mix[t, i]
    s_i g_i a_i^T (the coefficients of the state before token t: [N, r], [N, r] or None, [N, r, r] strictly lower),
    and the keys' Gram matrix gram[t, i] = a_t . a_i [N, r, r]."""

    decay: Tensor
    carry: Tensor | None
    mix: Tensor
    gram: Tensor


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
    return _KeyPath(inputs, pre, derivs, grads, back, scales, settings.activation)


def _shifted(co: ScanCoefficients) -> tuple[Tensor, Tensor | None, Tensor]:
    """The coefficients of M_{t-1} (the state before token t) from those of M_t: every row moved down by one, row 0
    the start state itself (decay 1, carry 0, no gradient)."""
    decay = torch.cat([torch.ones_like(co.decay[:, :1]), co.decay[:, :-1]], 1)
    carry = None if co.carry is None else torch.cat([torch.zeros_like(co.carry[:, :1]), co.carry[:, :-1]], 1)
    mix = torch.cat([torch.zeros_like(co.mix[:, :1]), co.mix[:, :-1]], 1)
    return decay, carry, mix


def _exact_key_path(
    anchor: Sequence[Tensor], w: Tensor, s: Tensor, co: ScanCoefficients, k: Tensor, v: Tensor, settings: ScanSettings
) -> _KeyPath:
    """`_key_path` with the last layer's gradient at M^L_{t-1} (from the chunk-start W, S of that layer and its
    coefficients `co`): the errors e_t = M^L_{t-1} a_t - v_t by forward substitution through the clip
    (`chunked.exact_last_key_path`), the hidden layers' G through M^L_{t-1} in the dual form."""
    depth = len(anchor)
    inputs, pre, derivs, h = [], [], [], k
    for i in range(depth - 1):
        inputs.append(h)
        z = torch.bmm(h, _t(anchor[i]))
        pre.append(z)
        h, d = activation_and_derivative(z, settings.activation)
        derivs.append(d)
    a = h
    inputs.append(a)
    decay, carry, mix = _shifted(co)
    gram = torch.bmm(a, _t(a))
    base = decay.unsqueeze(-1) * torch.bmm(a, _t(w)) - v
    if carry is not None:
        base = base + carry.unsqueeze(-1) * torch.bmm(a, _t(s))
    pre.append(base + v)  # M^L_{t-1} a_t, for completeness: the backward never reads the last pre-activation
    weight, a_norm = mix * gram, a.norm(dim=-1)
    errors, rows, scales = [], [], []
    for t in range(a.shape[1]):
        e = base[:, t]
        if t > 0:
            e = e - torch.bmm(weight[:, t : t + 1, :t], torch.stack(rows, 1)).squeeze(1)
        errors.append(e)
        g = 2.0 * e
        if settings.clip > 0:
            scale = settings.clip / (g.norm(dim=-1) * a_norm[:, t]).clamp_min(settings.clip)
            scales.append(scale)
            g = g * scale.unsqueeze(-1)
        rows.append(g)
    g = 2.0 * torch.stack(errors, 1)
    grads, back = [g], []
    if depth > 1:
        b = decay.unsqueeze(-1) * torch.bmm(g, w)
        if carry is not None:
            b = b + carry.unsqueeze(-1) * torch.bmm(g, s)
        b = b - torch.bmm(mix * torch.bmm(g, _t(torch.stack(rows, 1))), a)
        back.append(b)
        g = b * derivs[-1]
        grads.append(g)
        for i in range(depth - 2, 0, -1):
            b = torch.bmm(g, anchor[i])
            g = b * derivs[i - 1]
            back.append(b)
            grads.append(g)
    grads.reverse()
    back.reverse()
    all_scales: list[Tensor | None] = [None] * depth
    if settings.clip > 0:
        all_scales = [
            settings.clip / (g.norm(dim=-1) * a.norm(dim=-1)).clamp_min(settings.clip)
            for g, a in zip(grads[:-1], inputs[:-1], strict=True)
        ] + [torch.stack(scales, 1)]
    exact = _ExactLast(decay, carry, mix, gram)
    return _KeyPath(inputs, pre, derivs, grads, back, all_scales, settings.activation, exact)


def key_path(
    anchor: Sequence[Tensor],
    ws: Sequence[Tensor],
    ss: Sequence[Tensor],
    co: Sequence[ScanCoefficients],
    k: Tensor,
    v: Tensor,
    settings: ScanSettings,
) -> _KeyPath:
    """The chunk's keys through the network at its gradient point: the anchor, or with `settings.exact_last` the
    anchor's hidden layers and the current last layer."""
    if settings.exact_last:
        return _exact_key_path(anchor, ws[-1], ss[-1], co[-1], k, v, settings)
    return _key_path(anchor, k, v, settings)


def _scaled(x: Tensor, scale: Tensor | None) -> Tensor:
    """x [N, r] or [N, r, r] with the token (last) axis scaled by the clip scale [N, r]."""
    if scale is None:
        return x
    return x * (scale.unsqueeze(-2) if x.dim() == 3 else scale)


def _end_state(w: Tensor, s: Tensor, kp: _KeyPath, i: int, co: ScanCoefficients) -> tuple[Tensor, Tensor]:
    """(W_r, S_r) of layer i from the chunk-start (W, S)."""
    g, a = kp.grads[i], kp.inputs[i]
    omega = _scaled(co.end_mix, kp.scales[i])
    varsigma = _scaled(co.mom_mix, kp.scales[i])
    w_new = co.end_decay[:, None, None] * w - torch.bmm(_t(g * omega.unsqueeze(-1)), a)
    s_new = -torch.bmm(_t(g * varsigma.unsqueeze(-1)), a)
    if co.carry is not None:
        w_new = w_new + co.end_carry[:, None, None] * s
        s_new = s_new + co.mom_decay[:, None, None] * s
    return w_new, s_new


def _query_path(q: Tensor, ws: Sequence[Tensor], ss: Sequence[Tensor], kp: _KeyPath, co: Sequence[ScanCoefficients]):
    """Outputs of the chunk's rows (dual form); also returns each layer's input Q^{l-1}, the masked mixes
    P^l = (Q^{l-1} A^lT) * mix * s, R^l = Q^{l-1} A^lT, and sigma'(Z^l) for l < L."""
    depth = len(ws)
    h, hs, rs, ps, derivs = q, [], [], [], []
    for i in range(depth):
        hs.append(h)
        z = co[i].decay.unsqueeze(-1) * torch.bmm(h, _t(ws[i]))
        if co[i].carry is not None:
            z = z + co[i].carry.unsqueeze(-1) * torch.bmm(h, _t(ss[i]))
        r = torch.bmm(h, _t(kp.inputs[i]))
        p = r * _scaled(co[i].mix, kp.scales[i])
        z = z - torch.bmm(p, kp.grads[i])
        rs.append(r)
        ps.append(p)
        if i < depth - 1:
            h, d = activation_and_derivative(z, kp.activation)
            derivs.append(d)
        else:
            h = z
    return h, hs, rs, ps, derivs


def _starts(lengths: Sequence[int]) -> list[int]:
    return [sum(lengths[:c]) for c in range(len(lengths))]


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
    """Returns y [N, T, D], the final weights and momentum, the weights at the start of the last span, and (when
    `save`) what the backward needs: the kept weights then momentum, per layer [N, n_kept, d_l, d_{l-1}]."""
    n = len(settings.lengths)
    ws, ss = list(weights), list(momentum)
    outputs = []
    kept_w: list[list[Tensor]] = [[] for _ in ws]
    kept_s: list[list[Tensor]] = [[] for _ in ws]
    last_start = ws
    for c, (start, r) in enumerate(zip(_starts(settings.lengths), settings.lengths, strict=True)):
        if save and c % settings.stride == 0:
            for i in range(len(ws)):
                kept_w[i].append(ws[i])
                kept_s[i].append(ss[i])
        if c == n - 1:
            last_start = ws
        anc = anchor if (c == 0 and anchor) else ws
        co = span_coefficients(gates, start, r)
        kp = key_path(anc, ws, ss, co, k[:, start : start + r], v[:, start : start + r], settings)
        outputs.append(_query_path(q[:, start : start + r], ws, ss, kp, co)[0])
        ends = [_end_state(ws[i], ss[i], kp, i, co[i]) for i in range(len(ws))]
        ws, ss = [e[0] for e in ends], [e[1] for e in ends]
    saved = [torch.stack(x, dim=1) for x in kept_w + kept_s] if save else []
    return torch.cat(outputs, dim=1), ws, ss, list(last_start), saved


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
    coefficients' gradients (ScanCoefficients), dW, dS (of the chunk-start state) and dW' (of the anchor; summed
    into dW by the caller when the anchor is W)."""
    depth = len(ws)
    kp = key_path(anc, ws, ss, co, k, v, settings)
    _, hs, rs, ps, qderivs = _query_path(q, ws, ss, kp, co)
    d_inputs = [torch.zeros_like(a) for a in kp.inputs]
    d_grads = [torch.zeros_like(g) for g in kp.grads]
    d_scales = [torch.zeros_like(kp.inputs[0][..., 0]) for _ in range(depth)]
    d_w, d_s, d_co = [None] * depth, [None] * depth, [None] * depth
    dz = dy
    # query path (dual form), last layer first
    for i in range(depth - 1, -1, -1):
        h, c, scale = hs[i], co[i], kp.scales[i]
        momentum = c.carry is not None
        x = torch.bmm(dz, ws[i])
        d_decay = (x * h).sum(-1)
        dh = c.decay.unsqueeze(-1) * x
        d_carry = None
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
        d_end_carry = d_mom_decay = None
        if c.carry is not None:
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
    # inner-gradient clip: s = clip / max(clip, |g| |a|) (the exact last layer's: inside its substitution, below)
    exact = kp.exact is not None
    if settings.clip > 0:
        for i in range(depth - exact):
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
        if exact and i == depth - 2:  # B = G^L through M^L_{t-1}, not through the anchor
            d_rows = _exact_back_backward(kp, d_back, d_grads, d_inputs, d_co, d_w, d_s, ws, ss)
            continue
        d_grads[i + 1] = d_grads[i + 1] + torch.bmm(d_back, _t(anc[i + 1]))
        d_anc[i + 1] = d_anc[i + 1] + torch.bmm(_t(kp.grads[i + 1]), d_back)
    if exact:
        rows = d_rows if depth > 1 else torch.zeros_like(kp.grads[-1])
        dv = _exact_errors_backward(kp, rows, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings)
    else:
        d_pre[depth - 1] = 2.0 * d_grads[depth - 1]
        dv = -2.0 * d_grads[depth - 1]
    for i in range(depth - 1, -1, -1):
        if not (exact and i == depth - 1):  # the exact last layer's weights are W, not the anchor's
            d_inputs[i] = d_inputs[i] + torch.bmm(d_pre[i], anc[i])
            d_anc[i] = d_anc[i] + torch.bmm(_t(d_pre[i]), kp.inputs[i])
        if i > 0:
            d_pre[i - 1] = d_pre[i - 1] + d_inputs[i] * kp.derivs[i - 1]
    dk = d_inputs[0]
    return dq, dk, dv, d_co, d_w, d_s, d_anc


def _add_shifted(d_co: list, d_decay: Tensor, d_carry: Tensor | None, d_mix: Tensor) -> None:
    """Add the gradients of the shifted coefficients (`_shifted`: row t holds row t-1) to the last layer's."""
    c = d_co[-1]
    decay = c.decay.clone()
    decay[:, :-1] += d_decay[:, 1:]
    carry = c.carry
    if d_carry is not None:
        carry = carry.clone()
        carry[:, :-1] += d_carry[:, 1:]
    mix = c.mix.clone()
    mix[:, :-1] += d_mix.tril(-1)[:, 1:]  # the shifted mix is strictly lower: row t, columns i < t
    d_co[-1] = c._replace(decay=decay, carry=carry, mix=mix)


def _exact_back_backward(kp: _KeyPath, d_back: Tensor, d_grads, d_inputs, d_co, d_w, d_s, ws, ss) -> Tensor:
    """VJP of the exact last layer's B_t = M^L_{t-1}^T g_t = decay_t W^T g_t + carry_t S^T g_t
    - sum_{i<t} mix[t, i] (g_t . s_i g_i) a_i, given d_back = dB. Adds to d_grads, d_inputs, d_co, d_w, d_s of the
    last layer; returns the gradient of the clipped rows s_i g_i (the substitution's own variables)."""
    ex, g, a, scale = kp.exact, kp.grads[-1], kp.inputs[-1], kp.scales[-1]
    rows = g if scale is None else g * scale.unsqueeze(-1)
    gw = torch.bmm(d_back, _t(ws[-1]))  # W dB_t, [N, r, d_out]
    d_grads[-1] = d_grads[-1] + ex.decay.unsqueeze(-1) * gw
    d_w[-1] = d_w[-1] + torch.bmm(_t(ex.decay.unsqueeze(-1) * g), d_back)
    d_decay, d_carry = (g * gw).sum(-1), None
    if ex.carry is not None:
        gs = torch.bmm(d_back, _t(ss[-1]))
        d_grads[-1] = d_grads[-1] + ex.carry.unsqueeze(-1) * gs
        d_s[-1] = d_s[-1] + torch.bmm(_t(ex.carry.unsqueeze(-1) * g), d_back)
        d_carry = (g * gs).sum(-1)
    pi = torch.bmm(d_back, _t(a))  # dB_t . a_i
    pair = torch.bmm(g, _t(rows))  # g_t . s_i g_i
    x = ex.mix * pi
    d_grads[-1] = d_grads[-1] - torch.bmm(x, rows)
    d_inputs[-1] = d_inputs[-1] - torch.bmm(_t(ex.mix * pair), d_back)
    _add_shifted(d_co, d_decay, d_carry, -pair * pi)
    return -torch.bmm(_t(x), g)


def _exact_errors_backward(kp, d_rows, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings) -> Tensor:
    """VJP of the exact last layer's forward substitution e_t = decay_t W a_t + carry_t S a_t - v_t
    - sum_{i<t} mix[t, i] (a_t . a_i) s_i g_i, g_t = 2 e_t, s_t = clip / max(clip, |g_t| |a_t|): the reverse
    substitution (row t's error gradient collects every later row's before it passes on to earlier rows). d_grads /
    d_scales of the last layer: the gradients of g and s from everything outside the substitution; d_rows: of s_i g_i
    from B. Adds to d_inputs, d_co, d_w, d_s of the last layer; returns dv."""
    ex, g, a, scale = kp.exact, kp.grads[-1], kp.inputs[-1], kp.scales[-1]
    r = g.shape[1]
    weight = ex.mix * ex.gram  # [N, t, i], strictly lower
    d_err = torch.zeros_like(g)
    d_a_clip = torch.zeros_like(a)
    for j in range(r - 1, -1, -1):
        dr = d_rows[:, j]
        if j + 1 < r:
            dr = dr - torch.bmm(weight[:, j + 1 :, j].unsqueeze(1), d_err[:, j + 1 :]).squeeze(1)
        g_j = g[:, j]
        if scale is None:
            d_g = d_grads[-1][:, j] + dr
        else:
            s_j = scale[:, j]
            d_g = d_grads[-1][:, j] + s_j.unsqueeze(-1) * dr
            d_s_j = d_scales[-1][:, j] + (dr * g_j).sum(-1)
            # s = clip / (|g| |a|) where that is below 1: ds/dg = -s g / |g|^2, ds/da = -s a / |a|^2
            gn_sq, an_sq = g_j.square().sum(-1), a[:, j].square().sum(-1)
            bound = (gn_sq * an_sq).sqrt() > settings.clip
            k = torch.where(bound, -d_s_j * s_j, 0.0)
            d_g = d_g + (k / gn_sq.clamp_min(1e-30)).unsqueeze(-1) * g_j
            d_a_clip[:, j] = (k / an_sq.clamp_min(1e-30)).unsqueeze(-1) * a[:, j]
        d_err[:, j] = 2.0 * d_g
    rows = g if scale is None else g * scale.unsqueeze(-1)
    w, s = ws[-1], ss[-1]
    d_a = d_a_clip + ex.decay.unsqueeze(-1) * torch.bmm(d_err, w)
    d_w[-1] = d_w[-1] + torch.bmm(_t(ex.decay.unsqueeze(-1) * d_err), a)
    d_decay = (d_err * torch.bmm(a, _t(w))).sum(-1)
    d_carry = None
    if ex.carry is not None:
        d_a = d_a + ex.carry.unsqueeze(-1) * torch.bmm(d_err, s)
        d_s[-1] = d_s[-1] + torch.bmm(_t(ex.carry.unsqueeze(-1) * d_err), a)
        d_carry = (d_err * torch.bmm(a, _t(s))).sum(-1)
    overlap = torch.bmm(d_err, _t(rows))  # dE_t . s_i g_i
    d_gram = -ex.mix * overlap
    d_a = d_a + torch.bmm(d_gram, a) + torch.bmm(_t(d_gram), a)
    d_inputs[-1] = d_inputs[-1] + d_a
    _add_shifted(d_co, d_decay, d_carry, -ex.gram * overlap)
    return -d_err


def _span_leaves(gates: Sequence[ScanGates], start: int, r: int):
    """One span's gates as fresh leaves and the coefficients built from them with autograd: the backward uses the
    coefficients' values for the chunk's VJP and their graph for the gates' gradients (`_gates_backward`)."""
    with torch.enable_grad():
        leaves = [
            ScanGates(*(None if t is None else t[:, start : start + r].detach().requires_grad_() for t in g))
            for g in gates
        ]
        return leaves, span_coefficients(leaves, 0, r)


def _gates_backward(leaves: Sequence[ScanGates], co: Sequence[ScanCoefficients], d_co: Sequence[ScanCoefficients]):
    """The gates' gradients of one span from its coefficients' gradients, through the graph `_span_leaves` built.
    Per layer (dtheta, deta, dalpha) [N, r], None where a gate is off."""
    out = []
    for g, c, d in zip(leaves, co, d_co, strict=True):
        pairs = [(t, dt) for t, dt in zip(c, d, strict=True) if t is not None and t.requires_grad]
        wanted = [t for t in g if t is not None]
        grads = iter(torch.autograd.grad([t for t, _ in pairs], wanted, [dt for _, dt in pairs], allow_unused=True))
        out.append([None if t is None else _zero_if_none(next(grads), t) for t in g])
    return out


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


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
    """The reverse scan. Returns dq, dk, dv [N, T, D], per layer ScanGates of the gates' gradients (None where a
    gate is off), dW and dS of the initial state, and the anchor's gradient (empty when the first span's anchor is
    its start state)."""
    n, lengths, depth = len(settings.lengths), settings.lengths, len(gates)
    starts = _starts(lengths)
    saved_w, saved_s = saved[:depth], saved[depth:]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_gates = [[None if t is None else torch.zeros_like(t) for t in g] for g in gates]
    omega, psi = list(grad_weights), list(grad_momentum)
    d_anchor: list[Tensor] = []
    stride = settings.stride
    for group_start in range(((n - 1) // stride) * stride, -1, -stride):
        # recompute the chunk-start states of this group from the kept one (state path only)
        ws = [w[:, group_start // stride] for w in saved_w]
        ss = [s[:, group_start // stride] for s in saved_s]
        group_states = []
        for c in range(group_start, min(group_start + stride, n)):
            group_states.append((ws, ss))
            if c + 1 < min(group_start + stride, n):
                lo, r = starts[c], lengths[c]
                anc = anchor if (c == 0 and anchor) else ws
                co = span_coefficients(gates, lo, r)
                kp = key_path(anc, ws, ss, co, k[:, lo : lo + r], v[:, lo : lo + r], settings)
                ends = [_end_state(ws[i], ss[i], kp, i, co[i]) for i in range(depth)]
                ws, ss = [e[0] for e in ends], [e[1] for e in ends]
        for c in range(min(group_start + stride, n) - 1, group_start - 1, -1):
            ws, ss = group_states[c - group_start]
            lo, r = starts[c], lengths[c]
            rows = slice(lo, lo + r)
            separate = c == 0 and bool(anchor)
            anc = list(anchor) if separate else ws
            leaves, co = _span_leaves(gates, lo, r)
            out = _chunk_backward(
                q[:, rows], k[:, rows], v[:, rows], grad_y[:, rows], co, ws, ss, anc, omega, psi, settings
            )
            dq[:, rows], dk[:, rows], dv[:, rows] = out[0], out[1], out[2]
            for i, span_grads in enumerate(_gates_backward(leaves, co, out[3])):
                for target, grad in zip(d_gates[i], span_grads, strict=True):
                    if target is not None:
                        target[:, rows] = grad
            d_w, d_s, d_anc = out[4], out[5], out[6]
            if separate:
                d_anchor = d_anc
                omega = list(d_w)
            else:
                omega = [dw + da for dw, da in zip(d_w, d_anc, strict=True)]
            psi = list(d_s)
            if c == n - 1:
                omega = [o + g for o, g in zip(omega, grad_last_start, strict=True)]
    return dq, dk, dv, [ScanGates(*g) for g in d_gates], omega, psi, d_anchor
