"""The `model` section of a run config: the language model (`ModelConfig`) and its neural memory (`MemoryConfig`).

Defaults here are the documented defaults; YAML files list only what differs. Each field's docstring is its entry
in the README's config table (scripts/readme_sections.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, NamedTuple

from titans.config.coerce import _close, _coerce_fields, _require
from titans.errors import ConfigError

VARIANTS = ("baseline", "LMM", "MAC", "MAG", "MAL")

# The variants whose memory writes strongly by default: theta_init 0.25, the last layer's inner gradient at the
# current weights and no surprise momentum (`memory_defaults`). With the first two the LMM leaves MQAR's value prior on
# every seed; without momentum it goes on to bind keys to values (recall), which it did not do within 6,000 steps with
# it. MAC, MAG and MAL keep theta_init 0.05, Eq. 16's chunk-start gradients and momentum: MAC lost the patterns and
# needle tables with the strong write; MAG and MAL gained on patterns but trained 10-16 % slower (docs/results.md,
# "The memory defaults by variant").
STRONG_WRITE_VARIANTS = ("LMM",)

# Vocabularies beyond 2**20 ids are refused: the embedding and head would need megabytes per channel each,
# and tasks enumerate their answer ids; refusing them in the config beats an out-of-memory kill in a task or model.
MAX_VOCAB = 2**20


@dataclass
class MemoryConfig:
    """The neural long-term memory (paper §3.1). Depth L_M is `model.memory_layers` (the seed's key)."""

    _path: ClassVar[str] = "model.memory."

    heads: int | None = None
    """Independent memories; null = model.n_heads."""

    expansion: int = 4
    """Hidden width of the memory MLP = expansion * head_dim (depth >= 2)."""

    activation: Literal["gelu", "silu"] = "gelu"
    """Activation inside the memory MLP; NeurIPS §3.3 uses GELU."""

    residual_norm: bool = False
    """The NeurIPS form M(x) = x + LN(MLP(x))."""

    chunk_size: int = 16
    """Tokens whose inner gradients share one anchor (Eq. 16; NeurIPS App. E.1: 16); 1 = per-token updates."""

    impl: Literal["fused", "triton", "chunked", "naive"] = "fused"
    """fused: the fused scan (one op with a hand-written backward; C++ on CPU, Triton kernels on CUDA where they
    apply); triton: the Triton kernels, an error without triton; chunked, naive: the references they are tested on."""

    momentum: bool | None = None
    """Surprise momentum S_t (Eq. 14); false sets eta = 0. null = the variant's: false for LMM, true for MAC, MAG and
    MAL (docs/results.md, "The memory defaults by variant")."""

    forgetting: bool = True
    """Forgetting gate alpha_t (Eq. 13); false sets alpha = 0."""

    per_layer_gates: bool = True
    """Separate theta/eta/alpha per memory layer (NeurIPS App. B.3)."""

    channelwise_forget: bool = False
    """alpha per output channel of each weight matrix (NeurIPS App. F); needs forgetting = true."""

    max_lr: float = 1.0
    """theta_t = max_lr * sigmoid(.)."""

    conv_kernel: int = 4
    """Causal depthwise conv after the q/k/v projections (v1 §4.4); 1 = no mixing in time."""

    checkpoint_every: int | None = None
    """Backward keeps the state every this many chunks and recomputes the groups in between; 0 = keep every chunk;
    null = automatic (fused: every chunk while a call's kept tensors fit 512 MB, else groups of about
    sqrt(chunks x memories / threads); chunked: 16)."""

    inner_grad_clip: float | None = 1.0
    """Max norm of each token's inner gradient per memory layer; null = off."""

    theta_init: float | None = None
    """theta_t starts near this, in (0, max_lr); null = the variant's: min(0.25, max_lr / 2) for LMM, min(0.05,
    max_lr / 2) for MAC, MAG and MAL (docs/results.md, "The memory defaults by variant")."""

    exact_last_layer: bool | None = None
    """The last memory layer's inner gradient at the current weights, the others' at the chunk start (the delta rule
    within a chunk for the last layer; not Eq. 16). Every impl; with residual_norm only impl = naive. null = the
    variant's: true for LMM (false with residual_norm), false for MAC, MAG and MAL."""

    eta_init: float = 0.5
    """eta_t (the surprise momentum's decay) starts near this, in (0, 1)."""

    alpha_init: float | None = None
    """alpha_t starts near this, in (0, 1); null = 0.01, or 1e-4 with residual_norm (the LayerNorm hides decay)."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
        _require(self.heads is None or self.heads >= 1, f"{p}heads must be >= 1 or null (= model.n_heads)")
        _require(self.expansion >= 1, f"{p}expansion must be >= 1, got {self.expansion}")
        _require(self.chunk_size >= 1, f"{p}chunk_size must be >= 1 (1 = per-token updates), got {self.chunk_size}")
        _require(self.max_lr > 0, f"{p}max_lr must be > 0, got {self.max_lr}")
        _require(
            self.theta_init is None or 0 < self.theta_init < self.max_lr,
            f"{p}theta_init must lie in (0, max_lr = {self.max_lr}), got {self.theta_init}; "
            f"lower {p}theta_init or raise {p}max_lr",
        )
        _require(
            not (self.exact_last_layer and self.residual_norm) or self.impl == "naive",
            f"{p}exact_last_layer = true with {p}residual_norm = true needs {p}impl=naive (the LayerNorm makes the "
            f"last layer's errors non-linear: no chunk-parallel form), got {p}impl={self.impl}",
        )
        _require(0 < self.eta_init < 1, f"{p}eta_init must lie in (0, 1), got {self.eta_init}")
        _require(
            self.alpha_init is None or 0 < self.alpha_init < 1,
            f"{p}alpha_init must lie in (0, 1) or be null (automatic), got {self.alpha_init}",
        )
        _require(self.conv_kernel >= 1, f"{p}conv_kernel must be >= 1 (1 = no mixing in time), got {self.conv_kernel}")
        ckpt = self.checkpoint_every
        _require(ckpt is None or ckpt >= 0, f"{p}checkpoint_every must be >= 0 or null (automatic), got {ckpt}")
        _require(
            self.inner_grad_clip is None or self.inner_grad_clip > 0,
            f"{p}inner_grad_clip must be > 0 or null (no clipping), got {self.inner_grad_clip}",
        )
        _require(
            self.forgetting or not self.channelwise_forget,
            f"{p}channelwise_forget = true needs {p}forgetting = true (it makes the forgetting gate per channel); "
            f"set {p}forgetting=true or {p}channelwise_forget=false",
        )


class MemoryDefaults(NamedTuple):
    """The memory fields whose null means "the variant's default" (`memory_defaults`), resolved."""

    theta_init: float
    exact_last_layer: bool
    momentum: bool


def memory_defaults(variant: str, memory: MemoryConfig) -> MemoryDefaults:
    """theta_init, exact_last_layer and momentum of `variant`'s memory: `memory`'s own values, or where null the
    variant's defaults (STRONG_WRITE_VARIANTS above; the fields' docstrings)."""
    strong = variant in STRONG_WRITE_VARIANTS
    theta = memory.theta_init if memory.theta_init is not None else min(0.25 if strong else 0.05, memory.max_lr / 2)
    exact = memory.exact_last_layer
    if exact is None:
        exact = strong and not memory.residual_norm  # a residual + LayerNorm memory has no chunk-parallel exact form
    momentum = memory.momentum if memory.momentum is not None else not strong
    return MemoryDefaults(theta, exact, momentum)


def resolved_memory(model: ModelConfig) -> MemoryConfig:
    """`model.memory` with the variant's defaults written in where it has nulls (`memory_defaults`): what a run saves,
    so that its config and checkpoints keep their meaning if the defaults change later."""
    return replace(model.memory, **memory_defaults(model.variant, model.memory)._asdict())


@dataclass
class ModelConfig:
    """The language model around the memory: variant, widths, attention window and MAC segment length."""

    _path: ClassVar[str] = "model."

    variant: str = "MAC"
    """baseline / LMM / MAC / MAG / MAL (any case; normalised to the spelling in VARIANTS)."""

    d_model: int = 64
    """Model width: token embedding and residual stream."""

    n_heads: int = 4
    """Attention heads (and memory heads unless memory.heads is set); d_model / n_heads must be even (RoPE)."""

    n_layers: int = 2
    """Blocks stacked."""

    vocab_size: int | None = None
    """Token ids of the embedding and head, at least the task's vocabulary; null = the task's."""

    memory_layers: int = 2
    """Depth L_M of the memory MLP (seed key)."""

    persistent_memory_size: int = 4
    """N_p learnable tokens (Eq. 19; seed key)."""

    window: int = 16
    """Sliding window of MAG, MAL and the windowed baseline; n_layers stacked windows reach back
    n_layers * (window - 1) tokens (30 by default), so task distances must exceed that, not just the window."""

    segment_len: int = 32
    """MAC attention segment length C."""

    mac_memory_input: Literal["residual", "attention"] = "residual"
    """What MAC's memory writes and reads (Eqs. 24-25): residual = the block's normed input plus the attention output
    y_t, the residual stream after the attention sublayer; attention = y_t alone, Eq. 24 read literally (which left
    MAC on MQAR's bag of values; docs/results.md, "MAC learns recall when its memory reads the residual stream")."""

    baseline_attention: Literal["full", "sliding"] = "full"
    """The baseline's attention: full causal, or a sliding window of `window` tokens."""

    attention_impl: Literal["sdpa", "flex"] = "sdpa"
    """Sequence attention of baseline/MAG/MAL: sdpa, or flex = FlexAttention, block-sparse on CUDA (its backward
    needs CUDA); MAC's segment attention is always SDPA."""

    mlp_ratio: float = 4.0
    """SwiGLU hidden width = mlp_ratio * d_model * 2/3, rounded up to a multiple of 8."""

    rope_base: float = 10000.0
    """Base of the rotary position embedding's frequencies."""

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The neural memory: the model.memory.* keys."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
        canonical = {name.lower(): name for name in VARIANTS}
        if self.variant.lower() not in canonical:
            guess = _close(self.variant.lower(), list(canonical))
            hint = f" (did you mean {canonical[guess]!r}?)" if guess else ""
            raise ConfigError(f"{p}variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}{hint}")
        self.variant = canonical[self.variant.lower()]
        for name in ("d_model", "n_heads", "n_layers", "memory_layers", "window", "segment_len"):
            _require(getattr(self, name) >= 1, f"{p}{name} must be >= 1, got {getattr(self, name)}")
        _require(
            self.d_model % self.n_heads == 0,
            f"{p}d_model = {self.d_model} is not divisible by {p}n_heads = {self.n_heads}; "
            "pick n_heads that divides it",
        )
        # RoPE rotates channel pairs, so each attention head needs an even width.
        _require(
            (self.d_model // self.n_heads) % 2 == 0,
            f"head width {p}d_model / {p}n_heads = {self.d_model // self.n_heads} must be even for rotary embeddings",
        )
        memory_heads = self.memory.heads if self.memory.heads is not None else self.n_heads
        _require(
            self.d_model % memory_heads == 0,
            f"{p}d_model = {self.d_model} is not divisible by the {memory_heads} memory heads; "
            f"set {p}memory.heads to a divisor of d_model",
        )
        _require(self.vocab_size is None or self.vocab_size >= 2, f"{p}vocab_size must be >= 2 or null (= task's)")
        _require(
            self.vocab_size is None or self.vocab_size <= MAX_VOCAB,
            f"{p}vocab_size = {self.vocab_size} exceeds the {MAX_VOCAB:,} ids this library supports; use a smaller "
            "vocabulary (or null to take the task's)",
        )
        _require(
            self.persistent_memory_size >= 0,
            f"{p}persistent_memory_size must be >= 0, got {self.persistent_memory_size}",
        )
        _require(
            self.attention_impl == "sdpa" or self.variant in ("baseline", "MAG", "MAL"),
            f"{p}attention_impl=flex applies to the sequence attention of baseline, MAG and MAL; {self.variant} has "
            f"{'no attention' if self.variant == 'LMM' else 'only short per-segment attention, always SDPA'}, so set "
            f"{p}attention_impl=sdpa",
        )
        _require(self.mlp_ratio > 0, f"{p}mlp_ratio must be > 0, got {self.mlp_ratio}")
        _require(self.rope_base > 0, f"{p}rope_base must be > 0, got {self.rope_base}")
