"""Test-time ablations of the memory's update rule, for `titans memory-check` (never used in training).

A `MemoryAblation` set on a `NeuralMemory` (`layer.ablation = MemoryAblation(...)`) changes what the layer writes
while it reads and writes as usual otherwise, so a trained checkpoint can be probed without retraining:

- theta_scale: theta_t -> theta_scale * theta_t (Eq. 14's step). 0 stops the surprise writes (forgetting still
  decays M towards 0); -1 is gradient *ascent* on the inner loss, the control of the critique that test-time
  training with key-value binding works as well with ascent as with descent.
- momentum=False: eta_t = 0 (Eq. 14 without the past surprise: S_t = -theta_t grad l).
- forgetting=False: alpha_t = 0 (Eq. 13 keeps all of M_{t-1}).
- layers: only these memory layers (0 = first) are written; the others keep M_0's weights for that layer
  (theta = 0 and alpha = 0 there). "Last layer only" is `layers=(depth - 1,)`.
- reset_at: the memory (weights and momentum) is set back to M_0 when it has processed this many tokens of the
  sequence; the conv history and the attention around the memory are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class MemoryAblation:
    theta_scale: float = 1.0
    momentum: bool = True
    forgetting: bool = True
    layers: tuple[int, ...] | None = None
    reset_at: int | None = None

    def __post_init__(self) -> None:
        if self.reset_at is not None and self.reset_at < 1:
            raise ValueError(f"reset_at must be >= 1 token, got {self.reset_at}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must name memory layers 0, 1, ..., got {self.layers}")


def ablate_gates(
    ablation: MemoryAblation, theta: Tensor, eta: Tensor | None, alpha: Tensor | list[Tensor] | None, depth: int
) -> tuple[Tensor, Tensor | None, Tensor | list[Tensor] | None]:
    """The gates under `ablation`. theta, eta: [B, H, T, L] per layer, or [B, H, T] for one gate shared by the L =
    `depth` layers; alpha: the same, or a list of L channel-wise [B, H, T, d_l]. A layer mask turns shared gates into
    per-layer ones ([B, H, T, depth]), which every memory function accepts."""
    theta = theta * ablation.theta_scale
    eta = eta if ablation.momentum else None
    alpha = alpha if ablation.forgetting else None
    if ablation.layers is None:
        return theta, eta, alpha
    if max(ablation.layers) >= depth:
        raise ValueError(f"ablation layers {ablation.layers} name a layer beyond the memory's depth {depth}")
    keep = [i in ablation.layers for i in range(depth)]

    def per_layer(t: Tensor) -> Tensor:
        return t.unsqueeze(-1).expand(*t.shape, depth) if t.dim() == 3 else t

    mask = theta.new_tensor(keep, dtype=theta.dtype)
    theta = per_layer(theta) * mask
    if eta is not None:
        eta = per_layer(eta)
    if isinstance(alpha, list):
        alpha = [a if k else a * 0 for a, k in zip(alpha, keep, strict=True)]
    elif alpha is not None:
        alpha = per_layer(alpha) * mask
    return theta, eta, alpha
