"""Run configuration: typed dataclasses are the source of truth; YAML files store them.

The seed's schema (model / data / training sections) loads unchanged; new keys extend it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

VARIANTS = ("baseline", "LMM", "MAC", "MAG", "MAL")


@dataclass
class MemoryConfig:
    """The neural long-term memory (paper §3.1). Depth L_M is `model.memory_layers` (the seed's key)."""

    heads: int | None = None  # independent memories; None = model.n_heads
    expansion: int = 4  # hidden width of the memory MLP = expansion * head_dim (depth >= 2)
    activation: Literal["gelu", "silu"] = "gelu"  # NeurIPS §3.3 uses GELU inside the memory MLP
    residual_norm: bool = False  # NeurIPS form M(x) = x + LN(MLP(x))
    chunk_size: int = 16  # tokens whose inner gradients share one anchor (Eq. 16; NeurIPS App. E.1: 16)
    impl: Literal["chunked", "naive"] = "chunked"  # naive = per-token reference, for tests and debugging
    momentum: bool = True  # surprise momentum S_t (Eq. 14); False sets eta = 0
    forgetting: bool = True  # forgetting gate alpha_t (Eq. 13); False sets alpha = 0
    per_layer_gates: bool = True  # separate theta/eta/alpha per memory layer (NeurIPS App. B.3)
    channelwise_forget: bool = False  # alpha per output channel of each weight matrix (NeurIPS App. F)
    max_lr: float = 1.0  # theta_t = max_lr * sigmoid(.)
    conv_kernel: int = 4  # causal depthwise conv after the q/k/v projections (v1 §4.4)
    checkpoint_every: int = 16  # chunks per gradient-checkpoint group in training (0 = keep every chunk state)


@dataclass
class ModelConfig:
    variant: str = "MAC"  # baseline | LMM | MAC | MAG | MAL (any case)
    d_model: int = 64
    n_heads: int = 4  # attention heads (and memory heads unless memory.heads is set)
    n_layers: int = 2
    vocab_size: int | None = None  # None: taken from the task
    memory_layers: int = 2  # depth L_M of the memory MLP (seed key)
    persistent_memory_size: int = 4  # N_p learnable tokens (Eq. 19; seed key)
    window: int = 32  # sliding-window size for MAG, MAL and the windowed baseline
    segment_len: int = 32  # MAC attention segment length C
    baseline_attention: Literal["full", "sliding"] = "full"  # the baseline's attention
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio * d_model * 2/3, rounded
    rope_base: float = 10000.0
    memory: MemoryConfig = field(default_factory=MemoryConfig)
