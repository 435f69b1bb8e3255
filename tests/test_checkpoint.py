"""Checkpoints: round trip with RNG states, atomic save under a crash or SIGKILL, corrupt files skipped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from titans.checkpoint import (
    CHECKPOINT_PATTERN as CHECKPOINT_NAME,
)
from titans.checkpoint import (
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_saves,
    resolve_resume_path,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)


def make_state(step: int, weight: torch.Tensor | None = None) -> dict:
    return {
        "model": {"w": torch.full((3,), float(step)) if weight is None else weight},
        "optimizer": {},
        "scheduler": {},
        "step": step,
        "epoch": 0,
        "config": {"training": {"betas": [0.9, 0.95]}},
        "rng": rng_state(),
    }


def test_round_trip_restores_weights_and_every_random_stream(tmp_path):
    data_generator = torch.Generator().manual_seed(7)
    torch.rand(3, generator=data_generator)
    state = make_state(5)
    state["rng"] = rng_state(data_generator)
    path = save_checkpoint(state, checkpoint_path(tmp_path, 5))

    def draws():
        return (
            torch.rand(4).tolist(),
            random.random(),
            np.random.rand(2).tolist(),
            torch.rand(4, generator=data_generator).tolist(),
        )

    expected = draws()
    loaded = load_checkpoint(path)
    restore_rng_state(loaded["rng"], data_generator)
    assert draws() == expected
    assert loaded["step"] == 5 and loaded["config"] == state["config"]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert path.name == "ckpt_00000005.pt"


def test_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(make_state(1), path)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(make_state(2), path)
    monkeypatch.undo()

    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


SLOW_WRITER = textwrap.dedent(
    """
    import sys, torch
    from titans.checkpoint import checkpoint_path, rng_state, save_checkpoint

    def state(step, weight):
        return {"model": {"w": weight}, "optimizer": {}, "scheduler": {}, "step": step, "epoch": 0,
                "config": {}, "rng": rng_state()}

    run_dir = sys.argv[1]
    save_checkpoint(state(1, torch.ones(3)), checkpoint_path(run_dir, 1))
    print("saved", flush=True)
    big = torch.zeros(64 * 2**20 // 4)  # 64 MiB: the write takes long enough to be killed in the middle
    while True:
        save_checkpoint(state(1, big), checkpoint_path(run_dir, 1))  # overwrite the good one...
        save_checkpoint(state(2, big), checkpoint_path(run_dir, 2))  # ...and write a newer one
    """
)


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "saved", writer.stderr.read()
        # Wait until a temporary file exists, i.e. a save is in progress, then kill without warning.
        deadline = time.time() + 30
        while not any(".tmp-" in p.name for p in tmp_path.iterdir()):
            assert time.time() < deadline, "the writer never started its second save"
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()

    assert writer.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, every file under a checkpoint name is complete.
    for step, path in list_checkpoints(tmp_path):
        assert load_checkpoint(path)["step"] == step
    assert load_checkpoint(checkpoint_path(tmp_path, 1))["step"] == 1
    assert find_latest_checkpoint(tmp_path) is not None
    # The half-written temporary file is litter that the next run in this directory removes.
    partial = remove_partial_saves(tmp_path)
    assert len(partial) == 1 and ".tmp-" in partial[0].name
    assert all(CHECKPOINT_NAME.match(p.name) for p in tmp_path.iterdir())


def test_corrupt_newest_checkpoints_are_skipped(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(make_state(step), checkpoint_path(tmp_path, step))
    newest = checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(newest)
    assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)
    assert resolve_resume_path(tmp_path) == checkpoint_path(tmp_path, 2)

    checkpoint_path(tmp_path, 2).write_bytes(b"not a checkpoint at all")
    assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)

    torch.save({"model": {}}, checkpoint_path(tmp_path, 1))  # loadable, but not a titans checkpoint
    with pytest.raises(ValueError, match="not a titans checkpoint"):
        load_checkpoint(checkpoint_path(tmp_path, 1))
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        resolve_resume_path(tmp_path)


def test_prune_keeps_the_newest(tmp_path):
    for step in (3, 10, 7, 1):
        save_checkpoint(make_state(step), checkpoint_path(tmp_path, step))
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ckpt_00000001.pt", "ckpt_00000003.pt"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10, 7]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(tmp_path, keep=0)


def test_bad_arguments_fail_early_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="missing keys"):
        save_checkpoint({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve_resume_path(tmp_path / "absent")
    with pytest.raises(ValueError, match="step must be >= 0"):
        checkpoint_path(tmp_path, -1)
