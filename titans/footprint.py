"""A run's memory floor, checked before any work: a size the machine cannot hold fails as one ConfigError.

`data.seq_len=100000000` would otherwise die in the allocator minutes later with a traceback. The estimate is a
floor, not a forecast: it counts only tensors a training run certainly holds, so it refuses a config only when
even that floor exceeds the memory available, and never a config that would have run.

* data set (host memory): `task.sample(data.num_samples)` makes inputs and targets, int64 [num_samples, seq_len]:
  num_samples x seq_len x 2 x 8 bytes (every data mode draws it; fresh samples use its test split).
* one training step (the training device): per token of a micro-batch (training.batch_size / processes rows of
  seq_len tokens), 4 activations of d_model per layer kept for the backward pass (block input, attention output,
  MLP output, residual) and the logits with their gradient (2 x vocabulary); 4 bytes a value (2 with bfloat16).
  Attention scores (T x T per head) are not counted: PyTorch's fused causal attention never materialises them.
* parameters: only the token embedding, vocabulary x d_model, x 16 bytes (weight, gradient, two AdamW moments).

Available memory: MemAvailable of /proc/meminfo for the host (no check where it cannot be read), and the free
memory `torch.cuda.mem_get_info` reports for a CUDA device.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from titans.config import ConfigError, RunConfig
from titans.tasks import make_task

GB = 1e9


def memory_floor(cfg: RunConfig, world_size: int = 1) -> tuple[int, int]:
    """(data set bytes in host memory, bytes of one training step on the training device) for `cfg`; see the module
    docstring for what each counts."""
    data, model = cfg.data, cfg.model
    data_bytes = data.num_samples * data.seq_len * 2 * 8
    vocab = model.vocab_size or make_task(data).vocab_size
    rows = math.ceil(cfg.training.batch_size / world_size)
    value_bytes = 2 if cfg.training.dtype == "bfloat16" else 4
    activations = rows * data.seq_len * (4 * model.d_model * model.n_layers + 2 * vocab) * value_bytes
    return data_bytes, activations + vocab * model.d_model * 16


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(cfg: RunConfig, device: torch.device, world_size: int = 1) -> None:
    """Raise ConfigError when the run's memory floor exceeds what the host (or the CUDA device) has available."""
    data_bytes, step_bytes = memory_floor(cfg, world_size)
    on_host = data_bytes + (step_bytes if device.type == "cpu" else 0)
    available = available_host_bytes()
    if available is not None and on_host > available:
        _refuse(cfg, data_bytes, step_bytes, "host memory (MemAvailable)", available, device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if step_bytes > free:
            _refuse(cfg, data_bytes, step_bytes, f"free memory on {device}", free, device)


def _refuse(cfg: RunConfig, data_bytes: int, step_bytes: int, where: str, available: int, device: torch.device) -> None:
    d, t = cfg.data, cfg.training
    raise ConfigError(
        f"this run needs at least {data_bytes / GB:.1f} GB of host memory for its data set (data.num_samples="
        f"{d.num_samples} x data.seq_len={d.seq_len} x 16 bytes) and {step_bytes / GB:.1f} GB on {device.type} for "
        f"one training step (training.batch_size={t.batch_size}), but only {available / GB:.1f} GB of {where} is "
        "available; lower data.seq_len, data.num_samples or training.batch_size"
    )
