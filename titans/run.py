"""A run on disk: its directory and the checkpoint it continues from, config.yaml, the metrics log, checkpoints of
the training state, and loading a trained model back.

Everything a run writes lives in `<training.out_dir>/<training.run_name>/`: config.yaml (resolved), metrics.jsonl
(one record per step and per evaluation), ckpt_<step>.pt (the newest KEEP_CHECKPOINTS), loss.png and <metric>.png,
and tensorboard/ with training.tensorboard. Under torchrun rank 0 alone writes; every rank keeps the same records.

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, the current epoch's shuffle order and every
RNG state, so training from a checkpoint yields the same losses, bit for bit, as the uninterrupted run (same device
and thread count). Records written after the checkpoint belong to the lost future and are rewound.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from titans.checkpoint import (
    CheckpointError,
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
    set_aside_corrupt,
)
from titans.config import ConfigError, RunConfig, config_to_dict, load_config
from titans.distributed import barrier, broadcast_object, full_state_dicts, load_full_state_dicts
from titans.models import TitansLM, build_model
from titans.tasks import Task, make_task

if TYPE_CHECKING:
    from titans.data import TrainData

KEEP_CHECKPOINTS = 3  # older ones are pruned; more than one survives a corrupt newest file


# ---------------------------------------------------------------------------------------------------------------------
# The run directory, and the checkpoint `--resume` continues from: resolved once, here.


def default_run_name(cfg: RunConfig) -> str:
    """`<variant>-<dataset>-<yyyymmdd-HHMMSS>`, the run directory name when training.run_name is null."""
    return f"{cfg.model.variant}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_resume_dir(cfg: RunConfig) -> Path:
    """The run directory `--resume` (no path) continues: out_dir/run_name, or with run_name null the newest
    `<variant>-<dataset>-*` run under out_dir that has a valid checkpoint."""
    out_dir = Path(cfg.training.out_dir)
    if cfg.training.run_name is not None:
        return out_dir / cfg.training.run_name
    prefix = f"{cfg.model.variant}-{cfg.data.dataset}-"
    candidates = sorted(
        (d for d in out_dir.glob(prefix + "*") if d.is_dir() and find_latest_checkpoint(d) is not None),
        key=lambda d: d.name,
    )
    if not candidates:
        raise FileNotFoundError(
            f"--resume: no run directory {out_dir / (prefix + '*')} with a checkpoint; pass the run directory or a "
            "ckpt_*.pt path, or set training.run_name"
        )
    return candidates[-1]


@dataclass
class RunDir:
    """Where a run writes (`path`) and the checkpoint it continues from (`resume_from`, None for a fresh start)."""

    path: Path
    resume_from: Path | None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"


def open_run_dir(cfg: RunConfig, resume: str | os.PathLike | bool | None, is_main: bool) -> RunDir:
    """Resolve `resume` and the run directory, and set cfg.training.run_name to its name.

    resume: None/False = start fresh (old checkpoints and metrics in the run directory are removed);
        True = continue from the newest valid checkpoint of this config's own run (`find_resume_dir`);
        a path = continue from that ckpt_*.pt file, or the newest valid one in that run directory.
    A resumed run keeps writing next to its checkpoint, wherever the config's out_dir now points.
    """
    t = cfg.training
    resume_from = None
    if resume is True:
        resume_from = resolve_resume_path(find_resume_dir(cfg))
    elif resume:
        resume_from = resolve_resume_path(resume)
    if resume_from is not None:
        path = resume_from.parent
        t.run_name = path.name
    else:
        # Rank 0's name: the default one holds the time, which may tick between the ranks' clocks.
        t.run_name = broadcast_object(t.run_name or default_run_name(cfg))
        path = Path(t.out_dir) / t.run_name
    run = RunDir(path, resume_from)
    if is_main:
        _make_run_dir(path, t.out_dir)
        remove_partial_saves(path)
    if resume_from is not None and is_main:
        # The newer checkpoints that resolving skipped: said once, and moved where no later resume looks.
        for old, moved in set_aside_corrupt(resume_from):
            print(
                f"titans: warning: {old} does not load (truncated, corrupt or not a checkpoint); renamed it to "
                f"{moved.name} and resumed from {resume_from.name}",
                file=sys.stderr,
            )
    if resume_from is None and is_main:
        stale = list_checkpoints(path)
        if stale or run.metrics_path.exists():
            print(f"starting fresh in {path}: removing {len(stale)} old checkpoint(s) and metrics (use --resume)")
        for _, old in stale:
            old.unlink()
        run.metrics_path.unlink(missing_ok=True)
    return run


def _make_run_dir(path: Path, out_dir: str) -> None:
    """Create the run directory, or raise ConfigError naming training.out_dir when it cannot be made or written."""
    fix = "set training.out_dir to a writable directory (it is created if missing)"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        files = [p for p in (path, *path.parents) if p.exists() and not p.is_dir()]
        why = f"{files[0]} is a file, not a directory" if files else f"cannot create {path} ({error.strerror})"
        raise ConfigError(f"training.out_dir={out_dir!r}: {why}; {fix}") from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"training.out_dir={out_dir!r}: the run directory {path} is not writable; {fix}")


# ---------------------------------------------------------------------------------------------------------------------
# The metrics log: metrics.jsonl, TensorBoard and the evaluation lines, all fed by `MetricsLog.log`.


# Fields of a metrics record that measure time, so differ between runs; every other field is deterministic.
WALL_CLOCK_FIELDS = frozenset({"step_s"})


def read_metrics(path: str | os.PathLike, wall_clock: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order; a line cut short by a crash is skipped.

    wall_clock=False drops WALL_CLOCK_FIELDS: what is left is what a resumed run reproduces bit for bit.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A line cut short by a crash mid-write; everything after the checkpoint is rewritten anyway.
            continue
    if not wall_clock:
        records = [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in records]
    return records


def format_eval(epoch: int, step: int, train_loss: float, metrics: dict[str, float], metric: str) -> str:
    """The seed's line, e.g. "Epoch  10: Train Loss 1.8234, Test Loss 1.7456, copy_accuracy: 0.3750", plus the step.

    epoch: the record's 0-based epoch index; the line counts epochs from 1, as the result's `epochs` does (the end of
    the first epoch is "Epoch 1" there and epochs = 1.0 in the JSON)."""
    return (
        f"Epoch {epoch + 1:3d} (step {step:6d}): Train Loss {train_loss:.4f}, Test Loss {metrics['test_loss']:.4f}, "
        f"{metric}: {metrics[metric]:.4f}"
    )


class MetricsLog:
    """The records of a run, in step order: kept in memory on every rank, written to metrics.jsonl by rank 0, to
    TensorBoard (`<kind>/<field>` for every number) with training.tensorboard, and each evaluation printed as the
    seed's line. A metric added to a record reaches all of them.

    A resumed run starts from the records up to its checkpoint's step (`rewind`), so the file never holds a step
    twice and the train loss shown at the next evaluation still averages every step since the previous one.
    """

    def __init__(self, run: RunDir, metric: str, is_main: bool, tensorboard: bool) -> None:
        self.path, self.metric, self.is_main = run.metrics_path, metric, is_main
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if tensorboard and is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))
        self._file: Any = None

    def rewind(self, step: int) -> None:
        """Keep the records up to `step` (a resumed checkpoint's); rank 0 rewrites the file to match."""
        self.records = [r for r in read_metrics(self.path) if r["step"] <= step]
        # Every rank has read the old file before rank 0 rewrites it.
        barrier()
        if self.is_main:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def __enter__(self) -> MetricsLog:
        # Only rank 0 writes metrics.jsonl; the other ranks keep the same records in memory.
        self._file = open(self.path if self.is_main else os.devnull, "a")  # noqa: SIM115 (closed in __exit__)
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"kind": "train" | "eval", "step", "epoch", ...numbers}) everywhere it goes."""
        self._file.write(json.dumps(record) + "\n")
        self.records.append(record)
        if record["kind"] == "eval":
            self._file.flush()
            if self.is_main:
                tqdm.write(format_eval(record["epoch"], record["step"], record["train_loss"], record, self.metric))
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("kind", "step", "epoch") and isinstance(value, int | float):
                    self.writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def flush(self) -> None:
        self._file.flush()

    @property
    def last_eval(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r["kind"] == "eval"), None)

    def train_loss_since_eval(self) -> float:
        """Mean loss of the applied steps since the last evaluation (NaN if none): the train loss an evaluation
        line shows."""
        losses = []
        for record in reversed(self.records):  # back to the last evaluation only: a long run has many records
            if record["kind"] == "eval":
                break
            if record["kind"] == "train" and not record.get("skipped"):
                losses.append(record["loss"])
        losses.reverse()  # summed in step order, as always
        return sum(losses) / len(losses) if losses else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints of the training state (atomic files: titans/checkpoint.py).


class TrainingCheckpoints:
    """Saves and restores everything a run needs to continue bit for bit: model, optimizer, schedule, step, the
    data's position and every RNG. The file format is titans/checkpoint.py's plain dict."""

    def __init__(
        self,
        run: RunDir,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: TrainData,
        is_main: bool,
    ) -> None:
        self.run, self.cfg, self.model, self.optimizer, self.scheduler = run, cfg, model, optimizer, scheduler
        self.data, self.is_main = data, is_main
        # The newest checkpoint of this run: where a resumed run started, until it saves.
        self.latest: Path | None = run.resume_from

    def save(self, step: int, epoch: int, skipped_steps: int) -> Path:
        """Write ckpt_<step>.pt and prune old ones. Every rank calls this (gathering is collective under FSDP); rank 0
        alone writes the file."""
        model_state, optimizer_state = full_state_dicts(self.model, self.optimizer)
        path = checkpoint_path(self.run.path, step)
        if self.is_main:
            state = {
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "skipped_steps": skipped_steps,
                "epoch_order": self.data.epoch_order,
                "config": config_to_dict(self.cfg),
                "rng": rng_state(self.data.generator),
            }
            save_checkpoint(state, path)
            prune_checkpoints(self.run.path, KEEP_CHECKPOINTS)
        self.latest = path
        return path

    def restore(self) -> tuple[int, int]:
        """Load run.resume_from into the model, optimizer, schedule, data and RNGs; returns (step, skipped_steps)."""
        path = self.run.resume_from
        assert path is not None, "restore() needs a run opened with resume"
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies weights to the model's device.
        state = load_checkpoint(path, map_location="cpu")
        try:
            # Full state dicts: a checkpoint from any world size (or FSDP) loads into any other.
            load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        except RuntimeError as error:
            # torch lists every mismatched tensor on its own line; the first names the problem.
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise CheckpointError(
                f"checkpoint {path} does not fit the configured model ({detail}); resume with the run's own "
                f"config ({self.run.path / 'config.yaml'}) or start a fresh run"
            ) from error
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.epoch_order = state["epoch_order"]
        restore_rng_state(state["rng"], self.data.generator)
        return state["step"], state["skipped_steps"]


# ---------------------------------------------------------------------------------------------------------------------
# A trained model back from its checkpoint, for `titans eval`, `generate`, `long-eval` and `memory-check`.


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu' / 'cuda' / 'cuda:1' as given (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device={name!r} but CUDA is not available here; use training.device=cpu or auto")
    return device


def config_from_checkpoint(state: dict[str, Any], overrides: Sequence[str]) -> RunConfig:
    """The run's resolved config stored in a checkpoint, with `key=value` overrides applied and validated."""
    stored = copy.deepcopy(state["config"])
    memory = stored.get("model", {}).get("memory")
    if isinstance(memory, dict):
        # keys written before they existed (or before null meant the variant's default) keep the value the run trained
        # with: every inner gradient at the chunk start (Eq. 16) and momentum on, which null no longer means for an
        # LMM (titans.config.model.memory_defaults)
        memory.setdefault("exact_last_layer", False)
        memory.setdefault("momentum", True)
    model = stored.get("model")
    if isinstance(model, dict):
        model.setdefault("mac_memory_input", "attention")  # MAC wrote y alone before the key existed
    # load_config is the one validating path from YAML to RunConfig, so the stored dict goes through a file.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(stored, sort_keys=False))
        return load_config(path, overrides)


def load_trained(checkpoint: str, overrides: Sequence[str]) -> tuple[RunConfig, Task, TitansLM, Path]:
    """(cfg, task, model in eval mode on cfg.training.device, checkpoint path) from a ckpt file or run directory.

    overrides may change the task (e.g. data.seq_len for longer inputs) but not the model's parameter shapes.
    """
    path = resolve_resume_path(checkpoint, flag=None)
    state = load_checkpoint(path)
    cfg = config_from_checkpoint(state, overrides)
    task = make_task(cfg.data)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = task.vocab_size
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(
            f"the overrides {list(overrides)} give a model whose parameters do not match {path} ({first_line}); "
            "override only data.* and training.* keys when evaluating a checkpoint"
        ) from error
    model.to(resolve_device(cfg.training.device)).eval()
    return cfg, task, model, path
