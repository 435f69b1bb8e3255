"""Every path a newcomer takes ends in one line, not a traceback.

Each mistake below (a binary corpus, out_dir naming a file, a YAML file given as a checkpoint, a negative
temperature, an MQAR sweep past the vocabulary, a size no memory holds, `--max-steps 5`) must exit non-zero with
exactly one line on stderr that names the key or flag and the fix, and leave nothing in the run directory that a
later `--resume` would trip on. The checks run `python -m titans` in a child process: the honest test of "no
traceback". A corrupt newest checkpoint met on resume is named in a warning and moved aside.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from titans import cli
from titans.checkpoint import list_checkpoints
from titans.config import load_config
from titans.train import train

TINY_YAML = """\
model: {variant: baseline, d_model: 16, n_heads: 2, n_layers: 1}
data: {dataset: copy_task, seq_len: 24, num_samples: 40}
training: {batch_size: 8, max_steps: 1, warmup_steps: 1, device: cpu, progress: false}
"""


def titans(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titans", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def single_line(stderr: str, *expected: str) -> str:
    """The one line of `stderr` (no traceback), after checking that it names every `expected` text."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The single stderr line of a failed command, after checking that it names every `expected` text."""
    assert proc.returncode != 0, proc.stdout
    return single_line(proc.stderr, *expected)


def assert_nothing_to_trip_on(run_dir: Path) -> None:
    """No checkpoint or metrics a later `--resume` would pick up (or be confused by) in `run_dir`."""
    assert not list_checkpoints(run_dir)
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    return tmp_path


