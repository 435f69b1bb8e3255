"""The training loop: `train(cfg)` reads top to bottom, nanoGPT style; one optimizer step is `train_step`.

    python main.py --config config.yaml training.max_epochs=5          # the seed's usage
    python -m titans train --config config.yaml model.variant=MAG
    python -m titans train --config config.yaml --resume                # continue runs/<run_name>/ exactly
    torchrun --standalone --nproc_per_node=2 -m titans train --config config.yaml    # data-parallel, same results

Outline: run directory -> task -> model (seeded) -> data -> AdamW + warmup/cosine schedule -> resume -> loop
(train_step, then evaluate, then checkpoint, each deciding whether it acts this step) -> final eval, plots, one
result dict. The pieces live by concern: titans/data.py (the three data modes and each process's rows), titans/run.py
(the run directory, metrics log, checkpoints), titans/distributed.py (the process group).

SIGINT/SIGTERM make the loop finish its current step, save a checkpoint and return.

Under torchrun every process runs this same loop: training.batch_size is the global micro-batch, split across the
ranks; gradients are all-reduced once per optimizer step; losses are reduced so every rank takes the same decisions
(NaN guard, stop on a signal); rank 0 alone writes files and evaluates (every rank under FSDP). Results match a single
process on the whole batch up to float summation order, and a checkpoint resumes under any world size.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from titans.checkpoint import checkpoint_path, list_checkpoints
from titans.config import FLEX_ON_CPU_ERROR, ConfigError, RunConfig, TrainingConfig, save_config
from titans.config.model import resolved_memory
from titans.data import TrainData, check_batch_divisible
from titans.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    distributed,
    gradient_sync,
    is_sharded,
    launch_world_size,
    print0,
    unwrap_model,
    wrap_model,
)
from titans.evaluate import evaluate
from titans.footprint import check_memory
from titans.grad_watch import GradientWatch
from titans.models import build_model, num_parameters
from titans.plots import plot_run
from titans.progress import Progress
from titans.run import MetricsLog, RunDir, TrainingCheckpoints, open_run_dir
from titans.stop import StopFlag
from titans.system import cpu_compiler, loaded_allocator
from titans.tasks import make_task
from titans.train_graph import GraphedStep, capture_for


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/Inf and training.nan_policy is 'stop'."""


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


def check_runtime(cfg: RunConfig, device: torch.device) -> None:
    """Raise ConfigError for a setting this machine cannot run, before any work: the CLI reports it as one line."""
    t = cfg.training
    if t.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as error:
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
    if t.cuda_graph:
        try:
            capture_for(device)
        except ValueError as error:
            fix = "train on a GPU (training.device=cuda) or set training.cuda_graph=false"
            raise ConfigError(f"{error}; {fix}") from None
        if launch_world_size() > 1:
            raise ConfigError(
                "training.cuda_graph=true records one process's step; drop it under torchrun or run one process"
            )
    check_memory(cfg, device, launch_world_size())  # a size no memory here can hold (titans/footprint.py)


