"""A training step's forward and backward replayed as a CUDA graph (`training.cuda_graph`).

Eager on a GPU, a memory variant's step is bound by the host: every chunk of every layer is a handful of kernels the
host launches one by one (benchmarks/results/cuda_h200_20261128.md: 762 ms of CPU time for 65 ms of GPU time in one
LMM step). A step's work has the same shape every time, so it can be recorded once and replayed with one launch.

`GraphedStep(model, dtype)(inputs, targets)` is the forward and backward of one micro-batch, the loss returned and
the gradients left in the parameters' `.grad`, as `train_step`'s eager code leaves them. What is recorded, per batch
shape: zero the gradients in place, forward under autocast (its weight cache off: a recording may not keep tensors
from outside its pool between replays), backward (accumulating into those same gradient tensors), copy the loss to a
static tensor. The optimizer, the gradient clip and the NaN policy stay outside the graph, unchanged: they run a few
kernels, read the loss and norm on the host as the eager step does, and keep `training.nan_policy=skip` working.

Static gradients: a graph writes to the addresses it was recorded with, so the parameters' gradients must stay the
same tensors for good. The first (eager) step creates them and nothing sets them to None afterwards: each step starts
by zeroing them in place, and `train_step` skips its `zero_grad` for a graphed model. A parameter that never gets a
gradient keeps `.grad = None`, so AdamW skips it as in eager training. 0 + g is g, so in float32 the gradients
equal the eager step's bit for bit (tests/test_train_graph.py on CPU, tests/test_cuda.py on a GPU). Under bf16
autocast they round differently: a recording may not use autocast's weight cache, so each use of a weight casts it
and its gradients are summed in float32, where the eager step casts once and sums the uses' gradients in bf16.

A recording may not read values on the host: the model's token-range checks run before each replay instead
(`TitansLM.check_inputs`, skipped inside the recording by `inputs_checked_by_caller`), and tables the memory kernels
build from Python numbers are cached from the warm-up steps. tests/test_train_graph.py runs what is recorded under a
dispatch mode that fails on any host read or host-data tensor (tests/host_sync.py), for every variant.

Each new shape (the short last batch of an epoch, each curriculum stage) first runs WARM_UP_STEPS eager steps
(lazily built tensors, Triton's compilation, cuBLAS's workspaces exist before recording, as torch.cuda.graphs asks),
then is recorded; up to MAX_GRAPHS shapes share one memory pool, later shapes run eagerly. Graphs sharing a pool may
be replayed in any order here because nothing of a replay is read after the next: the loss is copied out and the
gradients live outside the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from titans.models.backbone import TitansLM, inputs_checked_by_caller

WARM_UP_STEPS = 2
MAX_GRAPHS = 8

# capture(record, pool) -> (replay, pool): record the work of `record()` (or, without a GPU, arrange to run it) so
# that `replay()` repeats it; `pool` is the memory pool graphs share (None before the first).
Capture = Callable[[Callable[[], None], Any], tuple[Callable[[], None], Any]]


def cuda_capture(record: Callable[[], None], pool: Any) -> tuple[Callable[[], None], Any]:
    """Record `record()` into a CUDA graph in `pool` (a new pool when None); returns its replay and its pool."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        record()
    return graph.replay, graph.pool()


def eager_capture(record: Callable[[], None], pool: Any) -> tuple[Callable[[], None], Any]:
    """`cuda_capture`'s contract without a GPU: each replay runs `record()` eagerly (tests on CPU)."""
    return record, pool


def capture_for(device: torch.device) -> Capture:
    """The capture for a model on `device`; raises ValueError off CUDA (the config check names the fix)."""
    if device.type != "cuda":
        raise ValueError(f"training.cuda_graph=true records CUDA graphs, but the model is on {device.type}")
    return cuda_capture


class GraphedStep:
    """The forward and backward of one micro-batch, replayed from a CUDA graph per batch shape (module docstring).

    model: the single-process model (its forward returns (logits, loss, state)); autocast_dtype: bf16 or None;
    capture: `capture_for(device)`, or `eager_capture` in tests."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None, capture: Capture) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.capture = capture
        self.pool: Any = None
        self.held: list[tuple[nn.Parameter, Tensor]] = []  # (parameter, its gradient) as first recorded
        self.seen: dict[tuple[Any, ...], int] = {}
        self.graphs: dict[tuple[Any, ...], tuple[Callable[[], None], Tensor, Tensor, Tensor]] = {}

    def __call__(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Forward and backward of (inputs, targets) [B, T]: returns the loss (0-d, detached) and leaves the
        gradients in `.grad`, replacing (not adding to) the previous step's."""
        key = (tuple(inputs.shape), tuple(targets.shape), inputs.device)
        if key in self.graphs:
            replay, static_inputs, static_targets, loss = self.graphs[key]
            self._check_gradients_held()
            if isinstance(self.model, TitansLM):  # what the recorded forward could not check (a host sync)
                self.model.check_inputs(inputs, targets)
            static_inputs.copy_(inputs)
            static_targets.copy_(targets)
            replay()
            return loss
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] > WARM_UP_STEPS and len(self.graphs) < MAX_GRAPHS:
            self.graphs[key] = self._record(inputs, targets)
            return self(inputs, targets)
        return self._eager(inputs, targets)

    def _gradients(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _check_gradients_held(self) -> None:
        """The graphs write the gradients recorded at the first recording; a parameter whose `.grad` was set to None
        or replaced since would silently stop training."""
        if any(p.grad is not g for p, g in self.held):
            raise RuntimeError(
                "a parameter's .grad was replaced since the training step was recorded as a CUDA graph; with "
                "training.cuda_graph, zero gradients in place (optimizer.zero_grad(set_to_none=False)) or not at all"
            )

    def _forward_backward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        device = inputs.device.type
        enabled = self.autocast_dtype is not None
        with torch.autocast(device, dtype=self.autocast_dtype, enabled=enabled, cache_enabled=False):
            _, loss, _ = self.model(inputs, targets)
        loss.backward()
        return loss.detach()

    def _eager(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """A warm-up or unrecorded step: the same work, eagerly (on a side stream on CUDA, as recording asks)."""
        gradients = self._gradients()
        if gradients:  # none before the first step
            torch._foreach_zero_(gradients)
        if inputs.device.type != "cuda":
            return self._forward_backward(inputs, targets)
        side = torch.cuda.Stream(inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            loss = self._forward_backward(inputs, targets)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        return loss

    def _record(self, inputs: Tensor, targets: Tensor) -> tuple[Callable[[], None], Tensor, Tensor, Tensor]:
        static_inputs, static_targets = inputs.clone(), targets.clone()
        if not self.held:  # made by the warm-up steps; recorded by address from here on
            self.held = [(p, p.grad) for p in self.model.parameters() if p.grad is not None]
        self._check_gradients_held()
        gradients = [g for _, g in self.held]
        loss_out = torch.zeros((), dtype=torch.float64, device=inputs.device)  # holds a float32 loss exactly

        def record() -> None:
            torch._foreach_zero_(gradients)
            with inputs_checked_by_caller():
                loss_out.copy_(self._forward_backward(static_inputs, static_targets))

        replay, self.pool = self.capture(record, self.pool)
        return replay, static_inputs, static_targets, loss_out
