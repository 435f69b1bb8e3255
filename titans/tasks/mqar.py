"""MQAR: multi-query associative recall, as defined by Zoology (Arora et al. 2023, `zoology/data/multiquery_ar.py`).

What it measures: whether a model can store `num_kv_pairs` key-value bindings shown at the start of a sequence and
retrieve each value when its key is queried later, at power-law distributed distances.

Layout (one example, `num_passes = 1`)::

    k1 v1 k2 v2 ... kN vN | filler ... k_a filler ... k_b ...
    context: 2N tokens    | query region: key i sits at offset 2 * gap_i, its target is v_i

* Token 0 is the filler, keys are `1 .. vocab_size//2 - 1`, values are `vocab_size//2 .. vocab_size - 1`.
* Each example draws N distinct keys and N distinct values and pairs key i with value i.
* Gaps are N distinct draws from `range(space)`, `space = (seq_len - 2N * num_passes) // 2`, with
  `P(gap = i - 1) ∝ power_a * i ** (power_a - 1)` for i = 1..space; `power_a = 0.01` strongly favours small gaps.
* The target at the input position holding query key i is v_i; every other target is IGNORE_INDEX.
* With `random_non_queries` every filler 0 is replaced by a uniform token from `[0, vocab_size)`; it can equal a
  key or a value (as in Zoology) but never lands on a query position, and its target stays ignored.

A perfect model scores `mqar_accuracy = 1.0`; a uniform guesser over the values scores `1 / (number of values)`.
Because the layout only depends on `seq_len`, a model trained at one length can be evaluated at a longer one
(`dataclasses.replace(task, seq_len=1024)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, is_data_config

if TYPE_CHECKING:
    from titans.config import DataConfig


def mqar_layout(
    keys: torch.Tensor, values: torch.Tensor, gaps: torch.Tensor, seq_len: int, num_passes: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place drawn keys, values and gaps into Zoology's MQAR layout, with filler 0 and no random non-queries.

    keys, values, gaps: [B, N] long; gaps are distinct per row and lie in `[0, (seq_len - 2N * num_passes) // 2)`.
    Returns inputs [B, seq_len] and targets [B, seq_len]: the target at the position of query key i is values[:, i].
    """
    batch, num_pairs = keys.shape
    context_size = 2 * num_pairs * num_passes
    # Interleave k1 v1 k2 v2 ...; Zoology tiles the same context `num_passes` times.
    context = torch.stack([keys, values], dim=2).reshape(batch, 2 * num_pairs).repeat(1, num_passes)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    inputs[:, :context_size] = context
    query_positions = context_size + 2 * gaps
    inputs.scatter_(1, query_positions, keys)
    # Zoology labels position `context_size + 2 * gap + 1` of the length-(seq_len + 1) sequence and then shifts by
    # one, which puts the target exactly on the input position holding the query key.
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, query_positions, values)
    return inputs, targets


