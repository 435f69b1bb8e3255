"""Reference Titans memory, one token at a time. Slow on purpose: `chunked.py` must match it exactly.

For t = 1..T (paper Eqs. 13-16, with the chunk anchor of Eq. 16):
    if t starts a chunk of size C:   anchor := M_{t-1}
    u_t = grad_M l(anchor; k_t, v_t)            inner gradient, by autograd (torch.func.grad)
    S_t = eta_t S_{t-1} - theta_t u_t           surprise with momentum (Eq. 14)
    M_t = (1 - alpha_t) M_{t-1} + S_t           forgetting (Eq. 13)
    y_t = M_t(q_t)                              retrieval reads the state that includes token t's write (Eq. 15)
C = 1 is exactly Eqs. 13-15. Shapes and gate layouts: see `titans/memory/README.md`.

With `exact_last_layer` the gradient is taken at (anchor's layers 1..L-1, M_{t-1}'s last layer) instead: the last
layer learns token by token (on features from the chunk start it is the delta rule, whatever the chunk), the earlier
layers stay anchored. Not the paper's Eq. 16; the MQAR diagnosis in docs/results.md is why it exists.
"""

from __future__ import annotations

import torch
from torch import Tensor

from titans.memory.inputs import GateArg, prepare
from titans.memory.network import MemoryMLP
from titans.memory.state import MemoryState


def naive_memory(
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
    """Run the memory over q, k, v [B, H, T, D]; return (y [B, H, T, D], final state).

    theta, eta, alpha: [B, H, T], [B, H, T, L] (one gate per memory layer), or a list of L tensors (alpha's may be
    [B, H, T, d_l] for channel-wise forgetting); eta/alpha None disable momentum/forgetting. If `stats` is a dict,
    it receives "surprise" [B, H, T] (the inner loss where the gradient is taken) and "update_norm" [B, H, T]
    (||theta_t u_t||).
    grad_clip: if set, each layer's per-token gradient u_t is rescaled to Frobenius norm at most grad_clip.
    exact_last_layer: take the last layer's part of the gradient point at M_{t-1}, not at the chunk start.
    """
    gates, state = prepare(q, k, v, theta, eta, alpha, network, state, chunk_size)
    weights, momentum, anchor = list(state.weights), list(state.momentum), list(state.anchor)

    def inner_loss(ws: tuple[Tensor, ...], k_t: Tensor, v_t: Tensor) -> Tensor:
        # summed over the batch and heads: each (sequence, head) owns its weights, so the gradient stays separate
        return (network.forward_with(ws, k_t) - v_t).square().sum()

    inner_grad = torch.func.grad(inner_loss)
    outputs, surprises, update_norms = [], [], []
    for t in range(q.shape[2]):
        if (state.position + t) % chunk_size == 0:
            anchor = list(weights)
        k_t, v_t = k[:, :, t : t + 1], v[:, :, t : t + 1]
        point = (*anchor[:-1], weights[-1]) if exact_last_layer else tuple(anchor)
        u = inner_grad(point, k_t, v_t)
        norm_sq = 0.0
        for i, g in enumerate(gates):
            step = g.theta[:, :, t, None, None] * u[i]
            if grad_clip is not None:
                norm = torch.linalg.vector_norm(u[i], dim=(-2, -1))  # (its gradient at 0 is 0, not NaN)
                step = step * grad_clip / norm.clamp_min(grad_clip)[..., None, None]
            norm_sq = norm_sq + step.square().sum((-1, -2))
            momentum[i] = -step if g.eta is None else g.eta[:, :, t, None, None] * momentum[i] - step
            if g.alpha is None:
                weights[i] = weights[i] + momentum[i]
            else:
                a = g.alpha[:, :, t]
                # scalar alpha: [B, H] -> [B, H, 1, 1]; channel-wise: one value per output row, [B, H, d_l, 1]
                a = a[..., None, None] if a.dim() == 2 else a[..., None]
                weights[i] = (1 - a) * weights[i] + momentum[i]
        outputs.append(network.forward_with(weights, q[:, :, t : t + 1]))
        if stats is not None:
            with torch.no_grad():
                surprises.append((network.forward_with(point, k_t) - v_t).square().sum(-1)[..., 0])
                update_norms.append(torch.as_tensor(norm_sq).sqrt())
    position = state.position + q.shape[2]
    if position % chunk_size == 0:
        anchor = list(weights)
    if stats is not None and surprises:
        stats["surprise"] = torch.stack(surprises, dim=-1)
        stats["update_norm"] = torch.stack(update_norms, dim=-1)
    y = torch.cat(outputs, dim=2) if outputs else torch.zeros_like(q)
    return y, MemoryState(tuple(weights), tuple(momentum), tuple(anchor), position)
