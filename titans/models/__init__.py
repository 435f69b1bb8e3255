"""Model registry: build_model(cfg) picks the builder for cfg.variant (case-insensitive)."""

from __future__ import annotations

from collections.abc import Callable

from titans.config import VARIANTS, ModelConfig
from titans.models.backbone import LMState, TitansLM, detach_state, model_signature, num_parameters
from titans.models.baseline import build_baseline
from titans.models.lmm import build_lmm
from titans.models.mac import build_mac
from titans.models.mag import build_mag
from titans.models.mal import build_mal

# canonical variant name (as in titans.config.VARIANTS) -> builder
MODELS: dict[str, Callable[[ModelConfig], TitansLM]] = {
    "baseline": build_baseline,
    "LMM": build_lmm,
    "MAC": build_mac,
    "MAG": build_mag,
    "MAL": build_mal,
}


def canonical_variant(name: str) -> str:
    """The canonical spelling of a variant name, matched case-insensitively against VARIANTS."""
    for variant in VARIANTS:
        if variant.lower() == str(name).lower():
            return variant
    raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")


def build_model(cfg: ModelConfig) -> TitansLM:
    """Build the LM for cfg.variant. cfg.vocab_size must already be set (from the task)."""
    if cfg.vocab_size is None:
        raise ValueError("cfg.vocab_size is None: set it from the task (task.vocab_size) before building the model")
    variant = canonical_variant(cfg.variant)
    if variant not in MODELS:
        raise ValueError(f"model variant {variant!r} is not implemented yet; registered variants: {', '.join(MODELS)}")
    return MODELS[variant](cfg)


__all__ = [
    "MODELS",
    "LMState",
    "TitansLM",
    "build_model",
    "canonical_variant",
    "detach_state",
    "model_signature",
    "num_parameters",
]