@dataclass(frozen=True, kw_only=True)
class MQAR:
    """Multi-query associative recall (Zoology's `multiquery_ar`).

    Keyword arguments:
        vocab_size: total vocabulary; keys use `[1, vocab_size//2)`, values `[vocab_size//2, vocab_size)`.
            Zoology requires `vocab_size > seq_len`. Zoology's standard setting is 8192.
        seq_len: length T of inputs and targets; must be even.
        num_kv_pairs: N pairs in the context and N queries after it; needs `2N * num_passes + 2N <= seq_len`.
        power_a: exponent of the power-law gap distribution (Zoology default 0.01).
        num_passes: times the context is repeated before the queries (Zoology default 1).
        random_non_queries: replace filler 0s with uniform random tokens (Zoology default True).
    """

    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int = 16
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = True

    name = "mqar"
    metric = "mqar_accuracy"

    def __post_init__(self) -> None:
        for field_name in ("vocab_size", "seq_len", "num_kv_pairs", "num_passes"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQAR {field_name} must be a positive int, got {value!r}")
        if self.seq_len % 2 != 0:
            raise ValueError(f"MQAR seq_len must be even (queries sit on even offsets), got {self.seq_len}")
        if self.vocab_size <= self.seq_len:
            raise ValueError(
                f"MQAR needs vocab_size > seq_len (Zoology's assertion), got vocab_size={self.vocab_size}, "
                f"seq_len={self.seq_len}; raise vocab_size (Zoology uses 8192)"
            )
        needed = 2 * self.num_kv_pairs * self.num_passes + 2 * self.num_kv_pairs
        if needed > self.seq_len:
            raise ValueError(
                f"MQAR with num_kv_pairs={self.num_kv_pairs}, num_passes={self.num_passes} needs seq_len >= {needed}, "
                f"got {self.seq_len}; lower num_kv_pairs or raise seq_len"
            )
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(
                f"MQAR num_kv_pairs={self.num_kv_pairs} exceeds the {self.vocab_size // 2 - 1} distinct keys of "
                f"vocab_size={self.vocab_size}; raise vocab_size"
            )
        if not self.power_a > 0:
            raise ValueError(f"MQAR power_a must be > 0 (power-law exponent), got {self.power_a}")

    @classmethod
    def from_config(cls, data: DataConfig) -> MQAR:
        """The MQAR of `data.dataset: mqar`: data.vocab_size is the whole vocabulary, data.seq_len the length.

        data.mqar_num_kv_pairs null gives `max(1, seq_len // 16)` pairs, Zoology's train-grid ratio ((64, 4),
        (128, 8), (256, 16)). A layout that does not fit raises ConfigError naming the data.* key to change.
        """
        if not is_data_config(data):
            raise TypeError(f"MQAR.from_config expects a DataConfig, got {type(data).__name__}")
        pairs = data.mqar_num_kv_pairs if data.mqar_num_kv_pairs is not None else max(1, data.seq_len // 16)
        try:
            return cls(
                vocab_size=data.vocab_size,
                seq_len=data.seq_len,
                num_kv_pairs=pairs,
                power_a=data.mqar_power_a,
                random_non_queries=data.mqar_random_non_queries,
            )
        except ValueError as error:
            # MQAR's own message names its fields; map them to the config keys a user edits.
            message = str(error).replace("num_kv_pairs", "data.mqar_num_kv_pairs")
            for name in ("vocab_size", "seq_len"):
                message = message.replace(f"{name}=", f"data.{name}=").replace(f"raise {name}", f"raise data.{name}")
            raise ConfigError(f"dataset mqar: {message}") from error

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def gap_probabilities(self) -> torch.Tensor:
        """P(gap = i - 1) ∝ power_a * i ** (power_a - 1) for i = 1..space, as float64 [space] summing to 1."""
        space = (self.seq_len - 2 * self.num_kv_pairs * self.num_passes) // 2
        i = torch.arange(1, space + 1, dtype=torch.float64)
        p = self.power_a * i ** (self.power_a - 1)
        return p / p.sum()

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n examples [n, seq_len], deterministic given the generator's state."""
        if n < 1:
            raise ValueError(f"MQAR.sample needs n >= 1, got {n}")
        half = self.vocab_size // 2
        k = self.num_kv_pairs
        # Multinomial without replacement = Zoology's np.random.choice(..., replace=False): distinct draws per row.
        keys = 1 + torch.multinomial(torch.ones(n, half - 1), k, replacement=False, generator=generator)
        values = half + torch.multinomial(torch.ones(n, self.num_values), k, replacement=False, generator=generator)
        p = self.gap_probabilities()
        gaps = torch.multinomial(p.expand(n, -1), k, replacement=False, generator=generator)
        inputs, targets = mqar_layout(keys, values, gaps, self.seq_len, self.num_passes)
        if self.random_non_queries:
            noise = torch.randint(0, self.vocab_size, inputs.shape, generator=generator)
            # Keys and values are never 0, so only filler slots are replaced.
            inputs = torch.where(inputs == 0, noise, inputs)
        return Batch(inputs, targets)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Zoology's accuracy: per example, argmax accuracy over query positions; then the mean over examples.

        Beside it `mqar_in_context`, the same mean of the share of query predictions that name one of the example's
        own context values, right or wrong. A model that has learned where the answers come from but not which key
        binds which value scores about 1.0 there and 1 / num_kv_pairs in accuracy (docs/results.md, "the bag of
        values"); recall proper shows as accuracy rising towards it.

        logits: [B, T, V]. Returns {"mqar_accuracy": float, "mqar_in_context": float}.
        """
        if logits.dim() != 3 or logits.shape[:2] != batch.targets.shape:
            raise ValueError(
                f"MQAR.score expects logits [B, T, V] matching targets {tuple(batch.targets.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        scored = batch.targets != IGNORE_INDEX
        predictions = logits.argmax(dim=-1)
        correct = (predictions == batch.targets) & scored
        queries = scored.sum(dim=1).clamp(min=1).double()
        per_example = correct.sum(dim=1).double() / queries
        context_values = batch.inputs[:, 1 : 2 * self.num_kv_pairs : 2]  # [B, N]: v_1 .. v_N of the first pass
        named = (predictions.unsqueeze(-1) == context_values.unsqueeze(1)).any(dim=-1) & scored
        in_context = named.sum(dim=1).double() / queries
        return {self.metric: per_example.mean().item(), "mqar_in_context": in_context.mean().item()}
