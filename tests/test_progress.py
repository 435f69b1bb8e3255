"""Progress is never silent: with output redirected, training prints heartbeat lines (step, loss, tokens/s, ETA)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from titans.progress import Progress, format_duration

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = re.compile(
    r"^step (\d+)/(\d+) \(epoch 1\): loss \d+\.\d+, lr \S+, [\d,]+ tokens/s, \d+\.\d+ s/step, "
    r"ETA (\S+|from the next line)$"
)
TINY = [
    "training.max_steps=6",
    "training.eval_every=3",
    "training.warmup_steps=1",
    "training.batch_size=4",
    "data.num_samples=40",
    "model.n_layers=1",
    "training.threads=1",
]


def train_to_file(tmp_path: Path, *overrides: str) -> list[str]:
    """`titans train` with stdout and stderr redirected to a file, as under nohup or CI; the file's lines."""
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "titans", "train", "--config", str(ROOT / "config.yaml"), *TINY, *overrides],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=300,
        )
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, "\n".join(lines)
    return lines


def test_training_to_a_file_prints_a_heartbeat_every_interval(tmp_path: Path) -> None:
    lines = train_to_file(tmp_path, "training.heartbeat_s=0.000001", "training.run_name=beat")
    beats = [HEARTBEAT.match(line) for line in lines]
    steps = [int(m.group(1)) for m in beats if m]
    # An interval shorter than a step: one line per step, in order, each with the total.
    assert steps == [1, 2, 3, 4, 5, 6], lines
    assert all(int(m.group(2)) == 6 for m in beats if m)
    assert not any("\r" in line for line in lines)  # no bar redrawn into the file
    assert json.loads(lines[-1])["steps"] == 6


def test_a_long_interval_still_says_the_first_step(tmp_path: Path) -> None:
    lines = train_to_file(tmp_path, "training.heartbeat_s=3600", "training.run_name=first")
    steps = [int(m.group(1)) for m in map(HEARTBEAT.match, lines) if m]
    assert steps == [1], lines  # the first step is announced at once, then nothing for an hour


def test_heartbeat_zero_or_progress_off_prints_none(tmp_path: Path) -> None:
    for name, setting in (("zero", "training.heartbeat_s=0"), ("no-progress", "training.progress=false")):
        lines = train_to_file(tmp_path, setting, f"training.run_name={name}")
        assert not any(HEARTBEAT.match(line) for line in lines), lines


def test_heartbeat_line_reports_rate_and_time_left(monkeypatch, capsys) -> None:
    clock = iter([100.0, 110.0, 110.0])  # start, then two updates 10 s in
    monkeypatch.setattr("titans.progress.time.monotonic", lambda: next(clock))
    progress = Progress(total=40, unit="step", every_s=5.0, tokens_per_unit=512)
    progress.heartbeat = True  # as with output redirected (pytest captures it, but not as a tty)
    progress.update(4, loss=1.5)
    out = capsys.readouterr().out.strip()
    # 4 steps in 10 s: 0.4 step/s, 204.8 tokens/s, 36 steps left -> 90 s.
    assert out == "step 4/40: loss 1.5000, 205 tokens/s, 2.50 s/step, ETA 1m30s"
    progress.update(1)  # 0 s after the last line, below every_s: silent
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600 * 2 + 5 * 60, "2h05m")])
def test_durations_read_at_a_glance(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_signal_during_training_announces_the_wait_then_stops_with_a_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "titans", "train", "--config", str(ROOT / "config.yaml"), *TINY]
    command += ["training.max_steps=100000", "training.heartbeat_s=0.000001", "training.run_name=stop"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.time() + 120
        while not re.search(r"^step 2/", log.read_text(), flags=re.M):  # two steps done: a step time is known
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # Said at once, on stderr: how long the current step still runs, and that a second signal stops without waiting.
    assert re.search(
        r"SIGTERM received: stopping after the current step \(about \d+ s left; the last step took", err
    ), err + log.read_text()
    result = json.loads(log.read_text().strip().splitlines()[-1])
    assert result["interrupted"] is True and (tmp_path / result["checkpoint"]).is_file()


def test_the_rate_leaves_out_the_first_steps_one_time_costs(monkeypatch, capsys) -> None:
    clock = iter([0.0, 10.0, 11.0, 12.0])  # start; the first step takes 10 s (a build, a compile), then 1 s each
    monkeypatch.setattr("titans.progress.time.monotonic", lambda: next(clock))
    progress = Progress(total=10, unit="step", every_s=1.0)
    progress.heartbeat = True
    for _ in range(3):
        progress.update()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "step 1/10: 10.00 s/step, ETA from the next line"  # only the first step is known: no forecast
    assert lines[-1] == "step 3/10: 1.00 s/step, ETA 7s"  # measured from the end of the first step


def test_work_that_is_usually_quick_speaks_only_once_it_is_slow(monkeypatch, capsys) -> None:
    # evaluate() uses this form: silent for a quick evaluation, a line once it has run every_s seconds (a busy machine).
    clock = iter([0.0, 5.0, 31.0])
    monkeypatch.setattr("titans.progress.time.monotonic", lambda: next(clock))
    progress = Progress(total=4, unit="batch", desc="evaluating", every_s=30.0, bar=False, announce_first=False)
    progress.heartbeat = True
    progress.update()
    assert capsys.readouterr().out == ""  # 5 s in: quiet
    progress.update()
    assert capsys.readouterr().out.startswith("evaluating batch 2/4: ")  # 31 s in: says where it is
