"""The whole run config (`RunConfig`): the model, data and training sections, the seed, and cross-section checks.

Each field's docstring is its entry in the README's config table (scripts/readme_sections.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from titans.config.coerce import _coerce_fields, _require
from titans.config.data import DataConfig
from titans.config.model import ModelConfig
from titans.config.training import TrainingConfig
from titans.tasks import make_task

FLEX_ON_CPU_ERROR = (
    "model.attention_impl=flex cannot train on CPU (PyTorch's FlexAttention has no CPU backward); use "
    "model.attention_impl=sdpa, the same attention, or training.device=cuda"
)


@dataclass
class RunConfig:
    """A whole run: the seed's three sections plus the random seed."""

    _path: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model.* keys."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data.* keys."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The training.* keys."""

    seed: int = 0
    """The same on every process: torch.manual_seed(seed) before the model is built (identical initial weights);
    the fixed data set is drawn with seed, its per-epoch shuffles with seed + 1, and fresh samples row by row with
    (seed, step, global row), so the data do not depend on the number of processes."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
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
            not (self.training.cuda_graph and self.data.dataset == "text" and self.data.text_carry_state),
            "training.cuda_graph=true replays steps that start from an empty state, but data.text_carry_state=true "
            "carries each step's state to the next; set data.text_carry_state=false or training.cuda_graph=false",
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
