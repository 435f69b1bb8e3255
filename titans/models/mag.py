"""MAG, Memory as a Gate (v1 §4.2, Eqs. 26-28, Figure 4).

    x~ = [p_1 .. p_Np] || x                     Eq. 26: persistent tokens prepended to the sequence (by TitansLM)
    y  = SW-Attn*(x~)                           Eq. 27: sliding-window attention; the prefix stays visible
    o  = y (x) M(x~)                            Eq. 28: the memory runs over the same input, in parallel
with (x) = GatedCombine: RMSNorm(y) * sigmoid(RMSNorm(M(x~))) (learnable vector weights, then a non-linearity).
Each block: x + GatedCombine(SWA(h), LMM(h)) with h = RMSNorm(x), then x + SwiGLU(RMSNorm(x)).
The attention branch is a precise short-term memory over `window` tokens; the neural memory is the fading long-term
one. Decoding cost per token is bounded: a KV cache of N_p + window - 1 positions and the memory state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from titans.config import ModelConfig
from titans.memory import NeuralMemory, NeuralMemoryState
from titans.memory.module import FixedMemoryState
from titans.models.backbone import TitansLM
from titans.models.layers import Attention, FixedKVCache, GatedCombine, KVCache, RMSNorm, SwiGLU, swiglu_hidden


@dataclass
class MAGState:
    attention: KVCache
    memory: NeuralMemoryState


class FixedMAGState(NamedTuple):
    """MAGState for fixed-shape decoding (`MAGBlock.decode_fixed`)."""

    attention: FixedKVCache
    memory: FixedMemoryState


class MAGBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.attn = Attention.persistent_window(cfg)
        self.memory = NeuralMemory.from_config(cfg)
        self.combine = GatedCombine(cfg.d_model)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, state: MAGState | None = None) -> tuple[torch.Tensor, MAGState]:
        """x [B, T, D] -> x [B, T, D]."""
        h = self.norm(x)
        y, cache = self.attn(h, None if state is None else state.attention)
        m, memory = self.memory(h, None if state is None else state.memory)
        x = x + self.combine(y, m)
        return x + self.mlp(self.mlp_norm(x)), MAGState(cache, memory)

    def fixed_state(self, state: MAGState, capacity: int) -> FixedMAGState:
        return FixedMAGState(self.attn.fixed_cache(state.attention, capacity), self.memory.fixed_state(state.memory))

    def decode_fixed(self, row: torch.Tensor, fixed: FixedMAGState) -> tuple[torch.Tensor, FixedMAGState]:
        """`forward` for one token on fixed-shape state (generate's compiled step): row [B, D] -> row [B, D]."""
        h = self.norm(row)
        y, cache = self.attn.decode_fixed(h, fixed.attention)
        m, memory = self.memory.decode_fixed(h, fixed.memory)
        x = row + self.combine(y, m)
        return x + self.mlp(self.mlp_norm(x)), FixedMAGState(cache, memory)


def build_mag(cfg: ModelConfig) -> TitansLM:
    return TitansLM(cfg, MAGBlock, n_prefix=cfg.persistent_memory_size)
