"""Periodic-pattern language modelling (the seed's `language_modeling`): continue a repeating random string.

What it measures: whether a model can memorise a pattern seen once and replay it when the period is longer than
its attention window. Each example draws a period p uniformly from [period_min, period_max] and p content
symbols uniform over `0 .. vocab_size-1`; the unit `c_1 ... c_p [SEP]` (SEP = vocab_size) repeats to fill
`seq_len + 1` tokens (inputs = all but the last, targets = all but the first)::

    c_1 ... c_p [SEP] c_1 ... c_p [SEP] c_1 ...

The first unit is unpredictable and not scored; every token after the first [SEP] is, because it equals the token
p + 1 positions earlier (the dependency distance). [SEP] marks where the pattern restarts: without it the first
repeated token would be ambiguous, since the model cannot know p before the pattern comes round again.

Defaults derived from `seq_len`: period_max = (seq_len + 1) // 2 - 1 (two units fit) and period_min = period_max
minus a quarter, so the seed's seq_len 96 gives p in [36, 47], distance >= 37: beyond the reach of the default
2-layer sliding-window stack (2 x (16 - 1) = 30 tokens) and longer than the default MAC segment (32).

A perfect model scores `accuracy = 1`; a uniform guesser over the answer symbols (content and [SEP]) scores
1 / (vocab_size + 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, check_logits, check_sample_args, is_data_config

if TYPE_CHECKING:
    from titans.config import DataConfig


class PatternTask:
    """Repeat a random pattern of random period (see the module docstring for the layout)."""

    name = "language_modeling"
    metric = "accuracy"

    def __init__(self, data: DataConfig) -> None:
        # Cheap on purpose: DataConfig validation builds one to check the layout, before any tensor exists.
        if not is_data_config(data):
            raise TypeError(f"PatternTask expects a DataConfig, got {type(data).__name__}")
        derived_max = (data.seq_len + 1) // 2 - 1
        low, high = data.period_min, data.period_max
        if high is None:
            high = derived_max if low is None else max(derived_max, low)
        if low is None:
            low = high - high // 4
        if not 1 <= low <= high <= data.seq_len - 1:
            raise ConfigError(
                f"language_modeling needs 1 <= data.period_min <= data.period_max <= data.seq_len - 1 so that some "
                f"token follows the first [SEP]; got period_min {low}, period_max {high}, seq_len {data.seq_len} "
                "(null periods are derived from seq_len); raise data.seq_len or lower the periods"
            )
        self.seq_len = data.seq_len
        self.period_min, self.period_max = low, high
        self.content_size = data.vocab_size
        self.sep = data.vocab_size
        self.token_names = {"SEP": self.sep}  # accepted by `titans generate --prompt`
        self.vocab_size = data.vocab_size + 1
        self.dependency_distance = low + 1  # the shortest unit: every scored token repeats one unit back
        self.answer_ids = tuple(range(self.vocab_size))
        self.chance = 1.0 / self.vocab_size

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n examples: inputs, targets [n, seq_len] long; targets are IGNORE_INDEX up to the first [SEP]."""
        check_sample_args(n, generator)
        periods = torch.randint(self.period_min, self.period_max + 1, (n, 1), generator=generator)
        content = torch.randint(0, self.content_size, (n, self.period_max), generator=generator)
        phase = torch.arange(self.seq_len + 1) % (periods + 1)  # [n, seq_len + 1]; phase p is the [SEP]
        symbols = content.gather(1, phase.clamp(max=self.period_max - 1))
        tokens = torch.where(phase == periods, self.sep, symbols)
        targets = tokens[:, 1:].clone()
        # Target t is token t + 1; tokens 0 .. p (the first unit, [SEP] included) cannot be predicted.
        targets[torch.arange(self.seq_len) < periods] = IGNORE_INDEX
        return Batch(tokens[:, :-1], targets)

    def _periods(self, inputs: torch.Tensor) -> torch.Tensor:
        """p per row [B, 1], read causally: the first [SEP] sits at input position p (p <= seq_len - 1)."""
        return (inputs == self.sep).long().argmax(1, keepdim=True)

    def oracle_logits(self, batch: Batch) -> torch.Tensor:
        """A perfect causal solver: logits [B, T, vocab_size]; once [SEP] has been seen, position t repeats t - p.

        It reads only inputs[:, : t + 1] for position t, so it also shows the task is solvable causally.
        """
        inputs = batch.inputs
        periods = self._periods(inputs)
        source = torch.arange(self.seq_len, device=inputs.device) - periods  # [B, T]
        answers = inputs.gather(1, source.clamp(min=0))
        logits = torch.nn.functional.one_hot(answers, self.vocab_size).float() * 100.0
        return logits * (source >= 0).unsqueeze(-1)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """accuracy over scored tokens, sequence_accuracy, and first_repeat_accuracy (the unit right after the
        first, where each token has been seen exactly once) of argmax(logits [B, T, V])."""
        targets = batch.targets
        check_logits(logits, targets, self.vocab_size)
        scored = targets != IGNORE_INDEX
        correct = (logits.argmax(-1) == targets) & scored
        periods = self._periods(batch.inputs)
        first_repeat = scored & (torch.arange(self.seq_len, device=targets.device) <= 2 * periods)
        return {
            "accuracy": (correct.sum() / scored.sum()).item(),
            "sequence_accuracy": (correct.sum(1) == scored.sum(1)).float().mean().item(),
            "first_repeat_accuracy": ((correct & first_repeat).sum() / first_repeat.sum()).item(),
        }
