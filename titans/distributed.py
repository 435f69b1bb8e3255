"""Data-parallel training under torchrun: the process group, collectives, model wrapping, full state dicts.

    torchrun --standalone --nproc_per_node=2 -m titans train --config config.yaml
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m titans train --config config.yaml        # one such command per node (node_rank 0, 1, ...)

The model code stays single-device; everything rank-aware lives here, in titans/data.py (each rank's rows) and in
train.py (torchtitan's rule).
The design goal is that the world size changes throughput, never results:

- `training.batch_size` is the global micro-batch: each of the W ranks trains on a contiguous 1/W of its rows
  (`titans.data.rank_rows`), so the union over ranks is exactly the single-process micro-batch.
- Fresh samples are drawn row by row from a generator seeded by (seed, step, global row) (`titans.data.row_seed`),
  so a rank's rows are distinct from every other rank's, reproducible, and identical to the rows one process would draw.
- Each rank's loss is weighted by its share of the step's scored tokens (see train.py), so the all-reduced gradient
  is the gradient of the global token mean, whatever the ranks' token counts.
- Checkpoints hold full (unsharded) state dicts in the single-process format, so any world size can resume them.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global rank, rank on its node, number of processes, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the process that writes files and prints


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set; launch with torchrun, which sets it")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an integer (torchrun sets it)") from None


def launch_world_size() -> int:
    """The job's number of processes, known before joining it: the live group's size, else WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    return world_size


# Whether init_distributed created the default process group (and cleanup may therefore destroy it).
_OWNED_GROUP = [False]


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / LOCAL_RANK / WORLD_SIZE (MASTER_ADDR / MASTER_PORT), if any.

    device: training.device, i.e. 'auto' (CUDA when available), 'cpu' or 'cuda'. With CUDA each process takes GPU
    LOCAL_RANK and the NCCL backend; on the CPU the backend is gloo. Without WORLD_SIZE, or with WORLD_SIZE=1, no
    process group is created and this is a single process (rank 0 of 1). An already initialised process group (a
    caller's own) is joined as it is, and `cleanup` leaves it to its owner.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"training.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device='cuda' but CUDA is not available here; use training.device=cpu or auto")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        world_size = launch_world_size()
        if world_size == 1:
            return DistInfo(0, 0, 1, torch.device("cuda" if use_cuda else "cpu"), True)
        rank = _env_int("RANK")
        if not 0 <= rank < world_size:
            raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda:
        if not 0 <= local_rank < torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "set --nproc_per_node to at most the number of GPUs"
            )
        device_obj = torch.device("cuda", local_rank)
        torch.cuda.set_device(device_obj)
    else:
        device_obj = torch.device("cpu")
    if not dist.is_initialized():
        # NCCL only runs on GPUs and gloo is the CPU backend; device_id binds NCCL to this process's GPU eagerly.
        if use_cuda:
            dist.init_process_group("nccl", device_id=device_obj)
        else:
            dist.init_process_group("gloo")
        _OWNED_GROUP[0] = True
    return DistInfo(rank, local_rank, world_size, device_obj, rank == 0)


def cleanup() -> None:
    """Destroy the process group init_distributed created; a no-op otherwise (safe to call twice)."""
    if _OWNED_GROUP[0] and dist.is_initialized():
        # DDP wrappers hold the group; one left in a reference cycle would keep it alive into interpreter exit, where
        # its worker threads race the finalizer (std::terminate, SIGABRT). Collect them while Python is whole.
        gc.collect()
        dist.destroy_process_group()
    _OWNED_GROUP[0] = False


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """`init_distributed` ... `cleanup`, the latter in a finally: errors and Ctrl-C still shut the group down."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only (every process of a single-process run is rank 0)."""
    if not _active() or dist.get_rank() == 0:
        print(*args, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks, returned as a new tensor (the input is left alone); identity in one process."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_sum expects a torch.Tensor, got {type(tensor).__name__}")
    total = tensor.detach().clone()
    if _active():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor | float:
    """Mean of a metric over all ranks; a float in gives a float out. Identity in one process."""
    if isinstance(value, torch.Tensor):
        total = all_reduce_sum(value.float() if not value.is_floating_point() else value)
        return total / (dist.get_world_size() if _active() else 1)
    if not isinstance(value, int | float):
        raise TypeError(f"all_reduce_mean expects a tensor or a number, got {type(value).__name__}")
    if not _active():
        return float(value)
    # A float64 tensor on the device the backend can reduce: NCCL needs CUDA tensors, gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return float(all_reduce_sum(torch.tensor(float(value), dtype=torch.float64, device=device))) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (identity in one process)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if _active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# Model wrapping, gradient sync and full state dicts.


def wrap_model(model: nn.Module, parallel: Literal["ddp", "fsdp"], info: DistInfo) -> nn.Module:
    """The model as it is trained: itself in one process, else DistributedDataParallel or FSDP2 (`fully_shard`).

    DDP: every variant sends a gradient to every parameter, so find_unused_parameters stays off (it would cost a
    graph traversal per step and hide a real bug). FSDP2 shards each block and then the root (embedding, head);
    it runs on CPU/gloo and on CUDA/NCCL. Call before building the optimizer: FSDP2 replaces the parameters.
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"training.parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"FSDP wrapping shards model.blocks, but {type(model).__name__} has no `blocks`; use ddp")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The single-device module inside a DDP wrapper (FSDP2 shards in place, so it is its own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was wrapped with FSDP2, whose forward needs every rank (evaluation then runs everywhere)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, enabled: bool) -> Any:
    """Context for one micro-step's backward: all-reduce gradients only when `enabled` (the last micro-step).

    Skipping the all-reduce on the other micro-steps is what makes gradient accumulation cost one all-reduce per
    optimizer step; the gradients still accumulate locally and the last backward reduces their sum.
    """
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def _optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    # optimizer.state_dict() numbers parameters in param_groups order; these are their names, in that order.
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts, unsharded and in the single-process format, for a checkpoint.

    Under FSDP2 this is a collective (every rank must call it) and only rank 0 gets the tensors (on the CPU);
    the other ranks get empty dicts. DDP and single processes return the module's and optimizer's own dicts.
    """
    if not is_sharded(model):
        return unwrap_model(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not model_state:
        return {}, {}
    # The distributed API keys optimizer state by parameter name; a plain optimizer.state_dict() by index.
    index = {name: i for i, name in enumerate(_optimizer_param_names(model, optimizer))}
    optim_state = {
        "state": {index[name]: value for name, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]],
    }
    return model_state, optim_state


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> None:
    """Inverse of `full_state_dicts`: load a checkpoint written by any world size into this (wrapped) model.

    Every rank passes the full dicts (each reads the checkpoint file). Raises RuntimeError when the model's
    parameter names or shapes differ from the checkpoint's.
    """
    if not is_sharded(model):
        unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    names = _optimizer_param_names(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "distributed",
    "full_state_dicts",
    "gradient_sync",
    "init_distributed",
    "is_sharded",
    "launch_world_size",
    "load_full_state_dicts",
    "print0",
    "unwrap_model",
    "wrap_model",
]
