"""The exact last layer in the fused tensor-op scan (`scan_torch.py`): its forward substitution and its VJP by hand.

With `exact_last_layer` the last memory layer's inner gradient is taken at the current weights M^L_{t-1} instead of
the chunk-start anchor (titans/memory/README.md, "The exact last layer"). Per chunk of r rows, with a = the anchor's
features of the keys and (W, S) the last layer's chunk-start weights and momentum:

    e_t = decay_t W a_t + carry_t S a_t - v_t - sum_{i<t} mix[t, i] (a_t . a_i) s_i g_i,    g_t = 2 e_t
    s_t = clip / max(clip, |g_t| |a_t|)                                                     (1 without the clip)
    B_t = M^L_{t-1}^T g_t = decay_t W^T g_t + carry_t S^T g_t - sum_{i<t} mix[t, i] s_i (g_t . g_i) a_i

where decay, carry, mix are the layer's coefficients moved down one row (the state before token t; `shifted`). B
feeds the hidden layer below (G^{L-1} = B * sigma'(K^{L-1})). `last_layer` computes them for scan_torch's key path;
`back_backward` and `errors_backward` are the VJPs of B and of the substitution, called from its chunk backward.
Shapes: [N, r, d] rows, [N, r, r] mixes, as in `scan_torch`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class ExactLast(NamedTuple):
    """What `exact_last_layer`'s last layer was solved with: M^L_{t-1} = decay_t W + carry_t S - sum_{i<t} mix[t, i]
    s_i g_i a_i^T (the coefficients of the state before token t: [N, r], [N, r] or None, [N, r, r] strictly lower),
    and the keys' Gram matrix gram[t, i] = a_t . a_i [N, r, r]."""

    decay: Tensor
    carry: Tensor | None
    mix: Tensor
    gram: Tensor


def shifted(co) -> tuple[Tensor, Tensor | None, Tensor]:
    """The coefficients of M_{t-1} (the state before token t) from those of M_t: every row moved down by one, row 0
    the start state itself (decay 1, carry 0, no gradient)."""
    decay = torch.cat([torch.ones_like(co.decay[:, :1]), co.decay[:, :-1]], 1)
    carry = None if co.carry is None else torch.cat([torch.zeros_like(co.carry[:, :1]), co.carry[:, :-1]], 1)
    mix = torch.cat([torch.zeros_like(co.mix[:, :1]), co.mix[:, :-1]], 1)
    return decay, carry, mix


def last_layer(
    a: Tensor, w: Tensor, s: Tensor, co, v: Tensor, settings, hidden: bool
) -> tuple[Tensor, Tensor, Tensor | None, ExactLast]:
    """The exact last layer for one chunk: a [N, r, d_in] the anchor's features of the keys, (w, s) the layer's
    chunk-start weights and momentum [N, d_out, d_in], `co` its coefficients. The errors by forward substitution through
    the clip (as `chunked.exact_last_key_path`); returns G^L = 2 e [N, r, d_out], M^L_{t-1} a_t (the last
    pre-activation, for completeness), B = M^L_{t-1}^T G^L [N, r, d_in] for the hidden layer below (None when there is
    none: `hidden` false), and `ExactLast`."""
    decay, carry, mix = shifted(co)
    gram = torch.bmm(a, _t(a))
    base = decay.unsqueeze(-1) * torch.bmm(a, _t(w)) - v
    if carry is not None:
        base = base + carry.unsqueeze(-1) * torch.bmm(a, _t(s))
    weight, a_norm = mix * gram, a.norm(dim=-1)
    errors, rows = [], []
    for t in range(a.shape[1]):
        e = base[:, t]
        if t > 0:
            e = e - torch.bmm(weight[:, t : t + 1, :t], torch.stack(rows, 1)).squeeze(1)
        errors.append(e)
        g = 2.0 * e
        if settings.clip > 0:
            g = g * (settings.clip / (g.norm(dim=-1) * a_norm[:, t]).clamp_min(settings.clip)).unsqueeze(-1)
        rows.append(g)
    g = 2.0 * torch.stack(errors, 1)
    exact = ExactLast(decay, carry, mix, gram)
    if not hidden:
        return g, base + v, None, exact
    b = decay.unsqueeze(-1) * torch.bmm(g, w)
    if carry is not None:
        b = b + carry.unsqueeze(-1) * torch.bmm(g, s)
    b = b - torch.bmm(mix * torch.bmm(g, _t(torch.stack(rows, 1))), a)
    return g, base + v, b, exact


def add_shifted(d_co: list, d_decay: Tensor, d_carry: Tensor | None, d_mix: Tensor) -> None:
    """Add the gradients of the shifted coefficients (`shifted`: row t holds row t-1) to the last layer's."""
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


def back_backward(kp, d_back: Tensor, d_grads, d_inputs, d_co, d_w, d_s, ws, ss) -> Tensor:
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
    add_shifted(d_co, d_decay, d_carry, -pair * pi)
    return -torch.bmm(_t(x), g)


def errors_backward(kp, d_rows, d_grads, d_scales, d_inputs, d_co, d_w, d_s, ws, ss, settings) -> Tensor:
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
    add_shifted(d_co, d_decay, d_carry, -ex.gram * overlap)
    return -d_err
