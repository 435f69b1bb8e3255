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
With `exact_last` the last layer's G^L comes from M^L_{t-1} instead of the anchor: its forward substitution and the
VJP of it are in `scan_exact.py` (titans/memory/README.md, "The exact last layer").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from titans.memory import scan_exact
from titans.memory.chunked import ChunkCoefficients
from titans.memory.network import activation_and_derivative, activation_second_derivative
from titans.memory.scan_exact import ExactLast


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
    exact: ExactLast | None = None


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
    anchor's hidden layers and the current last layer (`scan_exact.last_layer`, from the chunk-start ws, ss)."""
    depth = len(anchor)
    inputs, pre, derivs, h = [], [], [], k
    for i, w in enumerate(anchor):
        inputs.append(h)
        if i == depth - 1 and settings.exact_last:
            break
        z = torch.bmm(h, _t(w))
        pre.append(z)
        if i < depth - 1:
            h, d = activation_and_derivative(z, settings.activation)
            derivs.append(d)
    exact = None
    if settings.exact_last:
        g, last_pre, b, exact = scan_exact.last_layer(inputs[-1], ws[-1], ss[-1], co[-1], v, settings, depth > 1)
        pre.append(last_pre)
    else:
        g = 2.0 * (pre[-1] - v)
    grads, back = [g], []
    for i in range(depth - 1, 0, -1):
        if not (settings.exact_last and i == depth - 1):  # exact: B through M^L_{t-1}, computed with G^L
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
    return _KeyPath(inputs, pre, derivs, grads, back, scales, settings.activation, exact)


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
    dv, d_anc = _key_path_backward(kp, anc, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings)
    dk = d_inputs[0]
    return dq, dk, dv, d_co, d_w, d_s, d_anc


def _key_path_backward(kp: _KeyPath, anc, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings):
    """VJP of the key path at the anchor (second-order terms: the anchor is also where the inner gradients are taken;
    with the exact last layer, its substitution's VJP instead of the last layer's). Adds to d_inputs (and, exact, to
    d_co, d_w, d_s); returns dv and the anchor's gradient."""
    depth, exact = len(anc), kp.exact is not None
    d_anc = [torch.zeros_like(w) for w in anc]
    d_pre: list[Tensor | None] = [None] * depth
    for i in range(depth - 1):
        d_back = d_grads[i] * kp.derivs[i]
        d_pre[i] = d_grads[i] * kp.back[i] * activation_second_derivative(kp.pre[i], settings.activation)
        if exact and i == depth - 2:  # B = G^L through M^L_{t-1}, not through the anchor
            d_rows = scan_exact.back_backward(kp, d_back, d_grads, d_inputs, d_co, d_w, d_s, ws, ss)
            continue
        d_grads[i + 1] = d_grads[i + 1] + torch.bmm(d_back, _t(anc[i + 1]))
        d_anc[i + 1] = d_anc[i + 1] + torch.bmm(_t(kp.grads[i + 1]), d_back)
    if exact:
        rows = d_rows if depth > 1 else torch.zeros_like(kp.grads[-1])
        dv = scan_exact.errors_backward(kp, rows, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings)
    else:
        d_pre[depth - 1] = 2.0 * d_grads[depth - 1]
        dv = -2.0 * d_grads[depth - 1]
    for i in range(depth - 1, -1, -1):
        if not (exact and i == depth - 1):  # the exact last layer's weights are W, not the anchor's
            d_inputs[i] = d_inputs[i] + torch.bmm(d_pre[i], anc[i])
            d_anc[i] = d_anc[i] + torch.bmm(_t(d_pre[i]), kp.inputs[i])
        if i > 0:
            d_pre[i - 1] = d_pre[i - 1] + d_inputs[i] * kp.derivs[i - 1]
    return dv, d_anc


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
