"""One token of the Titans memory, for decoding: the same recurrence as `naive.py`, in a few dozen tensor ops.

For the single token t at stream position p = state.position (paper Eqs. 12-16, chunk anchor of Eq. 16):

    if p % C == 0:   anchor := M_{t-1}                     t starts a chunk
    u_t = grad l(anchor; k_t, v_t) = g_t^l a_t^{lT}         per layer, rank one, in closed form (as `key_path`)
    S_t = eta_t S_{t-1} - theta_t u_t                       Eq. 14 (eta None: no momentum, S_t = -theta_t u_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t                       Eq. 13 (alpha None: no forgetting)
    y_t = M_t(q_t)                                          Eq. 15, the read after token t's write

The chunk-parallel form (`chunked.py`) spends most of its ops on chunk coefficients (segment sums, masks) that are
trivial for one token, and the reference (`naive.py`) differentiates with autograd; here the gradient is a
hand-written backward (the math of `MemoryMLP.key_path`, on sequences and heads flattened for `bmm`: torch.matmul's
4-D broadcasting costs a dozen ops per product) and every update is one or two fused elementwise ops per layer.
Options: per-layer gates, channel-wise forgetting, momentum/forgetting off, residual + LayerNorm, inner gradient
clipping, any depth and activation. It is forward-only by design (`NeuralMemory` routes a token here only with
gradients off) and updates no tensor in place that it did not create.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.memory.inputs import GateArg, prepare
from titans.memory.network import MemoryMLP, activation, activation_and_derivative, layer_norm, layer_norm_backward
from titans.memory.state import MemoryState

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def decode_linear(x: Tensor, *layers: nn.Linear) -> Tensor:
    """The outputs of several nn.Linear on the same rows, side by side: x [N, in] -> [N, sum of out], forward only.

    For decoding (gradients off): one `mm` against a cached contiguous [in, sum of out] copy of the concatenated
    weights, instead of one transposed-weight matmul per layer (on CPU a one-row matmul against W^T as stored costs
    about three times as much). The copy is rebuilt whenever a weight or bias changes storage or version counter
    (in-place updates, load_state_dict and .to() all change one). torch's fused optimizers (`fused=True`) update
    weights without bumping version counters, so `TitansLM` also drops every such copy (`drop_weight_caches`) when
    it switches between training and evaluation and when `generate` starts. Same values as the separate layers, up
    to the matmul's summation order.
    """
    if torch.compiler.is_compiling():
        # traced (a compiled decode step): the cache below is Python state the trace cannot keep; the compiler
        # plans the matmuls itself
        return torch.cat([F.linear(x, layer.weight, layer.bias) for layer in layers], dim=1)
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    key = (tuple(id(layer) for layer in layers), tuple((p.data_ptr(), p._version) for p in params))
    cache: dict = layers[0].__dict__.setdefault("_decode_weights", {})
    hit = cache.get(key[0])
    if hit is None or hit[0] != key:
        with torch.no_grad():
            weight = torch.cat([layer.weight for layer in layers]).t().contiguous()
            bias = None
            if any(layer.bias is not None for layer in layers):
                bias = torch.cat(
                    [
                        layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                        for layer in layers
                    ]
                )
        hit = cache[key[0]] = (key, weight, bias)
    _, weight, bias = hit
    return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)


# Where the decode-time copies of weights live: decode_linear's on the first layer it was given, MAC's persistent
# keys and values on their block (`MACBlock._persistent_kv`).
WEIGHT_CACHES = ("_decode_weights", "_persistent_cache")


def drop_weight_caches(model: nn.Module) -> None:
    """Forget every copy of weights kept for decoding in `model`'s modules (`WEIGHT_CACHES`); the next call rebuilds
    them from the weights as they are."""
    for module in model.modules():
        for name in WEIGHT_CACHES:
            if name in module.__dict__:
                module.__dict__[name] = None if name == "_persistent_cache" else {}


def rms_norm_rows(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, forward only: the same function as F.rms_norm and
    `RMSNorm`, written with a sum (torch's `mean` and fused rms_norm cost several times more on the tiny tensors of
    one decoded token). Same values up to rounding."""
    scale = (x * x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(eps).rsqrt_()
    return x * scale * weight


def _activation_rows(z: Tensor, kind: str) -> Tensor:
    """sigma(z) for the decode path: exact GELU as z Phi(z) through erf (the same function as F.gelu, which costs
    several times more on one token's tiny tensors on CPU), SiLU through torch."""
    if kind == "gelu":
        return z * (torch.erf(z * _INV_SQRT2) + 1.0) * 0.5
    return activation(z, kind)


def read_flat(network: MemoryMLP, weights: Sequence[Tensor], q: Tensor) -> Tensor:
    """f(q; W) (Eq. 15's read) for weights [N, d_l, d_{l-1}] and queries q [N, 1, D] -> [N, 1, D], with `bmm`."""
    h = q
    for i, w in enumerate(weights):
        h = torch.bmm(h, w.transpose(1, 2))
        if i < len(weights) - 1:
            h = _activation_rows(h, network.activation)
    return q + layer_norm(h) if network.residual_norm else h


def rank_one_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Sequence[Tensor],
    eta: Sequence[Tensor] | None,
    keep: Sequence[Tensor] | None,
    network: MemoryMLP,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    anchor: Sequence[Tensor],
    grad_clip: float | None = None,
    stats: dict[str, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The write and read of one token given the anchor it takes its gradient at, on N = B * H flattened memories.

    q, k, v [N, 1, D]; weights, momentum, anchor: per layer [N, d_l, d_{l-1}]. Per layer l, gates broadcast against
    the rank-one factor g^l [N, 1, d_l] and the weights: theta[l] and eta[l] [N, 1, 1]; keep[l] = 1 - alpha_l,
    [N, 1, 1] or channel-wise [N, d_l, 1]. eta None = no momentum, keep None = no forgetting.
    Returns (y [N, 1, D], weights M_t, momentum S_t); `stats` (if a dict) gets "surprise" and "update_norm" [N].
    """
    depth = network.depth
    # forward of k_t through the anchor network, keeping each layer's input a^l and sigma'(z^l)
    inputs, derivs, h = [], [], k
    for i, w in enumerate(anchor):
        inputs.append(h)
        z = torch.bmm(h, w.transpose(1, 2))  # [N, 1, d_l]
        if i < depth - 1:
            h, d = activation_and_derivative(z, network.activation)
            derivs.append(d)
    # d l / d z^L of l = ||f(k) - v||^2 (Eq. 12), then the chain rule down the layers: g^{l-1} = (W^lT g^l) sigma'
    if network.residual_norm:
        normed = layer_norm(z)
        err = k + normed - v
        g = layer_norm_backward(normed, 2.0 * err, z)
    else:
        err = z - v
        g = err + err  # 2 (f(k) - v), without a scalar op
    grads = [g]
    for i in range(depth - 1, 0, -1):
        g = torch.bmm(g, anchor[i]) * derivs[i - 1]
        grads.append(g)
    grads.reverse()

    new_weights, new_momentum, norm_sq = [], [], None
    for i in range(depth):
        a, g, th = inputs[i], grads[i], theta[i]
        if grad_clip is not None or stats is not None:
            # ||u_t||_F = ||g_t|| ||a_t|| for a rank-one gradient; clipping rescales it to at most grad_clip
            norm = g.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # [N, 1, 1]
            if grad_clip is not None:
                scale = grad_clip / norm.clamp_min(grad_clip)
                th, norm = th * scale, norm * scale
            if stats is not None:
                term = (theta[i] * norm).square()
                norm_sq = term if norm_sq is None else norm_sq + term
        # theta_t u_t = (theta_t g_t) a_t^T: theta scales the small factor, one full-size op forms the outer product
        step_col = (g * th).transpose(1, 2)  # [N, d_l, 1]
        if eta is None:
            s = (step_col * a).neg_()  # S_t = -theta_t u_t
        else:
            s = torch.addcmul(eta[i] * momentum[i], step_col, a, value=-1.0)  # Eq. 14
        w = weights[i] + s if keep is None else torch.addcmul(s, keep[i], weights[i])  # Eq. 13
        new_weights.append(w)
        new_momentum.append(s)

    y = read_flat(network, new_weights, q)  # Eq. 15: read with the weights that include this token's write
    if stats is not None:
        stats["surprise"] = err.square().sum(-1).view(-1)
        stats["update_norm"] = norm_sq.sqrt().view(-1)
    return y, new_weights, new_momentum


def step_layers(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Sequence[Tensor],
    eta: Sequence[Tensor] | None,
    keep: Sequence[Tensor] | None,
    network: MemoryMLP,
    state: MemoryState,
    chunk_size: int,
    grad_clip: float | None = None,
    stats: dict[str, Tensor] | None = None,
    exact_last_layer: bool = False,
) -> tuple[Tensor, MemoryState]:
    """One token at the state's (Python int) position: `rank_one_step` with the chunk anchor of Eq. 16 (with
    `exact_last_layer`, the last layer's gradient at the current weights instead, as in `naive_memory`).

    q, k, v [N, 1, D] and the gates as in `rank_one_step`; the state holds [B, H, d_l, d_{l-1}] tensors as usual.
    Returns (y [N, 1, D], state after the token); `stats` (if a dict) gets "surprise" and "update_norm" [B, H, 1].
    """
    batch, heads = state.weights[0].shape[:2]
    n = batch * heads

    def flat(ts: tuple[Tensor, ...]) -> list[Tensor]:  # [B, H, d_l, d_{l-1}] -> [N, d_l, d_{l-1}] (bmm's layout)
        return [t.reshape(n, *t.shape[2:]) for t in ts]

    weights = flat(state.weights)
    if state.position % chunk_size == 0 or state.anchor is state.weights:
        anchor = weights  # Eq. 16: the token starts a chunk, its gradient is taken at the current weights
    else:
        anchor = flat(state.anchor)
    point = [*anchor[:-1], weights[-1]] if exact_last_layer else anchor
    y, new_weights, new_momentum = rank_one_step(
        q, k, v, theta, eta, keep, network, weights, flat(state.momentum), point, grad_clip, stats
    )
    if stats is not None:
        stats["surprise"] = stats["surprise"].view(batch, heads, 1)
        stats["update_norm"] = stats["update_norm"].view(batch, heads, 1)
    position = state.position + 1
    shaped_weights = tuple(w.view(batch, heads, *w.shape[1:]) for w in new_weights)
    shaped_momentum = tuple(s.view(batch, heads, *s.shape[1:]) for s in new_momentum)
    if position % chunk_size == 0:
        new_anchor = shaped_weights  # the next token starts a chunk at these weights
    else:
        new_anchor = state.weights if state.position % chunk_size == 0 else state.anchor
    return y, MemoryState(shaped_weights, shaped_momentum, new_anchor, position)


def step_layers_fixed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Sequence[Tensor],
    eta: Sequence[Tensor] | None,
    keep: Sequence[Tensor] | None,
    network: MemoryMLP,
    weights: Sequence[Tensor],
    momentum: Sequence[Tensor],
    anchor: Sequence[Tensor],
    position: Tensor,
    chunk_size: int,
    grad_clip: float | None = None,
    exact_last_layer: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """`step_layers` with the position a 0-d long tensor and flat [N, d_l, d_{l-1}] tensors, for fixed-shape decoding.

    The chunk-boundary choices of Eq. 16 become elementwise selects instead of Python branches, so one traced
    (torch.compile) function serves every position. Returns (y [N, 1, D], weights, momentum, anchor after the token).
    """
    starts_chunk = position % chunk_size == 0
    anchor = [torch.where(starts_chunk, w, a) for w, a in zip(weights, anchor, strict=True)]
    point = [*anchor[:-1], weights[-1]] if exact_last_layer else anchor
    y, new_weights, new_momentum = rank_one_step(
        q, k, v, theta, eta, keep, network, weights, momentum, point, grad_clip
    )
    ends_chunk = (position + 1) % chunk_size == 0  # the next token starts a chunk at the new weights
    new_anchor = [torch.where(ends_chunk, w, a) for w, a in zip(new_weights, anchor, strict=True)]
    return y, new_weights, new_momentum, new_anchor


def step_memory(
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
    exact_last_layer: bool = False,
) -> tuple[Tensor, MemoryState]:
    """`naive_memory`'s contract for exactly one token (T = 1): q, k, v [B, H, 1, D] -> (y [B, H, 1, D], state).

    Gates as in `naive_memory` ([B, H, 1], [B, H, 1, L], or lists; alpha [B, H, 1, d_l] channel-wise). Forward only:
    raises if gradients are being recorded (use `chunked_memory` to train).
    """
    if torch.is_grad_enabled():
        raise RuntimeError("step_memory is forward-only; call it under torch.no_grad() or use chunked_memory")
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"step_memory takes exactly one token, q [B, H, 1, D]; got {list(q.shape)}")
    gates, state = prepare(q, k, v, theta, eta, alpha, network, state, chunk_size)
    batch, heads, _, dim = q.shape
    n = batch * heads

    def flat(t: Tensor) -> Tensor:  # [B, H, 1] -> [N, 1, 1]; channel-wise [B, H, 1, d_l] -> [N, d_l, 1] (per row)
        return t.reshape(n, 1, 1) if t.dim() == 3 else t.reshape(n, -1, 1)

    thetas = [flat(g.theta) for g in gates]
    etas = None if gates[0].eta is None else [flat(g.eta) for g in gates]
    keep = None if gates[0].alpha is None else [flat(1 - g.alpha) for g in gates]
    q, k, v = (t.reshape(n, 1, dim) for t in (q, k, v))
    y, state = step_layers(q, k, v, thetas, etas, keep, network, state, chunk_size, grad_clip, stats, exact_last_layer)
    return y.view(batch, heads, 1, dim), state
