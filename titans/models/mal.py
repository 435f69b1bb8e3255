"""MAL, Memory as a Layer (v1 §4.3, Eqs. 29-31, Figure 5).

    x~ = [p_1 .. p_Np] || x          Eq. 29: persistent tokens prepended to the sequence (by TitansLM)
    y  = M(x~)                       Eq. 30: the memory layer first
    o  = SW-Attn(y)                  Eq. 31: then sliding-window attention over the memory's output
H3-style stacking (v1: "a similar architecture as H3 ... where we replace the sequence model with our LMM"): each block
is x + LMM(RMSNorm(x)), then x + SWA(RMSNorm(x)) with the prefix kept visible, then x + SwiGLU(RMSNorm(x)).
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
from titans.models.layers import Attention, FixedKVCache, KVCache, RMSNorm, SwiGLU, swiglu_hidden


@dataclass
class MALState:
    memory: NeuralMemoryState
    attention: KVCache


class FixedMALState(NamedTuple):
    """MALState for fixed-shape decoding (`MALBlock.decode_fixed`)."""

    memory: FixedMemoryState
    attention: FixedKVCache


class MALBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.memory_norm = RMSNorm(cfg.d_model)
        self.memory = NeuralMemory.from_config(cfg)
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention.persistent_window(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, state: MALState | None = None) -> tuple[torch.Tensor, MALState]:
        """x [B, T, D] -> x [B, T, D]."""
        m, memory = self.memory(self.memory_norm(x), None if state is None else state.memory)
        x = x + m
        y, cache = self.attn(self.attn_norm(x), None if state is None else state.attention)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), MALState(memory, cache)

    def fixed_state(self, state: MALState, capacity: int) -> FixedMALState:
        return FixedMALState(self.memory.fixed_state(state.memory), self.attn.fixed_cache(state.attention, capacity))

    def decode_fixed(self, row: torch.Tensor, fixed: FixedMALState) -> tuple[torch.Tensor, FixedMALState]:
        """`forward` for one token on fixed-shape state (generate's compiled step): row [B, D] -> row [B, D]."""
        m, memory = self.memory.decode_fixed(self.memory_norm(row), fixed.memory)
        x = row + m
        y, cache = self.attn.decode_fixed(self.attn_norm(x), fixed.attention)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), FixedMALState(memory, cache)


def build_mal(cfg: ModelConfig) -> TitansLM:
    return TitansLM(cfg, MALBlock, n_prefix=cfg.persistent_memory_size)
