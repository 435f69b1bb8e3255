"""Argument checking and gate layout shared by the reference and the chunked memory (same contract, one place)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from titans.memory.network import MemoryMLP
from titans.memory.state import MemoryState

GateArg = Tensor | Sequence[Tensor] | None


@dataclass
class LayerGates:
    """Gates of one memory layer over a span of tokens.

    theta [B, H, T] step size; eta [B, H, T] momentum decay or None (no momentum, eta = 0);
    alpha [B, H, T] forgetting, [B, H, T, d_l] when channel-wise, or None (no forgetting, alpha = 0).
    """

    theta: Tensor
    eta: Tensor | None
    alpha: Tensor | None

    def span(self, start: int, stop: int) -> LayerGates:
        return LayerGates(
            self.theta[:, :, start:stop],
            None if self.eta is None else self.eta[:, :, start:stop],
            None if self.alpha is None else self.alpha[:, :, start:stop],
        )

    def split(self, sizes: list[int]) -> list[LayerGates]:
        """Consecutive spans of `sizes` tokens, cut by one `torch.split` per gate.

        Unlike one `span` per piece, whose backward writes each slice's gradient into a zero tensor of the whole
        length, a split's backward concatenates the pieces' gradients once: linear in T, not quadratic.
        """

        def cut(t: Tensor | None) -> list[Tensor | None]:
            return [None] * len(sizes) if t is None else list(t.split(sizes, dim=2))

        return [LayerGates(*parts) for parts in zip(cut(self.theta), cut(self.eta), cut(self.alpha), strict=True)]


def _per_layer(name: str, gate: GateArg, depth: int, shape: tuple[int, int, int], channels: list[int] | None):
    """Split one gate argument into `depth` per-layer tensors, checking shapes on the way."""
    if gate is None:
        return [None] * depth
    if isinstance(gate, Tensor):
        if tuple(gate.shape) == shape:
            return [gate] * depth
        if gate.dim() == 4 and tuple(gate.shape[:3]) == shape and gate.shape[3] == depth:
            return [gate[..., i] for i in range(depth)]
        raise ValueError(
            f"{name} must have shape [B, H, T] = {list(shape)} or [B, H, T, L] with L = {depth} (one gate per memory "
            f"layer), got {list(gate.shape)}"
        )
    gates = list(gate)
    if len(gates) != depth:
        raise ValueError(f"{name} given as a list must have one tensor per memory layer ({depth}), got {len(gates)}")
    for i, g in enumerate(gates):
        ok = tuple(g.shape) == shape
        if channels is not None:
            ok = ok or tuple(g.shape) == (*shape, channels[i])
        if not ok:
            allowed = f"[B, H, T] = {list(shape)}" + (f" or [B, H, T, {channels[i]}]" if channels else "")
            raise ValueError(f"{name}[{i}] must have shape {allowed}, got {list(g.shape)}")
    return gates


def prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: GateArg,
    eta: GateArg,
    alpha: GateArg,
    network: MemoryMLP,
    state: MemoryState | None,
    chunk_size: int,
) -> tuple[list[LayerGates], MemoryState]:
    """Validate the functional contract and return per-layer gates and the starting state."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must all have shape [B, H, T, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    batch, heads, length, dim = q.shape
    if heads != network.heads or dim != network.dim:
        raise ValueError(
            f"q/k/v have {heads} heads of size {dim} but the memory network has {network.heads} heads of size "
            f"{network.dim}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if theta is None:
        raise ValueError("theta (the inner step size) is required; pass zeros to disable memory writes")
    shape = (batch, heads, length)
    channels = [d_out for d_out, _ in network.shapes]
    thetas = _per_layer("theta", theta, network.depth, shape, None)
    etas = _per_layer("eta", eta, network.depth, shape, None)
    alphas = _per_layer("alpha", alpha, network.depth, shape, channels)
    if state is None:
        state = MemoryState.initial(network, batch)
    else:
        state.check_compatible(network, batch)
    gates = [LayerGates(t, e, a) for t, e, a in zip(thetas, etas, alphas, strict=True)]
    return gates, state
