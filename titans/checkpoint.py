"""Checkpoints: atomic save, validated load, and finding the newest good checkpoint of a run.

A checkpoint is one `torch.save` file `<run_dir>/ckpt_<step>.pt` holding a plain dict (model, optimizer, scheduler,
step, epoch, resolved config, RNG states, data position). Saving writes a temporary file in the same directory,
flushes and fsyncs it, then `os.replace`s it into place, so a crash or SIGKILL mid-save leaves either the old set
of checkpoints or the new one, never a half-written file under a checkpoint name. There is no `latest` pointer
file (a pointer can go stale in the instant between two renames); `find_latest_checkpoint` instead picks the
highest step that loads and validates, skipping corrupt files.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
# Keys every checkpoint must carry to resume a run; a file without them is treated as corrupt.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "config", "rng")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The file name for the checkpoint taken after optimizer step `step` (zero-padded so names sort by step)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(run_dir) / f"ckpt_{step:08d}.pt"


def rng_state(data_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random number generator a training run draws from, in a form `torch.load(weights_only=True)` accepts.

    numpy's state array is stored as a tensor because the safe unpickler refuses numpy arrays.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "data": data_generator.get_state() if data_generator is not None else None,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], data_generator: torch.Generator | None = None) -> None:
    """Inverse of `rng_state`: puts every generator back where the checkpoint left it."""
    torch.set_rng_state(state["torch"])
    # random.setstate needs the inner state as a tuple; a round trip through torch.load keeps it one.
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    if data_generator is not None:
        if state["data"] is None:
            raise ValueError("the checkpoint has no data-generator state to restore; it was saved without one")
        data_generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `state` to `path` atomically and durably; returns the path.

    The bytes go to `<path>.tmp-<pid>` in the same directory (so the final rename never crosses a file system),
    are fsynced, and only then renamed over `path`. The directory is fsynced too, so the rename itself survives
    a power cut on POSIX systems.
    """
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing keys {missing}; a resumable checkpoint needs {REQUIRED_KEYS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        # Only reached with tmp still present when torch.save or fsync raised; don't leave litter behind.
        if tmp.exists():
            tmp.unlink()
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    # Not every platform lets a directory be opened for fsync (Windows); durability there is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint written by `save_checkpoint`.

    Uses the safe unpickler (`weights_only=True`): a checkpoint holds only tensors and plain Python values.
    Raises FileNotFoundError for a missing file and ValueError for a file that is truncated, corrupt or not a
    titans checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a ckpt_*.pt file or a run directory that holds one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise ValueError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a titans checkpoint: expected keys {REQUIRED_KEYS}, found {found}")
    return state


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every file named like a checkpoint in `run_dir`, newest step first (contents unchecked)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The highest-step checkpoint in `run_dir` that loads and validates, or None if there is none.

    Corrupt or truncated files (a disk filled up, a copy was cut short) are skipped, so a run falls back to the
    previous good checkpoint instead of failing to resume.
    """
    for _, path in list_checkpoints(run_dir):
        try:
            load_checkpoint(path)
        except ValueError:
            continue
        return path
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints of `run_dir`; returns the deleted paths.

    Keeping more than one means a corrupt newest file still leaves something to resume from.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint is never deleted), got {keep}")
    removed = []
    for _, path in list_checkpoints(run_dir)[keep:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_partial_saves(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the `ckpt_*.pt.tmp-<pid>` files a killed save left behind in `run_dir`; returns their paths.

    Call it only while no other process is saving into `run_dir` (a training run owns its directory).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    partial = [p for p in run_dir.glob("ckpt_*.pt.tmp-*") if p.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


def resolve_resume_path(resume: str | os.PathLike) -> Path:
    """A checkpoint file from `--resume`'s argument: a ckpt file as is, or the newest valid one in a run directory."""
    resume = Path(resume)
    if resume.is_file():
        return resume
    if resume.is_dir():
        latest = find_latest_checkpoint(resume)
        if latest is None:
            raise FileNotFoundError(f"no valid checkpoint (ckpt_*.pt) in {resume}; nothing to resume from")
        return latest
    raise FileNotFoundError(f"--resume {resume}: no such file or directory; pass a ckpt_*.pt file or a run directory")