def build_optimizer(
    module: nn.Module, cfg: RunConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `optimizer_groups`, and its schedule: linear warmup, then cosine decay to min_lr_ratio."""
    t = cfg.training
    # torch's fused AdamW (one kernel over every parameter) where the parameters are plain tensors: on CPU the
    # default is a Python loop of about ten ops per parameter, a few percent of a small model's step. FSDP2's sharded
    # parameters (DTensors) keep the default implementation.
    fused = all(type(p.data) is torch.Tensor for p in module.parameters())
    optimizer = torch.optim.AdamW(
        optimizer_groups(module, t.weight_decay),
        lr=t.learning_rate,
        betas=tuple(t.betas),
        weight_decay=t.weight_decay,
        fused=fused or None,
    )
    schedule = functools.partial(
        lr_multiplier, warmup_steps=t.warmup_steps, total_steps=total_steps, min_lr_ratio=t.min_lr_ratio
    )
    return optimizer, Float32Schedule(optimizer, schedule)


class Float32Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose rates are float32 numbers. Fused AdamW computes in float32 but reads a rate given as a Python
    float in float64 and one held in a device tensor (the CUDA-graphed step's, titans/train_graph.py) in float32:
    rates exact in float32 make the eager and the graphed update the same to the bit."""

    def get_lr(self) -> list[float]:
        return [float(torch.tensor(float(lr), dtype=torch.float32)) for lr in super().get_lr()]


def train(cfg: RunConfig, resume: str | os.PathLike | bool | None = None) -> dict[str, Any]:
    """Train cfg.model on cfg.data's task with cfg.training; returns the run's results.

    resume: None/False = start fresh (old checkpoints and metrics in the run directory are removed);
        True = continue from the newest valid checkpoint in this run's own directory;
        a path = continue from that ckpt_*.pt file, or the newest valid one in that run directory.
    Returns {"variant", "task", <task.metric>, "test_loss", "train_loss", "chance", "params", "steps", "epochs",
        "skipped_steps", "gradient_spikes", "interrupted", "wall_s", "device", "allocator", "run_dir", "checkpoint"}.
    Raises TrainingDivergedError on a NaN/Inf loss or gradient when training.nan_policy == 'stop'.

    Launched by torchrun (WORLD_SIZE > 1), every process calls train() and gets the same result dict; the process
    group is created here and destroyed on the way out, errors and Ctrl-C included.
    """
    # Checked before joining the process group: a bad launch fails at once instead of waiting at the rendezvous.
    check_batch_divisible(cfg.training.batch_size, launch_world_size())
    with distributed(cfg.training.device) as dist_info:
        return _train(cfg, resume, dist_info)


def _train(cfg: RunConfig, resume: str | os.PathLike | bool | None, dist_info: DistInfo) -> dict[str, Any]:
    # ---- setup: a private copy of the config; settings this machine cannot run fail here, before any work
    start_time = time.time()
    cfg = copy.deepcopy(cfg)
    t = cfg.training
    device, is_main = dist_info.device, dist_info.is_main
    check_runtime(cfg, device)
    if t.threads:
        torch.set_num_threads(t.threads)

    # ---- the run directory, and the checkpoint to continue from (titans/run.py)
    run = open_run_dir(cfg, resume, is_main)

    # ---- task and model; the model's vocabulary comes from the task
    task = make_task(cfg.data)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = task.vocab_size
    cfg.model.memory = resolved_memory(cfg.model)  # the variant's memory defaults, saved as values
    module = _seeded_model(cfg, device)
    model = wrap_model(module, t.parallel, dist_info)  # DDP or FSDP2 under torchrun; `module` stays inside

    # ---- data: a fixed split reshuffled per epoch, fresh rows, or a text stream (titans/data.py)
    data = TrainData(cfg, task, dist_info.rank, dist_info.world_size)
    total_steps = data.total_steps(t.max_steps, t.max_epochs)

    # ---- optimizer: AdamW with linear warmup then cosine decay to min_lr_ratio * learning_rate
    optimizer, scheduler = build_optimizer(module, cfg, total_steps)
    # training.cuda_graph: forward, backward, clip and update replayed from CUDA graphs (titans/train_graph.py)
    graphed = None
    if t.cuda_graph:
        graphed = GraphedStep(module, _autocast_dtype(t.dtype), capture_for(device), optimizer, _max_norm(t))

    # ---- resume: weights, optimizer, schedule, position in the data and every RNG; metrics rewound to the step
    checkpoints = TrainingCheckpoints(run, cfg, model, optimizer, scheduler, data, is_main)
    log = MetricsLog(run, task.metric, is_main, t.tensorboard)
    step, skipped_steps, spikes = _restored(cfg, run, checkpoints, log)
    if is_main:  # after restore: a checkpoint that does not fit this config leaves the run's config.yaml as it was
        save_config(cfg, run.path / "config.yaml")
    print0(_header(cfg, task, module, dist_info, data, total_steps, run))

    # ---- the loop: train_step, then evaluate, then checkpoint, each deciding whether it acts this step
    model.train()
    # Agreed by all ranks once per step, so every rank stops after the same step when any of them is signalled.
    stop_requested = False
    # A bar on a terminal, else a heartbeat line every training.heartbeat_s seconds (titans/progress.py).
    progress = Progress(total_steps, "step", "", step, is_main and t.progress, t.heartbeat_s, data.tokens_per_step)
    with StopFlag(announce=is_main) as stop, log, progress:
        while step < total_steps and not stop_requested:
            step_start, stop.step_started = time.perf_counter(), time.monotonic()
            epoch, index_in_epoch = divmod(step, data.steps_per_epoch)
            result = train_step(model, data, step, optimizer, scheduler, cfg, dist_info, stop, run, graphed)
            stop_requested = result.stop_requested
            step += 1
            skipped_steps += not result.applied
            # Said once per skipped step (a run that skips every step should not look healthy in the log), and on
            # the 1st, 10th, 100th ... gradient-norm spike (titans/grad_watch.py).
            skip_message = None if result.applied else result.skip_message(step, skipped_steps)
            _write(is_main, skip_message, spikes.check(step, result.grad_norm))
            progress.update(epoch=epoch + 1, loss=result.loss, lr=result.lr)
            stop.last_step_s = time.perf_counter() - step_start
            log.log(result.record(step, epoch, stop.last_step_s))

            # evaluate: every eval_every steps, or at the end of each epoch when eval_every is 0
            end_of_epoch = index_in_epoch == data.steps_per_epoch - 1
            if (t.eval_every > 0 and step % t.eval_every == 0) or (t.eval_every == 0 and end_of_epoch):
                run_evaluation(model, task, data, cfg, log, step, epoch, is_main)
            # checkpoint: every checkpoint_every steps (and once more at the end)
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0:
                log.flush()
                checkpoints.save(step, epoch, skipped_steps)
        progress.close()

        # ---- the end: a final evaluation and checkpoint, unless the last step had them (or a signal stopped it)
        final_epoch = max(0, step - 1) // data.steps_per_epoch
        # From the agreed flag, so that every rank makes the same collective calls (evaluation, checkpoint) below.
        interrupted = (stop.signal_name or "a signal to another process") if stop_requested else None
        if interrupted is None and (log.last_eval is None or log.last_eval["step"] != step):
            run_evaluation(model, task, data, cfg, log, step, final_epoch, is_main)
        log.flush()
        if checkpoints.latest != checkpoint_path(run.path, step):
            checkpoints.save(step, final_epoch, skipped_steps)
    # Plotted once at the end: rendering costs more than a tiny model's evaluation.
    if is_main:
        plot_run(
            log.records, run.path, task.metric, task.chance, f"{cfg.model.variant} on {task.name}: {run.path.name}"
        )
    # No rank returns before rank 0 has written the final checkpoint and plots.
    barrier()
    if interrupted is not None:
        print0(
            f"{interrupted} received: stopped at step {step}, checkpoint {checkpoints.latest}; continue with "
            f"--resume {run.path}"
        )

    summary = {"steps": step, "epochs": step / data.steps_per_epoch, "skipped_steps": skipped_steps}
    summary["gradient_spikes"] = spikes.spikes  # steps with a norm over 100x the recent median
    summary.update(interrupted=interrupted is not None, wall_s=round(time.time() - start_time, 2), device=str(device))
    return _result(cfg, task, module, log, run, checkpoints, summary)


def _restored(
    cfg: RunConfig, run: RunDir, checkpoints: TrainingCheckpoints, log: MetricsLog
) -> tuple[int, int, GradientWatch]:
    """Where the loop starts: the optimizer steps done and skipped (0, 0 for a fresh run; a resumed run's weights,
    optimizer, schedule, data position and RNGs restored and its metrics rewound to the checkpoint), and the gradient
    watch, which has seen a resumed run's own gradient norms so that it counts as the uninterrupted run would."""
    step, skipped_steps = 0, 0
    if run.resume_from is not None:
        step, skipped_steps = checkpoints.restore()
        log.rewind(step)
        print0(f"resumed from {run.resume_from} at step {step}")
    spikes = GradientWatch(cfg.model.variant != "baseline", run.path)
    for record in log.records:
        if record["kind"] == "train":
            spikes.check(record["step"], record["grad_norm"])
    return step, skipped_steps, spikes


def _write(is_main: bool, *messages: str | None) -> None:
    """Print the messages that are not None above the progress bar, on the main process only."""
    if is_main:
        for message in messages:
            if message is not None:
                tqdm.write(message)


def _seeded_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """cfg.model built on device from cfg.seed, compiled when training.compile asks."""
    # The same seed on every rank: identical initial weights (DDP also broadcasts rank 0's at wrapping).
    torch.manual_seed(cfg.seed)
    module = build_model(cfg.model).to(device)
    if cfg.training.compile:
        module.compile_blocks()  # before wrapping: the compiled steps live inside the single-device model
    return module


def _header(
    cfg: RunConfig, task: Any, module: nn.Module, dist_info: DistInfo, data: TrainData, total_steps: int, run: RunDir
) -> str:
    """The line a run starts with: what trains on what, where, for how long, and where its files go."""
    world_size = dist_info.world_size
    processes = f" x {world_size} processes ({cfg.training.parallel})" if world_size > 1 else ""
    return (
        f"training {cfg.model.variant} on {task.name}: {num_parameters(module):,} parameters, device "
        f"{dist_info.device}{processes}, {total_steps} steps ({data.steps_per_epoch} per epoch of "
        f"{len(data.train_set)} examples), run dir {run.path}"
    )


def _result(
    cfg: RunConfig,
    task: Any,
    module: nn.Module,
    log: MetricsLog,
    run: RunDir,
    checkpoints: TrainingCheckpoints,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The run's result dict (documented in `train`): the last evaluation's numbers, then `summary`."""
    result = {"variant": cfg.model.variant, "task": task.name}
    last_eval = log.last_eval
    if last_eval is not None:
        result.update({k: last_eval[k] for k in (task.metric, "test_loss", "train_loss")})
    result.update({"chance": task.chance, "params": num_parameters(module), **summary})
    result.update(
        {
            "allocator": loaded_allocator(),  # what the process ran on (`titans --allocator`)
            "run_dir": str(run.path),
            "checkpoint": str(checkpoints.latest),
        }
    )
    return result


@dataclass
class StepResult:
    """What one optimizer step reports: the token-mean loss over every process and micro-batch, the pre-clip global
    gradient norm, the learning rate it used, whether the update was applied (False: skipped by nan_policy=skip,
    `non_finite` names what was NaN/Inf), and whether any process was signalled to stop."""

    loss: float
    grad_norm: float
    lr: float
    applied: bool
    non_finite: str | None
    stop_requested: bool

    def record(self, step: int, epoch: int, seconds: float) -> dict[str, Any]:
        """The metrics.jsonl record of this step; `step` counts optimizer steps done, this one included."""
        record = {"kind": "train", "step": step, "epoch": epoch, "loss": self.loss, "lr": self.lr}
        # step_s: wall seconds of this step (data, forward, backward, optimizer): throughput without a benchmark
        record.update({"grad_norm": self.grad_norm, "step_s": round(seconds, 4)})
        if not self.applied:
            record["skipped"] = True
        return record

    def skip_message(self, step: int, skipped_steps: int) -> str:
        return (
            f"step {step}: {self.non_finite} is NaN/Inf, update skipped (training.nan_policy=skip, {skipped_steps} "
            "skipped so far); if it repeats, lower training.learning_rate or model.memory.max_lr"
        )


def train_step(
    model: nn.Module,
    data: TrainData,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: RunConfig,
    dist_info: DistInfo,
    stop: StopFlag,
    run: RunDir,
    graphed: GraphedStep | None = None,
) -> StepResult:
    """Optimizer step `step` (0-based) over this process's micro-batches of it: token-weighted backward, one
    all-reduce of the loss and the stop flag, gradient clipping, then the update unless the NaN policy skips it.
    graphed: the whole step (forward, backward, clip, update) replayed from CUDA graphs (one process, one micro-batch,
    no carried state), which holds back an update whose loss or gradient norm is NaN/Inf on the device.

    Raises TrainingDivergedError on a non-finite loss or gradient norm when training.nan_policy is 'stop'.
    """
    t = cfg.training
    device, world_size = dist_info.device, dist_info.world_size
    micro_batches = data.micro_batches(step)
    # The model's loss is a mean over a micro-batch's scored tokens; weighting each by its share of the whole step's
    # scored tokens (summed over ranks) makes the total the step's token mean, however unevenly the tokens fall
    # across micro-batches and ranks.
    local_tokens = float(sum(micro.scored for micro in micro_batches))
    step_tokens = all_reduce_sum(torch.tensor(local_tokens, device=device)).item()

    # ---- forward and backward of each micro-batch; gradients accumulate
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    graphed_norm = None
    if graphed is not None:  # one micro-batch of every scored token, one process: its loss is the step's
        (micro,) = micro_batches
        batch = micro.batch.to(device)
        step_loss, graphed_norm = graphed(batch.inputs, batch.targets)  # the update already done, or held back
        micro_batches = []
    for index, micro in enumerate(micro_batches):
        batch = micro.batch.to(device)
        # All-reduce the accumulated gradients only in the last micro-step's backward.
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with _autocast(device, t.dtype):
                _, loss, new_state = model(batch.inputs, batch.targets, state=data.carried_state(micro))
            data.carry(micro, new_state)
            share = loss * (micro.scored / max(step_tokens, 1.0))
            # DDP and FSDP average gradients over ranks; the shares are meant to be summed, hence * world_size.
            (share * world_size).backward()
        step_loss += share.detach()

    # ---- one reduction gives every rank the step's loss and whether any rank was signalled to stop
    agreed = all_reduce_sum(torch.stack([step_loss, step_loss.new_tensor(stop.signal_name is not None)]))
    loss, stop_requested = agreed[0].item(), agreed[1].item() > 0

    # ---- clip: clip_grad_norm_ returns the pre-clip norm; with max_norm=inf it only measures
    if graphed_norm is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), _max_norm(t))
    else:
        grad_norm = graphed_norm
    # Under FSDP the norm is a replicated DTensor; full_tensor() makes it a plain one.
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()

    # ---- the NaN policy, then the update; the schedule advances either way (the lr is a function of the step)
    non_finite = None if math.isfinite(loss) else "loss"
    if non_finite is None and not math.isfinite(grad_norm):
        non_finite = "gradient norm"
    if non_finite is not None and t.nan_policy == "stop":
        raise TrainingDivergedError(_divergence_message(cfg, f"the {non_finite}", step + 1, run.path))
    lr = scheduler.get_last_lr()[0]
    if non_finite is None and graphed is None:
        optimizer.step()
    scheduler.step()
    if graphed is None:  # a graphed step zeroes its gradients in place: they are recorded by address
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, lr, non_finite is None, non_finite, stop_requested)


def _max_norm(t: TrainingConfig) -> float:
    """The gradient clip's max_norm: training.gradient_clip, or inf (clip_grad_norm_ then only measures)."""
    return t.gradient_clip if t.gradient_clip else float("inf")


def _autocast_dtype(dtype: str) -> torch.dtype | None:
    """training.dtype as the forward pass's autocast dtype: bfloat16, or None (float32, no autocast)."""
    return torch.bfloat16 if dtype == "bfloat16" else None


def _autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """The forward pass's autocast for training.dtype (train_step; evaluation passes the dtype to `evaluate`)."""
    autocast_dtype = _autocast_dtype(dtype)
    return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()


def run_evaluation(
    model: nn.Module, task: Any, data: TrainData, cfg: RunConfig, log: MetricsLog, step: int, epoch: int, is_main: bool
) -> None:
    """Evaluate on the test split and log the record (which prints the evaluation line).

    The whole test set on one rank (the unwrapped module, no collectives), so the numbers do not depend on the world
    size; an FSDP forward needs every rank, so there each rank evaluates the whole set.
    """
    metrics = None
    if is_main or is_sharded(model):
        evaluated = model if is_sharded(model) else unwrap_model(model)
        metrics = evaluate(evaluated, task, data.test_set, cfg.training.batch_size, _autocast_dtype(cfg.training.dtype))
    metrics = broadcast_object(metrics)
    log.log({"kind": "eval", "step": step, "epoch": epoch, "train_loss": log.train_loss_since_eval(), **metrics})
