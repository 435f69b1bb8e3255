"""Titans (LMM): the neural long-term memory as the only token mixer (v1 §4.3 "Memory Without Attention").

Llama macro-architecture with attention replaced by the memory (NeurIPS §3.3): x + LMM(RMSNorm(x)), then
x + SwiGLU(RMSNorm(x)). The paper's ablation removes persistent memory from this model, so it carries N_p persistent
tokens, prepended to the sequence and written into the memory first. Per-token decoding cost is constant: the state is
the fast weights, the momentum and a 3-token conv history.
"""

from __future__ import annotations

import torch
from torch import nn

from titans.config import ModelConfig
from titans.memory import NeuralMemory, NeuralMemoryState
from titans.memory.module import FixedMemoryState
from titans.models.backbone import TitansLM
from titans.models.layers import RMSNorm, SwiGLU, swiglu_hidden


class LMMBlock(nn.Module):
    """x [B, T, D] -> x [B, T, D]; the state is the memory's (fast weights, momentum, conv history)."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.memory_norm = RMSNorm(cfg.d_model)
        self.memory = NeuralMemory.from_config(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(
        self, x: torch.Tensor, state: NeuralMemoryState | None = None
    ) -> tuple[torch.Tensor, NeuralMemoryState]:
        h, state = self.memory(self.memory_norm(x), state)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), state

    def fixed_state(self, state: NeuralMemoryState, capacity: int) -> FixedMemoryState:
        return self.memory.fixed_state(state)

    def decode_fixed(self, row: torch.Tensor, fixed: FixedMemoryState) -> tuple[torch.Tensor, FixedMemoryState]:
        """`forward` for one token on fixed-shape state (generate's compiled step): row [B, D] -> row [B, D]."""
        h, fixed = self.memory.decode_fixed(self.memory_norm(row), fixed)
        x = row + h
        return x + self.mlp(self.mlp_norm(x)), fixed


def build_lmm(cfg: ModelConfig) -> TitansLM:
    return TitansLM(cfg, LMMBlock, n_prefix=cfg.persistent_memory_size)
