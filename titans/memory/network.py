"""The memory network M: an MLP of depth L_M whose weights are the fast weights of the inner loop (paper §3.1).

Notation (used in every file of `titans/memory/`):
    L           depth of the memory MLP (L_M in the paper)
    W^l         weight of layer l, [d_l, d_{l-1}], no bias; layer l maps h^{l-1} -> z^l = W^l h^{l-1}
    sigma       activation between layers (GELU or SiLU), none after the last layer
    f(x; W)     z^L, or x + LN(z^L) with `residual_norm` (NeurIPS §3.3: M(x) = x + LN(W_1 sigma(W_2 x)))
    loss        l(W; k, v) = ||f(k; W) - v||^2, summed over features (Eq. 12)

Weights are batched per sequence and per head: W^l has shape [B, H, d_l, d_{l-1}]. The initial weights M_0 are
outer-loop parameters of shape [H, d_l, d_{l-1}] held by `MemoryMLP`; every sequence starts from its own copy.
LayerNorm inside the memory has no affine parameters, so the fast weights are exactly the L matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans.matmul import matmul

Activation = Literal["gelu", "silu"]
LN_EPS = 1e-5


def activation_and_derivative(z: Tensor, kind: Activation) -> tuple[Tensor, Tensor]:
    """sigma(z) and sigma'(z), elementwise, in closed form (the chunked path back-propagates by hand)."""
    if kind == "gelu":
        # exact (erf) GELU: sigma(z) = z Phi(z), sigma'(z) = Phi(z) + z phi(z)
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + z * pdf
    if kind == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
    raise ValueError(f"unknown memory activation {kind!r}; expected 'gelu' or 'silu'")


def activation_second_derivative(z: Tensor, kind: Activation) -> Tensor:
    """sigma''(z) in closed form: the fused scan's backward needs it for the inner gradients' own derivative."""
    if kind == "gelu":
        # sigma'' = phi(z) (2 - z^2)
        return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) * (2.0 - z * z)
    if kind == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    raise ValueError(f"unknown memory activation {kind!r}; expected 'gelu' or 'silu'")


def activation(z: Tensor, kind: Activation) -> Tensor:
    """sigma(z) through torch's own ops (used by the autograd reference)."""
    if kind == "gelu":
        return F.gelu(z)
    if kind == "silu":
        return F.silu(z)
    raise ValueError(f"unknown memory activation {kind!r}; expected 'gelu' or 'silu'")


def layer_norm(z: Tensor) -> Tensor:
    """LayerNorm over the last axis, no affine parameters."""
    return F.layer_norm(z, z.shape[-1:], eps=LN_EPS)


def layer_norm_backward(normed: Tensor, grad_out: Tensor, z: Tensor) -> Tensor:
    """d loss / d z for normed = LN(z), given d loss / d normed. All [..., d]."""
    inv_std = torch.rsqrt(z.var(dim=-1, unbiased=False, keepdim=True) + LN_EPS)
    mean_g = grad_out.mean(dim=-1, keepdim=True)
    mean_gn = (grad_out * normed).mean(dim=-1, keepdim=True)
    return inv_std * (grad_out - mean_g - normed * mean_gn)


class MemoryMLP(nn.Module):
    """Shape of the memory network and its learned initial weights M_0 (one independent memory per head).

    depth 1 is the linear memory y = W x with W [dim, dim]; depth L >= 2 has hidden width `expansion * dim`.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        heads: int = 1,
        expansion: int = 4,
        activation: Activation = "gelu",
        residual_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"memory depth must be >= 1, got {depth}")
        if activation not in ("gelu", "silu"):
            raise ValueError(f"memory activation must be 'gelu' or 'silu', got {activation!r}")
        if dim < 1 or heads < 1 or expansion < 1:
            raise ValueError(f"memory dim, heads and expansion must be >= 1, got {dim}, {heads}, {expansion}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.activation: Activation = activation
        self.residual_norm = residual_norm
        widths = [dim] + [dim * expansion] * (depth - 1) + [dim]
        self.shapes = [(widths[i + 1], widths[i]) for i in range(depth)]
        self.initial_weights = nn.ParameterList(
            # std 1/sqrt(fan_in) keeps activations O(1) through the MLP at initialisation
            [nn.Parameter(torch.randn(heads, d_out, d_in) / math.sqrt(d_in)) for d_out, d_in in self.shapes]
        )

    @classmethod
    def from_weights(cls, weights: Sequence[Tensor], activation: Activation = "gelu", residual_norm: bool = False):
        """A memory whose M_0 is the given per-head matrices [H, d_l, d_{l-1}] (or [d_l, d_{l-1}] for one head)."""
        weights = [w if w.dim() == 3 else w.unsqueeze(0) for w in weights]
        dim, heads = weights[0].shape[-1], weights[0].shape[0]
        expansion = weights[0].shape[1] // dim if len(weights) > 1 else 1
        net = cls(dim, len(weights), heads, max(expansion, 1), activation, residual_norm)
        if [tuple(w.shape[1:]) for w in weights] != net.shapes:
            raise ValueError(f"weight shapes {[tuple(w.shape) for w in weights]} do not form an MLP {net.shapes}")
        with torch.no_grad():
            for p, w in zip(net.initial_weights, weights, strict=True):
                p.data = w.detach().clone()
        return net

    def forward_with(self, weights: Sequence[Tensor], x: Tensor) -> Tensor:
        """f(x; W) for per-sequence weights W^l [B, H, d_l, d_{l-1}] and inputs x [B, H, N, dim] -> [B, H, N, dim]."""
        h = x
        for i, w in enumerate(weights):
            h = matmul(h, w.transpose(-1, -2))
            if i < len(weights) - 1:
                h = activation(h, self.activation)
        return x + layer_norm(h) if self.residual_norm else h

    def key_path(self, weights: Sequence[Tensor], k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-token gradient factors of l(W; k_t, v_t) at weights W, in closed form (TECHNICAL_REPORT.md §3.1).

        k, v: [B, H, N, dim]. Returns (A, G, loss): A[l] [B, H, N, d_{l-1}] are the inputs of layer l and
        G[l] [B, H, N, d_l] the gradients w.r.t. its pre-activation, so that grad_{W^l} l_t = G[l]_t A[l]_t^T
        (rank one per token); loss [B, H, N] is l_t itself (the momentary surprise's loss).
        """
        inputs, pre, derivs = [], [], []
        h = k
        for i, w in enumerate(weights):
            inputs.append(h)
            z = matmul(h, w.transpose(-1, -2))
            pre.append(z)
            if i < len(weights) - 1:
                h, d = activation_and_derivative(z, self.activation)
                derivs.append(d)
        z_last = pre[-1]
        if self.residual_norm:
            normed = layer_norm(z_last)
            err = k + normed - v
            g = layer_norm_backward(normed, 2.0 * err, z_last)
        else:
            err = z_last - v
            g = 2.0 * err
        grads = [g]
        for i in range(len(weights) - 1, 0, -1):
            g = matmul(g, weights[i]) * derivs[i - 1]
            grads.append(g)
        grads.reverse()
        return inputs, grads, err.square().sum(-1)
