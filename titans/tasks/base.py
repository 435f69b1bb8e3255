"""The task interface: every task makes causal next-token batches with a loss mask and scores logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

IGNORE_INDEX = -100  # targets equal to this are neither trained on nor scored


@dataclass
class Batch:
    """inputs [B, T] long token ids; targets [B, T] long next tokens, IGNORE_INDEX where not scored."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.targets.to(device))

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index) -> Batch:
        return Batch(self.inputs[index], self.targets[index])


class Task(Protocol):
    name: str  # e.g. "copy_task"
    metric: str  # the headline metric's name, e.g. "copy_accuracy"
    vocab_size: int  # token ids are in [0, vocab_size)
    seq_len: int  # length T of inputs and targets
    chance: float  # headline metric of a uniform random guesser

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n independent examples, deterministic given the generator's state."""
        ...

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Metrics of logits [B, T, V] against batch.targets; includes self.metric."""
        ...
