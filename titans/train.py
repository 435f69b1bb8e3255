"""The training loop: `train(cfg)` reads top to bottom, nanoGPT style.

    python main.py --config config.yaml training.max_epochs=5          # the seed's usage
    python -m titans train --config config.yaml model.variant=MAG
    python -m titans train --config config.yaml --resume                # continue runs/<run_name>/ exactly
    torchrun --standalone --nproc_per_node=2 -m titans train --config config.yaml    # data-parallel, same results

Outline: device and threads -> task -> model (seeded) -> data (fixed set reshuffled per epoch, or fresh batches)
-> AdamW + warmup/cosine schedule -> resume -> loop (micro-batches, NaN/Inf guard, clip, step, eval, checkpoint)
-> final eval, plots, one result dict.

Everything a run writes lives in `<training.out_dir>/<training.run_name>/`: config.yaml (resolved), metrics.jsonl
(one record per step and per evaluation), ckpt_<step>.pt, loss.png and <metric>.png.

Exact resume: a checkpoint holds the model, optimizer, scheduler, step, the current epoch's shuffle order and every
RNG state, so training from a checkpoint yields the same losses, bit for bit, as the uninterrupted run (same device
and thread count). SIGINT/SIGTERM make the loop finish its current step, save a checkpoint and return.

Under torchrun every process runs this same loop (titans/distributed.py has the rank-aware pieces):
training.batch_size is the global micro-batch, split across the ranks; gradients are all-reduced once per optimizer
step; losses are reduced so every rank takes the same decisions (NaN guard, stop on a signal); rank 0 alone writes
files and evaluates (every rank under FSDP). Results match a single process on the whole batch up to float
summation order, and a checkpoint resumes under any world size.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

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
from titans.config import FLEX_ON_CPU_ERROR, ConfigError, RunConfig, config_to_dict, save_config
from titans.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    check_batch_divisible,
    distributed,
    full_state_dicts,
    gradient_sync,
    is_sharded,
    launch_world_size,
    load_full_state_dicts,
    print0,
    rank_rows,
    sample_rows,
    wrap_model,
)
from titans.evaluate import evaluate
from titans.long_eval import detach_state
from titans.models import build_model, num_parameters
from titans.plots import plot_run
from titans.system import cpu_compiler, loaded_allocator
from titans.tasks import make_task
from titans.tasks.base import IGNORE_INDEX, Batch, Task

KEEP_CHECKPOINTS = 3  # older ones are pruned; more than one survives a corrupt newest file


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/Inf and training.nan_policy is 'stop'."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu' / 'cuda' / 'cuda:1' as given (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device={name!r} but CUDA is not available here; use training.device=cpu or auto")
    return device


def make_datasets(cfg: RunConfig, task: Task) -> tuple[Batch, Batch]:
    """(train, test) examples: data.num_samples drawn once from a generator seeded with cfg.seed and split by
    `cfg.data.split_sizes()`, the first `test` of them held out (the seed's meaning of num_samples).

    A task over a real corpus (one with `iter_segments`, e.g. text) is tested on its held-out "valid" split instead:
    `test` rows of seq_len bytes from evenly spaced places, so no test window overlaps the training text. `titans
    eval` rebuilds the same split, so a checkpoint is always scored on examples it never trained on.
    """
    n_train, n_test = cfg.data.split_sizes()
    data = task.sample(cfg.data.num_samples, torch.Generator().manual_seed(cfg.seed))
    if hasattr(task, "iter_segments"):
        return data[n_test:], next(iter(task.iter_segments("valid", task.seq_len, n_test)))
    return data[n_test:], data[:n_test]


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


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay only on the weight matrices of nn.Linear layers.

    Everything else — embeddings, persistent tokens, norm gains, biases, gate and convolution parameters, the
    memory's initial weights M_0 — is not decayed: shrinking those toward zero is not a useful prior for them.
    """
    decayed = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup to 1, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _divergence_message(cfg: RunConfig, what: str, step: int, run_dir: Path) -> str:
    t = cfg.training
    saved = list_checkpoints(run_dir)
    last_good = f"last good checkpoint: {saved[0][1]} (continue with --resume)" if saved else "no checkpoint was saved"
    return (
        f"{what} is NaN/Inf at step {step}; the update was not applied. Knobs that help: lower "
        f"training.learning_rate (now {t.learning_rate}), set training.gradient_clip (now {t.gradient_clip}), raise "
        f"training.warmup_steps (now {t.warmup_steps}), use training.dtype=float32 (now {t.dtype}), lower "
        f"model.memory.max_lr (now {cfg.model.memory.max_lr}), set model.memory.inner_grad_clip (now "
        f"{cfg.model.memory.inner_grad_clip}), or set training.nan_policy=skip to skip such steps. "
        f"{last_good}"
    )


def _format_eval(epoch: int, step: int, train_loss: float, metrics: dict[str, float], metric: str) -> str:
    # The seed's line, e.g. "Epoch  10: Train Loss 1.8234, Test Loss 1.7456, copy_accuracy: 0.3750", plus the step.
    return (
        f"Epoch {epoch:3d} (step {step:6d}): Train Loss {train_loss:.4f}, Test Loss {metrics['test_loss']:.4f}, "
        f"{metric}: {metrics[metric]:.4f}"
    )


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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a run stops between steps with a checkpoint.

    A second signal of the same kind gets the default behaviour back (Ctrl-C twice still kills at once).
    Handlers can only be installed from the main thread; elsewhere (e.g. a worker thread) signals are left alone.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, resume: str | os.PathLike | bool | None = None) -> dict[str, Any]:
    """Train cfg.model on cfg.data's task with cfg.training; returns the run's results.

    resume: None/False = start fresh (old checkpoints and metrics in the run directory are removed);
        True = continue from the newest valid checkpoint in this run's own directory;
        a path = continue from that ckpt_*.pt file, or the newest valid one in that run directory.
    Returns {"variant", "task", <task.metric>, "test_loss", "train_loss", "chance", "params", "steps", "epochs",
        "skipped_steps", "interrupted", "wall_s", "device", "run_dir", "checkpoint"}.
    Raises TrainingDivergedError on a NaN/Inf loss or gradient when training.nan_policy == 'stop'.

    Launched by torchrun (WORLD_SIZE > 1), every process calls train() and gets the same result dict; the process
    group is created here and destroyed on the way out, errors and Ctrl-C included.
    """
    # Checked before joining the process group: a bad launch fails at once instead of waiting at the rendezvous.
    check_batch_divisible(cfg.training.batch_size, launch_world_size())
    with distributed(cfg.training.device) as dist_info:
        return _train(cfg, resume, dist_info)