def train_args(work: Path, *overrides: str) -> list[str]:
    return ["train", "--config", "tiny.yaml", f"training.out_dir={work / 'runs'}", "training.run_name=r", *overrides]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny copy-task run with checkpoints after steps 1 and 2 (trained in this process, in about a second)."""
    out = tmp_path_factory.mktemp("trained")
    (out / "tiny.yaml").write_text(TINY_YAML)
    cfg = load_config(out / "tiny.yaml", [f"training.out_dir={out}", "training.run_name=run", "training.max_steps=2"])
    cfg.training.checkpoint_every = 1
    train(cfg)
    return out / "run"


# ---------------------------------------------------------------------------------------------------------------------
# 1. data.path that is empty, binary or too short for the splits: a config error before any work.


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "is not UTF-8 text"),
        (b"hello world\n", "shorter than one window of data.seq_len + 1"),
    ],
    ids=["empty", "binary", "too-short"],
)
def test_text_corpus_that_is_empty_binary_or_short_is_one_line(work, content, expected):
    (work / "corpus").write_bytes(content)
    proc = titans(*train_args(work, "data.dataset=text", f"data.path={work / 'corpus'}"), cwd=work)
    one_line_error(proc, "data.path", expected)
    assert proc.returncode == 2 and not (work / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 2. training.out_dir naming a file, or a directory that cannot be created.


def test_out_dir_that_is_a_file_is_one_line(work):
    (work / "afile").write_text("")
    proc = titans("train", "--config", "tiny.yaml", f"training.out_dir={work / 'afile'}", cwd=work)
    one_line_error(proc, "training.out_dir", "is a file, not a directory", "set training.out_dir")
    assert (work / "afile").is_file()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no directory can be created")
def test_out_dir_that_cannot_be_created_is_one_line(work):
    proc = titans("train", "--config", "tiny.yaml", "training.out_dir=/proc/titans-no-such-dir", cwd=work)
    one_line_error(proc, "training.out_dir", "cannot create", "set training.out_dir to a writable directory")


# ---------------------------------------------------------------------------------------------------------------------
# 3. A file that is not a checkpoint, or a truncated one: no torch text, no advice to load with weights_only=False.


def test_eval_of_a_yaml_file_says_it_is_not_a_checkpoint(work):
    proc = titans("eval", "tiny.yaml", cwd=work)
    line = one_line_error(proc, "tiny.yaml is not a titans checkpoint", "pass a run directory or a ckpt_*.pt file")
    assert "weights_only" not in line


def test_eval_of_a_truncated_checkpoint_is_one_line(work, trained):
    truncated = work / "ckpt_00000002.pt"
    truncated.write_bytes((trained / "ckpt_00000002.pt").read_bytes()[:2000])
    line = one_line_error(titans("eval", str(truncated), cwd=work), "unreadable, truncated or corrupt", "older")
    assert "weights_only" not in line


# ---------------------------------------------------------------------------------------------------------------------
# 4. A missing checkpoint path names what was passed, not a --resume flag the user never gave.


@pytest.mark.parametrize("command", ["eval", "long-eval", "generate", "memory-check"])
def test_missing_checkpoint_names_the_path_not_resume(work, command):
    extra = ["--prompt", "1 2"] if command == "generate" else []
    proc = titans(command, "runs/absent", *extra, cwd=work)
    line = one_line_error(proc, "runs/absent: no such file or directory", "pass a ckpt_*.pt file or a run directory")
    assert "--resume" not in line


def test_missing_resume_path_still_names_resume(work):
    one_line_error(titans(*train_args(work, "--resume", "runs/absent"), cwd=work), "--resume runs/absent")


# ---------------------------------------------------------------------------------------------------------------------
# 5. Numeric flags are checked by argparse: one line naming the flag, exit code 2, before any checkpoint is read.


def test_negative_temperature_is_one_argparse_line(work):
    proc = titans("generate", "runs/absent", "--prompt", "1 2", "--temperature", "-1", cwd=work)
    assert proc.returncode == 2
    one_line_error(proc, "titans generate: error: argument --temperature", "must be a finite number >= 0")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["generate", "x", "--prompt", "1", "--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 0"),
        (["generate", "x", "--prompt", "1", "--temperature", "nan"], "argument --temperature: must be a finite"),
        (["generate", "x", "--prompt", "1", "--top-k", "0"], "argument --top-k: must be >= 1"),
        (["generate", "x", "--prompt", "1", "--top-k", "-3"], "argument --top-k: must be >= 1"),
        (["long-eval", "x", "--lengths", "2y"], "argument --lengths: expected comma-separated lengths"),
        (["long-eval", "x", "--lengths", "0x"], "argument --lengths: every length must be > 0"),
        (["long-eval", "x", "--samples", "0"], "argument --samples: must be >= 1"),
        (["long-eval", "x", "--batch-size", "-1"], "argument --batch-size: must be >= 1"),
        (["long-eval", "x", "--segment-len", "0"], "argument --segment-len: must be >= 1"),
        (["long-eval", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
        (["long-eval", "x", "--threads", "two"], "argument --threads: expected an integer >= 1"),
        (["long-eval", "x", "--max-bytes", "0"], "argument --max-bytes: must be >= 1"),
        (["compare", "--jobs", "0"], "argument --jobs: must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_by_argparse_in_one_line(args, expected, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and f"`titans {args[0]} --help`" in err


# ---------------------------------------------------------------------------------------------------------------------
# 6. An MQAR sweep past the trained vocabulary fails before any evaluation.


def test_mqar_lengths_beyond_the_vocabulary_are_one_line(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    overrides = ["data.dataset=mqar", "data.seq_len=64", "data.vocab_size=100"]
    train(load_config(tmp_path / "tiny.yaml", [*overrides, f"training.out_dir={tmp_path}", "training.run_name=mq"]))
    proc = titans("long-eval", str(tmp_path / "mq"), "--lengths", "1x,2x", "--samples", "2", cwd=tmp_path)
    one_line_error(proc, "length 128", "data.vocab_size=100", "lengths below 100", "data.vocab_size > 128")


# ---------------------------------------------------------------------------------------------------------------------
# 7. A size no memory here can hold is refused before the run directory exists.


def test_impossible_sequence_length_is_refused_up_front(work):
    proc = titans(*train_args(work, "data.seq_len=100000000"), cwd=work)
    one_line_error(proc, "GB", "data.seq_len", "data.num_samples", "training.batch_size", "available")
    assert not (work / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 8. An option that is really a config key: the hint shows the dotted override.


def test_option_style_config_key_gets_the_dotted_override_hint(work):
    proc = titans("train", "--config", "tiny.yaml", "--max-steps", "5", cwd=work)
    one_line_error(proc, "unrecognized arguments: --max-steps", "training.max_steps=5", "`titans train --help`")
    assert proc.returncode == 2 and not (work / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 9. Resuming past a corrupt newest checkpoint: named once, renamed aside (kept), and the run goes on.


def test_resume_sets_a_corrupt_newest_checkpoint_aside_with_a_warning(work, trained):
    run = work / "run"
    shutil.copytree(trained, run)
    newest = run / "ckpt_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # cut short, as by a full disk
    proc = titans("train", "--resume", str(run), "training.max_steps=3", "training.progress=false", cwd=work)
    assert proc.returncode == 0, proc.stderr
    single_line(proc.stderr, "warning", str(newest), "renamed it to ckpt_00000002.pt.corrupt", "ckpt_00000001.pt")
    corrupt = run / "ckpt_00000002.pt.corrupt"
    assert corrupt.is_file() and corrupt.stat().st_size == 2000
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    # the moved file is no checkpoint to the next resume; the good ones are the continued run's
    assert [step for step, _ in list_checkpoints(run)] == [3, 2, 1]
