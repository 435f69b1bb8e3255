"""The small model configuration the model, decode and compile tests share (imported by those test files)."""

from __future__ import annotations

from titans.config import MemoryConfig, ModelConfig

VOCAB = 11


def tiny_model_config(
    variant: str,
    segment_len: int = 6,
    baseline_attention: str = "sliding",
    attention_impl: str = "sdpa",
    mac_memory_input: str = "residual",
    **memory,
) -> ModelConfig:
    """d_model 16, 2 heads, 2 layers, window 5, 2 persistent tokens, memory chunk 4 (expansion 2).

    The default segment of 6 against chunks of 4 puts segment and chunk boundaries at 4, 6, 8, 12, 16: both grids get
    exercised. `memory` overrides MemoryConfig fields.
    """
    return ModelConfig(
        variant=variant,
        d_model=16,
        n_heads=2,
        n_layers=2,
        vocab_size=VOCAB,
        window=5,
        segment_len=segment_len,
        persistent_memory_size=2,
        baseline_attention=baseline_attention,
        attention_impl=attention_impl,
        mac_memory_input=mac_memory_input,
        memory=MemoryConfig(chunk_size=4, expansion=2, **memory),
    )
