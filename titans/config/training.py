"""The `training` section of a run config (`TrainingConfig`): optimiser, schedule, evaluation, checkpoints, runtime.

Defaults here are the documented defaults; YAML files list only what differs. Each field's docstring is its entry
in the README's config table (scripts/readme_sections.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from titans.config.coerce import _coerce_fields, _require


@dataclass
class TrainingConfig:
    """Optimiser, schedule, evaluation, checkpoints and runtime options of the training loop."""

    _path: ClassVar[str] = "training."

    batch_size: int = 16
    """Sequences per micro-batch, over all processes together: with W processes each trains on batch_size / W of
    them (batch_size must be divisible by W). An optimiser step takes grad_accum_steps micro-batches, i.e.
    batch_size * grad_accum_steps sequences whatever W. Evaluation batches have this size too."""

    learning_rate: float = 1e-3
    """Peak AdamW learning rate."""

    max_epochs: int = 10
    """Passes over the train split (ignored when max_steps is set)."""

    gradient_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""

    max_steps: int | None = None
    """Optimiser steps; overrides max_epochs when set."""

    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""

    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of learning_rate."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""

    eval_every: int = 0
    """Steps between evaluations; 0 = once per epoch."""

    eval_samples: int | None = None
    """Evaluation sequences; null = the whole test split."""

    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = only at the end."""

    out_dir: str = "runs"
    """Runs are written to out_dir/run_name."""

    run_name: str | None = None
    """Directory name of the run; null = derived from variant, dataset and time."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Autocast dtype of the forward pass (on CPU too, where bfloat16 is slower)."""

    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss: stop the run or skip the step."""

    grad_accum_steps: int = 1
    """Micro-batches of batch_size sequences per optimiser step."""

    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Wrapper used when launched with several processes: DDP or FSDP2."""

    tensorboard: bool = False
    """Also write TensorBoard event files."""

    progress: bool = True
    """Show progress: a bar on a terminal; with output redirected (a log file, CI, nohup), a plain line after the
    first step and then every heartbeat_s seconds (step, loss, tokens/s, ETA)."""

    heartbeat_s: float = 30.0
    """Seconds between progress lines when the output is not a terminal; 0 = none."""

    threads: int | None = None
    """torch CPU threads; null = torch's default."""

    compile: bool = False
    """torch.compile MAC's segments (memory.impl=chunked: every variant's memory chunks); inductor on CPU needs a
    C++ compiler. The first step pays the compilation; its measured cost is in benchmarks/README.md."""

    cuda_graph: bool = False
    """Replay each training step's forward and backward as a CUDA graph, recorded per batch shape after two eager
    steps (titans/train_graph.py): one launch per step instead of thousands. CUDA only, one process,
    grad_accum_steps 1, no state carried across steps, not with compile."""

    def __post_init__(self) -> None:
        _coerce_fields(self)
        p = self._path
        for name in ("batch_size", "max_epochs", "grad_accum_steps"):
            _require(getattr(self, name) >= 1, f"{p}{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_samples", "threads"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{p}{name} must be >= 1 or null, got {value}")
        _require(self.heartbeat_s >= 0, f"{p}heartbeat_s must be >= 0 (0 = no progress lines), got {self.heartbeat_s}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{p}{name} must be >= 0, got {getattr(self, name)}")
        _require(self.learning_rate > 0, f"{p}learning_rate must be > 0, got {self.learning_rate}")
        _require(self.gradient_clip >= 0, f"{p}gradient_clip must be >= 0 (0 = off), got {self.gradient_clip}")
        _require(0 <= self.min_lr_ratio <= 1, f"{p}min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, f"{p}weight_decay must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), f"{p}betas must each lie in [0, 1), got {list(self.betas)}")
        _require(self.out_dir.strip() != "", f"{p}out_dir must not be empty")
        _require(
            not (self.cuda_graph and self.device == "cpu"),
            f"{p}cuda_graph=true records CUDA graphs, but {p}device is cpu; set {p}device=cuda (or auto on a GPU) "
            f"or {p}cuda_graph=false",
        )
        _require(
            not (self.cuda_graph and self.grad_accum_steps > 1),
            f"{p}cuda_graph=true replays one micro-batch per step, but {p}grad_accum_steps is "
            f"{self.grad_accum_steps}; raise {p}batch_size instead or set {p}cuda_graph=false",
        )
        _require(
            not (self.cuda_graph and self.compile),
            f"{p}cuda_graph=true and {p}compile=true: use one of them (compiled segments are not recorded)",
        )
        _require(
            self.run_name is None or (self.run_name not in ("", ".", "..") and not set("/\\") & set(self.run_name)),
            f"{p}run_name must be a plain directory name (no slashes), got {self.run_name!r}",
        )
