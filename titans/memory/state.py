"""The memory's per-sequence state, carried from call to call (streaming) and from chunk to chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from titans.memory.network import MemoryMLP


@dataclass
class MemoryState:
    """Fast weights of a batch of sequences, after `position` tokens of the stream.

    weights[l], momentum[l], anchor[l]: [B, H, d_l, d_{l-1}].
    weights  M_t, the memory after the last token (Eq. 13).
    momentum S_t, the surprise with momentum (Eq. 14).
    anchor   M_{t'}, the weights at the start of the current chunk: every inner gradient of the chunk is taken
             there (Eq. 16). A stream that stops mid-chunk resumes with the same anchor, so splitting a sequence
             anywhere gives the same result as one call.
    position tokens processed so far; chunk boundaries sit at multiples of the chunk size from the stream start.
    """

    weights: tuple[Tensor, ...]
    momentum: tuple[Tensor, ...]
    anchor: tuple[Tensor, ...]
    position: int = 0

    @classmethod
    def initial(cls, network: MemoryMLP, batch_size: int) -> MemoryState:
        """Every sequence starts from the network's learned M_0 (a broadcast view: autograd reaches M_0) and S_0 = 0."""
        weights = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in network.initial_weights)
        momentum = tuple(torch.zeros_like(w) for w in weights)
        return cls(weights, momentum, weights, 0)

    def detach(self) -> MemoryState:
        """The same state cut from the autograd graph (truncated back-propagation between training windows)."""
        return MemoryState(
            tuple(w.detach() for w in self.weights),
            tuple(s.detach() for s in self.momentum),
            tuple(a.detach() for a in self.anchor),
            self.position,
        )

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    def check_compatible(self, network: MemoryMLP, batch_size: int) -> None:
        """Raise a ValueError naming the mismatch if this state cannot continue a stream of `network`."""
        if len(self.weights) != network.depth:
            raise ValueError(f"memory state has {len(self.weights)} layers but the memory has depth {network.depth}")
        if self.batch_size != batch_size:
            raise ValueError(
                f"memory state holds {self.batch_size} sequences but the input has batch size {batch_size}; "
                "pass state=None to start new sequences"
            )
        for w, (d_out, d_in) in zip(self.weights, network.shapes, strict=True):
            if tuple(w.shape[1:]) != (network.heads, d_out, d_in):
                raise ValueError(
                    f"memory state weight of shape {tuple(w.shape)} does not match the memory "
                    f"({network.heads} heads, layer {d_out}x{d_in}); was it made by another model?"
                )
