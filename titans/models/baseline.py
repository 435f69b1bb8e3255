"""The baseline: a Llama-style Transformer with no neural memory, the control for every experiment.

Each block is pre-RMSNorm residual: x + Attn(norm(x)), then x + SwiGLU(norm(x)). Attention is full causal, or sliding
window of cfg.window tokens when cfg.baseline_attention == "sliding" (the short-term memory the Titans variants add a
long-term memory to). RoPE positions are absolute stream positions, so the KV cache makes streaming and cached
decoding exact. The baseline uses no persistent tokens (cfg.persistent_memory_size is ignored).
"""

from __future__ import annotations

import torch
from torch import nn

from titans.config import ModelConfig
from titans.models.backbone import TitansLM
from titans.models.layers import Attention, FixedKVCache, KVCache, RMSNorm, SwiGLU, swiglu_hidden


class BaselineBlock(nn.Module):
    """Pre-norm attention + SwiGLU block. forward(x [B, T, D], cache) -> (x [B, T, D], cache).

    n_prefix > 0 keeps the first n_prefix stream positions visible to sliding-window attention (for use under a
    TitansLM with persistent tokens); the baseline itself uses 0.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int, n_prefix: int = 0) -> None:
        super().__init__()
        if cfg.baseline_attention not in ("full", "sliding"):
            raise ValueError(f"baseline_attention must be 'full' or 'sliding', got {cfg.baseline_attention!r}")
        window = cfg.window if cfg.baseline_attention == "sliding" else None
        self.layer_index = layer_index
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.rope_base, window=window, n_prefix=n_prefix, impl=cfg.attention_impl
        )
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        h, cache = self.attn(self.attn_norm(x), state)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache

    def fixed_state(self, state: KVCache, capacity: int) -> FixedKVCache:
        return self.attn.fixed_cache(state, capacity)

    def decode_fixed(self, row: torch.Tensor, fixed: FixedKVCache) -> tuple[torch.Tensor, FixedKVCache]:
        """`forward` for one token on a fixed-shape cache (generate's compiled step): row [B, D] -> row [B, D]."""
        h, fixed = self.attn.decode_fixed(self.attn_norm(row), fixed)
        x = row + h
        return x + self.mlp(self.mlp_norm(x)), fixed


def build_baseline(cfg: ModelConfig) -> TitansLM:
    """The baseline LM for cfg (cfg.vocab_size must be set)."""
    return TitansLM(cfg, BaselineBlock, n_prefix=0)