def _train(cfg: RunConfig, resume: str | os.PathLike | bool | None, dist_info: DistInfo) -> dict[str, Any]:
    # ---- setup: a private copy of the config, device, threads, output directory
    start_time = time.time()
    cfg = copy.deepcopy(cfg)
    t = cfg.training
    device, is_main, world_size = dist_info.device, dist_info.is_main, dist_info.world_size
    if t.threads:
        torch.set_num_threads(t.threads)
    autocast_dtype = torch.bfloat16 if t.dtype == "bfloat16" else None
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    writer = None
    if t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            # A config problem in effect: the CLI reports ConfigError as one line, before any training starts.
            raise ConfigError(
                "training.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                "or set training.tensorboard=false"
            ) from error

    if t.compile and device.type == "cpu" and cpu_compiler() is None:
        raise ConfigError(
            "training.compile=true needs a C++ compiler for torch.compile's CPU kernels (g++ or clang++ on PATH, or "
            "$CXX); install one (e.g. apt install g++) or set training.compile=false"
        )

    if cfg.model.attention_impl == "flex" and device.type == "cpu":
        raise ConfigError(FLEX_ON_CPU_ERROR)

    resume_path = None
    if resume is True:
        resume_path = resolve_resume_path(find_resume_dir(cfg))
    elif resume:
        resume_path = resolve_resume_path(resume)
    # A resumed run keeps writing next to its checkpoint, wherever the config's out_dir now points.
    if resume_path is not None:
        run_dir = resume_path.parent
        t.run_name = run_dir.name
    else:
        # Rank 0's name: the default one holds the time, which may tick between the ranks' clocks.
        t.run_name = broadcast_object(t.run_name or default_run_name(cfg))
        run_dir = Path(t.out_dir) / t.run_name
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(run_dir)
    if resume_path is None and is_main:
        stale = list_checkpoints(run_dir)
        if stale or metrics_path.exists():
            print(f"starting fresh in {run_dir}: removing {len(stale)} old checkpoint(s) and metrics (use --resume)")
        for _, path in stale:
            path.unlink()
        metrics_path.unlink(missing_ok=True)

    # ---- task and model; the model's vocabulary comes from the task
    task = make_task(cfg.data)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = task.vocab_size
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrapping).
    torch.manual_seed(cfg.seed)
    module = build_model(cfg.model).to(device)
    n_params = num_parameters(module)
    if t.compile:
        # before wrapping: the compiled steps live inside the single-device model
        module.compile_blocks()
    # DDP or FSDP2 when launched with several processes; `module` stays the single-device model inside.
    model = wrap_model(module, t.parallel, dist_info)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    # ---- data: a fixed train/test split; training batches come from it reshuffled per epoch, or fresh
    train_set, test_set = make_datasets(cfg, task)
    if t.eval_samples:
        test_set = test_set[: t.eval_samples]
    examples_per_step = t.batch_size * t.grad_accum_steps
    steps_per_epoch = math.ceil(len(train_set) / examples_per_step)
    # Text with data.text_carry_state: step s trains on segment s (mod the epoch) of examples_per_step contiguous
    # rows of the train split, each micro-batch carrying its detached memory state to the next step (truncated BPTT).
    # Checkpoints hold no activations, so a resumed run restarts the carried state empty at its step.
    stream = cfg.data.dataset == "text" and cfg.data.text_carry_state
    carried: dict[int, Any] = {}
    if stream:
        steps_per_epoch = task.corpus.num_segments("train", task.seq_len, examples_per_step)
    total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * steps_per_epoch
    # A separate stream for the shuffles, so the data set itself never depends on it. It advances identically on every
    # rank: all ranks see one permutation and take their rows of it. Fresh samples are drawn per (step, global row).
    data_generator = torch.Generator().manual_seed(cfg.seed + 1)
    epoch_order = None

    # ---- optimizer: AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, t.weight_decay), lr=t.learning_rate, betas=tuple(t.betas), weight_decay=t.weight_decay
    )
    schedule = functools.partial(
        lr_multiplier, warmup_steps=t.warmup_steps, total_steps=total_steps, min_lr_ratio=t.min_lr_ratio
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # ---- resume: weights, optimizer, schedule, position in the data and every RNG
    step, skipped_steps = 0, 0
    records = []
    if resume_path is not None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict copies weights to the model's device.
        state = load_checkpoint(resume_path, map_location="cpu")
        try:
            # Full state dicts: a checkpoint from any world size (or FSDP) loads into any other.
            load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
        except RuntimeError as error:
            raise ValueError(
                f"checkpoint {resume_path} does not fit the configured model ({error}); resume with the run's own "
                f"config ({run_dir / 'config.yaml'}) or start a fresh run"
            ) from error
        scheduler.load_state_dict(state["scheduler"])
        step, skipped_steps, epoch_order = state["step"], state["skipped_steps"], state["epoch_order"]
        restore_rng_state(state["rng"], data_generator)
        # Records written after this checkpoint belong to the lost future; the resumed run rewrites them.
        records = [r for r in read_metrics(metrics_path) if r["step"] <= step]
        # Every rank has read the old file before rank 0 rewrites it.
        barrier()
        if is_main:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        print0(f"resumed from {resume_path} at step {step}")

    if t.tensorboard and is_main:
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def checkpoint(epoch: int) -> Path:
        # Gathering is collective under FSDP, so every rank calls this; rank 0 alone writes the file.
        model_state, optimizer_state = full_state_dicts(model, optimizer)
        path = checkpoint_path(run_dir, step)
        if not is_main:
            return path
        save_checkpoint(
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "skipped_steps": skipped_steps,
                "epoch_order": epoch_order,
                "config": config_to_dict(cfg),
                "rng": rng_state(data_generator),
            },
            path,
        )
        prune_checkpoints(run_dir, KEEP_CHECKPOINTS)
        return path

    def run_eval(epoch: int, train_loss: float) -> dict[str, Any]:
        # The whole test set on one rank (the unwrapped module, no collectives), so the numbers do not depend on the
        # world size; an FSDP forward needs every rank, so there each rank evaluates the whole set.
        metrics = None
        if is_main or is_sharded(model):
            metrics = evaluate(model if is_sharded(model) else module, task, test_set, t.batch_size, autocast_dtype)
        metrics = broadcast_object(metrics)
        record = {"kind": "eval", "step": step, "epoch": epoch, "train_loss": train_loss, **metrics}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        records.append(record)
        if is_main:
            tqdm.write(_format_eval(epoch, step, train_loss, metrics, task.metric))
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(f"eval/{name}", value, step)
        return record

    processes = f" x {world_size} processes ({t.parallel})" if world_size > 1 else ""
    print0(
        f"training {cfg.model.variant} on {task.name}: {n_params:,} parameters, device {device}{processes}, "
        f"{total_steps} steps ({steps_per_epoch} per epoch of {len(train_set)} examples), run dir {run_dir}"
    )
    show_bar = is_main and t.progress and sys.stdout.isatty() and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=step, disable=not show_bar, dynamic_ncols=True, unit="step")
    last_eval = next((r for r in reversed(records) if r["kind"] == "eval"), None)
    # The train loss printed at an evaluation averages the steps since the previous one, resumed runs included.
    window_losses = [
        r["loss"]
        for r in records
        if r["kind"] == "train" and not r.get("skipped") and (last_eval is None or r["step"] > last_eval["step"])
    ]
    interrupted, saved = None, resume_path
    # Agreed by all ranks once per step, so every rank stops after the same step when any of them is signalled.
    stop_requested = False

    # ---- the loop: one iteration is one optimizer step over grad_accum_steps micro-batches
    model.train()
    # Only rank 0 writes metrics.jsonl; the other ranks keep the same records in memory.
    with _StopFlag() as stop, open(metrics_path if is_main else os.devnull, "a") as metrics_file:
        while step < total_steps and not stop_requested:
            step_start = time.perf_counter()
            epoch, index_in_epoch = divmod(step, steps_per_epoch)
            # The step's global batch is rows [first, first + step_rows) of the epoch order (or fresh rows); this
            # rank trains on its contiguous 1/world_size of every micro-batch of it.
            first = index_in_epoch * examples_per_step
            if stream:
                if index_in_epoch == 0:
                    carried.clear()  # each epoch reads the rows from their first byte, with a fresh memory
                segment = task.corpus.segment("train", task.seq_len, examples_per_step, index_in_epoch)
                step_rows = examples_per_step
            elif cfg.data.fresh_samples:
                step_rows = examples_per_step
            else:
                if index_in_epoch == 0 or epoch_order is None:
                    epoch_order = torch.randperm(len(train_set), generator=data_generator)
                step_rows = min(examples_per_step, len(train_set) - first)
            micro_batches = []
            for rows in rank_rows(step_rows, t.batch_size, dist_info.rank, world_size):
                # A rank whose share of a short last micro-batch is empty still joins the all-reduce: it runs one
                # row with weight 0 (its scored-token count below).
                real = len(rows) > 0
                rows = rows if real else range(rows.start, rows.start + 1)
                if stream:
                    micro = segment[rows.start : rows.stop]
                elif cfg.data.fresh_samples:
                    micro = sample_rows(task, cfg.seed, step, rows)
                else:
                    micro = train_set[epoch_order[first + rows.start : first + rows.stop]]
                scored = int((micro.targets != IGNORE_INDEX).sum()) if real else 0
                micro_batches.append((micro, scored, rows.start))
            # The model's loss is a mean over a micro-batch's scored tokens; weighting each by its share of the whole
            # step's scored tokens (summed over ranks) makes the total the step's token mean, however unevenly the
            # tokens fall across micro-batches and ranks.
            local_tokens = float(sum(scored for _, scored, _ in micro_batches))
            step_tokens = all_reduce_sum(torch.tensor(local_tokens, device=device)).item()

            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for index, (micro, scored, row) in enumerate(micro_batches):
                micro = micro.to(device)
                # All-reduce the accumulated gradients only in the last micro-step's backward.
                with gradient_sync(model, enabled=index == len(micro_batches) - 1):
                    with autocast:
                        _, loss, new_state = model(micro.inputs, micro.targets, state=carried.get(row))
                    if stream:
                        carried[row] = detach_state(new_state)
                    share = loss * (scored / max(step_tokens, 1.0))
                    # DDP and FSDP average gradients over ranks; the shares are meant to be summed, hence * world_size.
                    (share * world_size).backward()
                step_loss += share.detach()
            # One reduction gives every rank the step's loss and whether any rank was signalled to stop.
            agreed = all_reduce_sum(torch.stack([step_loss, step_loss.new_tensor(stop.signal_name is not None)]))
            step_loss, stop_requested = agreed[0].item(), agreed[1].item() > 0
            # clip_grad_norm_ returns the pre-clip norm; with max_norm=inf it only measures.
            max_norm = t.gradient_clip if t.gradient_clip else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            # Under FSDP the norm is a replicated DTensor; full_tensor() makes it a plain one.
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()

            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            if not finite and t.nan_policy == "stop":
                bar.close()
                what = "the loss" if not math.isfinite(step_loss) else "the gradient norm"
                raise TrainingDivergedError(_divergence_message(cfg, what, step + 1, run_dir))
            lr = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
            else:
                skipped_steps += 1
                # Said once per skipped step: a run that skips every step should not look healthy in the log.
                what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                if is_main:
                    tqdm.write(
                        f"step {step + 1}: {what} is NaN/Inf, update skipped (training.nan_policy=skip, "
                        f"{skipped_steps} skipped so far); if it repeats, lower training.learning_rate or "
                        "model.memory.max_lr"
                    )
            # The schedule advances either way, so the learning rate stays a function of the step alone.
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()

            record = {
                "kind": "train",
                "step": step,
                "epoch": epoch,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                # wall seconds of this step (data, forward, backward, optimizer): throughput without a benchmark
                "step_s": round(time.perf_counter() - step_start, 4),
            }
            if not finite:
                record["skipped"] = True
            else:
                window_losses.append(step_loss)
            metrics_file.write(json.dumps(record) + "\n")
            records.append(record)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if writer is not None:
                writer.add_scalar("train/loss", step_loss, step)
                writer.add_scalar("train/lr", lr, step)

            end_of_epoch = index_in_epoch == steps_per_epoch - 1
            if (t.eval_every > 0 and step % t.eval_every == 0) or (t.eval_every == 0 and end_of_epoch):
                train_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
                last_eval = run_eval(epoch, train_loss)
                window_losses = []
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0:
                metrics_file.flush()
                saved = checkpoint(epoch)
        bar.close()

        final_epoch = max(0, step - 1) // steps_per_epoch
        # From the agreed flag, so that every rank makes the same collective calls (evaluation, checkpoint) below.
        interrupted = (stop.signal_name or "a signal to another process") if stop_requested else None
        if interrupted is None and (last_eval is None or last_eval["step"] != step):
            train_loss = sum(window_losses) / len(window_losses) if window_losses else float("nan")
            last_eval = run_eval(final_epoch, train_loss)
        metrics_file.flush()
        if saved is None or saved != checkpoint_path(run_dir, step):
            saved = checkpoint(final_epoch)
    if writer is not None:
        writer.close()
    # Plotted once at the end: rendering costs more than a tiny model's evaluation.
    if is_main:
        plot_run(records, run_dir, task.metric, task.chance)
    # No rank returns before rank 0 has written the final checkpoint and plots.
    barrier()
    if interrupted is not None:
        print0(f"{interrupted} received: stopped at step {step}, checkpoint {saved}; continue with --resume {run_dir}")

    result = {"variant": cfg.model.variant, "task": task.name}
    if last_eval is not None:
        result[task.metric] = last_eval[task.metric]
        result["test_loss"] = last_eval["test_loss"]
        result["train_loss"] = last_eval["train_loss"]
    result.update(
        {
            "chance": task.chance,
            "params": n_params,
            "steps": step,
            "epochs": step / steps_per_epoch,
            "skipped_steps": skipped_steps,
            "interrupted": interrupted is not None,
            "wall_s": round(time.time() - start_time, 2),
            "device": str(device),
            "allocator": loaded_allocator(),  # what the process ran on (`titans --allocator`)
            "run_dir": str(run_dir),
            "checkpoint": str(saved),
        }
    )
    return result
