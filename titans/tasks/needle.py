"""Needle in a haystack (the seed's `needle_haystack`): find one marked token in a long random sequence.

What it measures: whether a model can notice a single salient event far back in its context and answer a question
about it at the end. Layout of one example, `seq_len + 1` tokens (inputs = all but the last)::

    [BOS] h h h ... [NEEDLE] (v) h h ... h [QUERY] answer

h are distractors uniform over the `vocab_size` content symbols; BOS, NEEDLE and QUERY are the next three ids.
The only scored target is the answer, predicted from the [QUERY] input:

* `needle_query: position` (the seed's task): the answer is the needle's position, binned into `needle_buckets`
  equal ranges of its possible positions; each bin has its own answer token (after QUERY).
* `needle_query: value`: the content symbol right after the needle (v) is the answer: associative recall.

The token the answer comes from (the needle, or v) lies at least `needle_min_distance` positions before the answer
(the dependency distance; default seq_len // 2, 48 for the seed's seq_len 96: beyond the 30 tokens that the
default 2-layer stack of 16-token windows reaches, and beyond the default MAC segment of 32).

A perfect model scores `needle_accuracy = 1`; a uniform guesser scores 1 / needle_buckets (position) or
1 / vocab_size (value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, check_logits, check_sample_args, is_data_config

if TYPE_CHECKING:
    from titans.config import DataConfig


class NeedleTask:
    """Answer where the needle was, or what followed it (see the module docstring for the layout)."""

    name = "needle_haystack"
    metric = "needle_accuracy"

    def __init__(self, data: DataConfig) -> None:
        # Cheap on purpose: DataConfig validation builds one to check the layout, before any tensor exists.
        if not is_data_config(data):
            raise TypeError(f"NeedleTask expects a DataConfig, got {type(data).__name__}")
        distance = data.needle_min_distance if data.needle_min_distance is not None else data.seq_len // 2
        self.query = data.needle_query
        # Needle positions 1 .. last: the recalled token (needle, or the value after it) stays `distance` before
        # the answer at position seq_len, and before [QUERY] at seq_len - 1.
        last = data.seq_len - distance - (1 if self.query == "value" else 0)
        if distance < 2 or last < 1:
            raise ConfigError(
                f"needle_haystack needs 2 <= needle_min_distance <= {data.seq_len - 1 - (self.query == 'value')} "
                f"for seq_len {data.seq_len} and needle_query {self.query!r}, got data.needle_min_distance = "
                f"{distance} (null = seq_len // 2); raise data.seq_len or change data.needle_min_distance"
            )
        self.positions = last  # candidate needle positions 1 .. last
        if data.needle_buckets < 2 or (self.query == "position" and data.needle_buckets > self.positions):
            raise ConfigError(
                f"data.needle_buckets must lie in [2, {self.positions}] (the number of possible needle positions), "
                f"got {data.needle_buckets}; lower it or raise data.seq_len"
            )
        self.seq_len = data.seq_len
        self.content_size = data.vocab_size
        self.buckets = data.needle_buckets
        self.bos, self.needle, self.query_token = range(data.vocab_size, data.vocab_size + 3)
        # Names of the special ids, which `titans generate --prompt` accepts.
        self.token_names = {"BOS": self.bos, "NEEDLE": self.needle, "QUERY": self.query_token}
        self.dependency_distance = distance
        if self.query == "position":
            self.answer_ids = tuple(range(data.vocab_size + 3, data.vocab_size + 3 + self.buckets))
        else:
            self.answer_ids = tuple(range(data.vocab_size))
        self.vocab_size = data.vocab_size + 3 + (self.buckets if self.query == "position" else 0)
        self.chance = 1.0 / len(self.answer_ids)

    def _answers(self, inputs: torch.Tensor, needle_at: torch.Tensor) -> torch.Tensor:
        """Answer ids [B] for needle positions needle_at [B] in inputs [B, T]."""
        if self.query == "position":
            # Equal bins over positions 1 .. self.positions; the first bin id follows QUERY.
            return self.answer_ids[0] + (needle_at - 1) * self.buckets // self.positions
        return inputs.gather(1, (needle_at + 1).unsqueeze(1)).squeeze(1)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n examples: inputs, targets [n, seq_len] long; only the last target (the answer) is scored."""
        check_sample_args(n, generator)
        inputs = torch.randint(0, self.content_size, (n, self.seq_len), generator=generator)
        needle_at = torch.randint(1, self.positions + 1, (n,), generator=generator)
        inputs[:, 0] = self.bos
        inputs[:, -1] = self.query_token
        inputs[torch.arange(n), needle_at] = self.needle
        targets = torch.full((n, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        targets[:, -1] = self._answers(inputs, needle_at)
        return Batch(inputs, targets)

    def oracle_logits(self, batch: Batch) -> torch.Tensor:
        """A perfect solver: logits [B, T, vocab_size], one-hot on the answer at [QUERY], found from the inputs."""
        inputs = batch.inputs
        is_needle = inputs == self.needle
        # Rows without a needle (e.g. edited inputs) get no opinion: all-zero logits.
        found = is_needle.any(1, keepdim=True)
        needle_at = is_needle.long().argmax(1).clamp(1, self.positions)
        answers = torch.nn.functional.one_hot(self._answers(inputs, needle_at), self.vocab_size).float()
        logits = torch.zeros(*inputs.shape, self.vocab_size, device=inputs.device)
        logits[:, -1] = 100.0 * answers * found
        return logits

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """needle_accuracy of argmax(logits [B, T, V]) at [QUERY], and needle_answer_prob (mean softmax on it)."""
        targets = batch.targets
        check_logits(logits, targets, self.vocab_size)
        answers, last = targets[:, -1], logits[:, -1].float()
        probs = last.softmax(-1).gather(1, answers.unsqueeze(1))
        return {
            "needle_accuracy": (last.argmax(-1) == answers).float().mean().item(),
            "needle_answer_prob": probs.mean().item(),
        }
