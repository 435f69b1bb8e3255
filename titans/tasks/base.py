"""The task interface: every task makes causal next-token batches with a loss mask and scores logits."""

from __future__ import annotations

import sys
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


def check_sample_args(n: int, generator: torch.Generator) -> None:
    """The argument checks every task's `sample` starts with."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (CPU), got {type(generator).__name__}")


def check_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> None:
    """The shape check every task's `score` starts with: logits [B, T, >= vocab_size] against targets [B, T]."""
    if logits.dim() != 3 or logits.shape[:2] != targets.shape or logits.shape[2] < vocab_size:
        raise ValueError(
            f"logits must be [B, T, >= {vocab_size}] matching targets {tuple(targets.shape)}, got {tuple(logits.shape)}"
        )


def is_data_config(obj: object) -> bool:
    """isinstance(obj, DataConfig), without importing titans.config (which imports the tasks to validate with them).

    A DataConfig can only exist once its module is imported, so an unimported module means obj is not one.
    """
    module = sys.modules.get("titans.config.data")
    return module is not None and isinstance(obj, module.DataConfig)
