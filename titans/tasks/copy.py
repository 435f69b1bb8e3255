"""Copy task (the seed's `copy_task`): reproduce a random string after a long gap.

What it measures: whether a model can hold `n` arbitrary symbols over a distance longer than its attention
window and replay them in order. Layout of one example, `seq_len + 1` tokens (inputs = all but the last,
targets = all but the first)::

    [BOS] x_1 ... x_n [FILL] * gap [SEP] x_1 ... x_n [PAD] ...

x_i are uniform over the `vocab_size` content symbols `0 .. vocab_size-1`; BOS, SEP, FILL and PAD are the next
four ids. Only the copied symbols are scored: the input at [SEP] predicts x_1, the input holding x_i predicts
x_{i+1}. Each copied symbol sits `n + gap + 1` positions after its source (the dependency distance), so a model
whose attention sees fewer than `n + gap + 1` positions (the current one included) must recall it from memory.
BOS and SEP frame the string: the memory can solve the task as associative recall keyed by the preceding few
tokens (its q/k/v pass through a short causal conv), and the framing makes the first copied symbol addressable.

Defaults derived from `seq_len`: n = (seq_len + 1) // 4 and the gap fills the rest, so the seed's seq_len 96
gives n = 24, gap = 47, distance 72 > the default MAC segment (32) and the 30 tokens a 2-layer stack of
16-token windows reaches.

A perfect copier scores `copy_accuracy = 1`; a uniform guesser over the content symbols scores 1 / vocab_size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, check_logits, check_sample_args, is_data_config

if TYPE_CHECKING:
    from titans.config import DataConfig


class CopyTask:
    """Copy `copy_length` symbols across `copy_gap` filler tokens (see the module docstring for the layout)."""

    name = "copy_task"
    metric = "copy_accuracy"

    def __init__(self, data: DataConfig) -> None:
        # Cheap on purpose: DataConfig validation builds one to check the layout, before any tensor exists.
        if not is_data_config(data):
            raise TypeError(f"CopyTask expects a DataConfig, got {type(data).__name__}")
        room = data.seq_len + 1  # tokens per example, including the last target
        length, gap = data.copy_length, data.copy_gap
        if length is None and gap is None:
            length = room // 4
        if length is None:
            length = (room - 2 - gap) // 2
        if gap is None:
            gap = room - 2 - 2 * length
        if length < 1 or (data.copy_gap is not None and gap < 0):
            raise ConfigError(
                f"copy_task needs data.copy_length >= 1 and data.copy_gap >= 0, got {length} and {gap} "
                f"(null values are derived from data.seq_len = {data.seq_len}); raise seq_len or set them explicitly"
            )
        if 2 * length + max(gap, 0) + 2 > room:
            gap = max(gap, 0)
            raise ConfigError(
                f"copy_task layout [BOS] + {length} symbols + {gap} fillers + [SEP] + {length} copies needs "
                f"data.seq_len >= {2 * length + gap + 1}, got {data.seq_len}; "
                "raise data.seq_len or lower data.copy_length / data.copy_gap"
            )
        self.seq_len = data.seq_len
        self.copy_length, self.copy_gap = length, gap
        self.content_size = data.vocab_size
        self.bos, self.sep, self.fill, self.pad = range(data.vocab_size, data.vocab_size + 4)
        # Names of the special ids, which `titans generate --prompt` accepts (e.g. "BOS 3 1 7 FILL*35 SEP").
        self.token_names = {"BOS": self.bos, "SEP": self.sep, "FILL": self.fill, "PAD": self.pad}
        self.vocab_size = data.vocab_size + 4
        self.sep_position = 1 + length + gap  # index of [SEP] in the example
        self.dependency_distance = length + gap + 1  # copy position - source position
        self.answer_ids = tuple(range(data.vocab_size))
        self.chance = 1.0 / data.vocab_size

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n examples: inputs, targets [n, seq_len] long; targets are IGNORE_INDEX except on copied symbols."""
        check_sample_args(n, generator)
        length, sep = self.copy_length, self.sep_position
        content = torch.randint(0, self.content_size, (n, length), generator=generator)
        tokens = torch.full((n, self.seq_len + 1), self.pad, dtype=torch.long)
        tokens[:, 0] = self.bos
        tokens[:, 1 : 1 + length] = content
        tokens[:, 1 + length : sep] = self.fill
        tokens[:, sep] = self.sep
        tokens[:, sep + 1 : sep + 1 + length] = content
        targets = torch.full((n, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        # Target t is token t + 1, so the copied tokens sep+1 .. sep+n are targets sep .. sep+n-1.
        targets[:, sep : sep + length] = content
        return Batch(tokens[:, :-1], targets)

    def oracle_logits(self, batch: Batch) -> torch.Tensor:
        """A perfect causal solver: logits [B, T, vocab_size] that at each scored t look back n + gap inputs.

        It reads only inputs[:, : t + 1] for position t, so it also shows the task is solvable causally.
        """
        inputs = batch.inputs
        logits = torch.zeros(*inputs.shape, self.vocab_size, device=inputs.device)
        positions = torch.arange(self.sep_position, self.sep_position + self.copy_length, device=inputs.device)
        answers = inputs[:, positions - (self.copy_length + self.copy_gap)]  # x_1 .. x_n, at positions 1 .. n
        logits[:, positions] = torch.nn.functional.one_hot(answers, self.vocab_size).float() * 100.0
        return logits

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """copy_accuracy (per copied token) and copy_sequence_accuracy (all n correct) of argmax(logits [B, T, V])."""
        targets = batch.targets
        check_logits(logits, targets, self.vocab_size)
        scored = targets != IGNORE_INDEX
        correct = (logits.argmax(-1) == targets) & scored
        return {
            "copy_accuracy": (correct.sum() / scored.sum()).item(),
            "copy_sequence_accuracy": (correct.sum(1) == scored.sum(1)).float().mean().item(),
        }
