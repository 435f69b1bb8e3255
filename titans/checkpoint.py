"""Checkpoints: atomic save, validated load, and finding the newest good checkpoint of a run.

A checkpoint is one `torch.save` file `<run_dir>/ckpt_<step>.pt` holding a plain dict (model, optimizer, scheduler,
step, epoch, resolved config, RNG states, data position). Saving writes a temporary file in the same directory,
flushes and fsyncs it, then `os.replace`s it into place, so a crash or SIGKILL mid-save leaves either the old set
of checkpoints or the new one, never a half-written file under a checkpoint name. There is no `latest` pointer
file (a pointer can go stale in the instant between two renames); `find_latest_checkpoint` instead picks the
highest step that loads and validates, skipping corrupt files (a resumed run renames them `<name>.corrupt`:
`set_aside_corrupt`). A file that is not a checkpoint, or a damaged one, raises `CheckpointError` with a one-line
message.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
# Keys every checkpoint must carry to resume a run; a file without them is treated as corrupt.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "config", "rng")
# A checkpoint that does not load is renamed `<name>.corrupt` on resume (CHECKPOINT_PATTERN no longer matches it).
CORRUPT_SUFFIX = ".corrupt"
NOT_A_CHECKPOINT = (
    "is not a titans checkpoint (ckpt_*.pt written by `titans train`); pass a run directory or a ckpt_*.pt file"
)


class CheckpointError(ValueError):
    """A file that is not a titans checkpoint, or one that is truncated or corrupt; the message is one line that names
    the file and what to pass instead (the CLI prints it without a traceback)."""


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
    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for a file that is truncated,
    corrupt or not a titans checkpoint; its message is one line and never passes on torch's advice to load the file
    with `weights_only=False`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a ckpt_*.pt file or a run directory that holds one")
    _check_format(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # The safe unpickler refused an object no titans checkpoint holds.
        raise CheckpointError(f"{path} {NOT_A_CHECKPOINT}") from error
    except Exception as error:  # torch raises RuntimeError, EOFError... for damaged files
        # torch's first sentence says what failed; the rest is advice about torch.save.
        reason = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is unreadable, truncated or corrupt ({reason}); pass its run directory (the newest "
            "checkpoint that loads is used) or an older ckpt_*.pt file"
        ) from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
        raise CheckpointError(f"{path} {NOT_A_CHECKPOINT} (it lacks the keys {missing}; found {found})")
    return state


def _check_format(path: Path) -> None:
    """Raise CheckpointError unless `path` starts like a `torch.save` zip file (the only format titans writes)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot read {path} ({error.strerror}); pass a readable ckpt_*.pt file") from error
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} {NOT_A_CHECKPOINT}")
    # An intact zip without torch's data.pkl is some other archive; a truncated one has no directory to read.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise CheckpointError(f"{path} {NOT_A_CHECKPOINT}")


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
    previous good checkpoint instead of failing to resume. Read-only: `set_aside_corrupt` moves skipped files away.
    """
    for _, path in list_checkpoints(run_dir):
        try:
            load_checkpoint(path)
        except (ValueError, OSError):  # OSError: gone since it was listed (another process set it aside)
            continue
        return path
    return None


def set_aside_corrupt(resume_from: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Rename every checkpoint in `resume_from`'s directory with a higher step than it that does not load to
    `<name>.corrupt`, so that no later resume picks it up again (nothing is deleted); returns (old path, new path)
    for each. Called by the process that resumes a run, which owns its directory.
    """
    resume_from = Path(resume_from)
    match = CHECKPOINT_PATTERN.match(resume_from.name)
    if match is None:  # not a file of a run directory: its neighbours are none of this run's business
        return []
    moved = []
    for step, path in list_checkpoints(resume_from.parent):
        if step <= int(match.group(1)):
            continue
        try:
            load_checkpoint(path)
        except ValueError:
            target = path.with_name(path.name + CORRUPT_SUFFIX)
            os.replace(path, target)
            moved.append((path, target))
    return moved


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


def resolve_resume_path(resume: str | os.PathLike, flag: str | None = "--resume") -> Path:
    """A checkpoint file from `--resume`'s argument: a ckpt file as is, or the newest valid one in a run directory.

    flag: the option the path came from, named in the errors; None for a command's positional CHECKPOINT argument
    (eval, generate, long-eval, memory-check).
    """
    resume = Path(resume)
    if resume.is_file():
        return resume
    if resume.is_dir():
        latest = find_latest_checkpoint(resume)
        if latest is None:
            fix = "nothing to resume from" if flag == "--resume" else "pass a run directory written by `titans train`"
            raise FileNotFoundError(f"no valid checkpoint (ckpt_*.pt) in {resume}; {fix}")
        return latest
    given = f"{flag} {resume}" if flag else str(resume)
    raise FileNotFoundError(f"{given}: no such file or directory; pass a ckpt_*.pt file or a run directory")
