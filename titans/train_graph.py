"""A whole training step replayed as a CUDA graph (`training.cuda_graph`): forward, backward, clip and AdamW.

Eager on a GPU, a memory variant's step is bound by the host: every chunk of every layer is a handful of kernels the
host launches one by one (benchmarks/results/cuda_h200_20261128.md: 762 ms of CPU time for 65 ms of GPU time in one
LMM step). A step's work has the same shape every time, so it can be recorded once and replayed with one launch.

`GraphedStep(model, dtype, capture, optimizer, max_norm)(inputs, targets)` is one optimizer step on one micro-batch,
what `train_step`'s eager code does: zero the gradients, forward under autocast, backward, clip the gradients to
`max_norm` (inf: only measure), then the AdamW update unless the loss or the gradient norm is NaN/Inf. It returns the
loss and the pre-clip norm as device tensors; the caller reads them, applies the NaN policy (the update was already
held back) and advances the learning-rate schedule.

What the recording reads from outside its pool, and how it stays valid across replays:
- the gradients: a graph writes to the addresses it was recorded with, so they must stay the same tensors for good.
  The first (eager) step creates them and nothing sets them to None afterwards: each step zeroes them in place, and
  `train_step` skips its `zero_grad` for a graphed model. A parameter that never gets a gradient keeps `.grad = None`,
  so AdamW skips it as in eager training.
- AdamW's state (moments and step counts), created by the first eager step and updated in place by torch's fused
  AdamW, which needs no host value: its step counts live on the device, and it takes the learning rate and a
  "skip this update" flag as device tensors (`found_inf`, the flag torch's GradScaler uses; the kernel leaves the
  weights, moments and step count as they were when it is 1).
- the learning rate: one device tensor per parameter group, filled from the group's value (the schedule's, a Python
  float as in eager training) before each step and put in the group only while the step runs, so the schedule, the
  checkpoints and `load_state_dict` see what they see in eager training.
A checkpoint loaded or a gradient replaced after recording would leave a graph writing to stale tensors; each replay
checks that the gradients and AdamW's state are still the tensors recorded and raises otherwise.

Equal to the eager step: 0 + g is g, the clip is the same `clip_grad_norm_`, and fused AdamW computes in float32 with
the learning rate cast to float32 either way, so in float32 a graphed run equals the eager run bit for bit
(tests/test_train_graph.py on CPU, tests/test_cuda.py on a GPU). Under bf16 autocast they round differently: a
recording may not use autocast's weight cache, so each use of a weight casts it and its gradients are summed in
float32, where the eager step casts once and sums the uses' gradients in bf16.

A recording may not read values on the host: the model's token-range checks run before each replay instead
(`TitansLM.check_inputs`, skipped inside the recording by `inputs_checked_by_caller`), and tables the memory kernels
build from Python numbers are cached from the warm-up steps. tests/test_train_graph.py runs what is recorded under a
dispatch mode that fails on any host read or host-data tensor (tests/host_sync.py), for every variant.

Each new shape (the short last batch of an epoch, each curriculum stage) first runs WARM_UP_STEPS eager steps
(lazily built tensors, Triton's compilation, cuBLAS's workspaces and AdamW's state exist before recording, as
torch.cuda.graphs asks), then is recorded; up to MAX_GRAPHS shapes share one memory pool, later shapes run eagerly.
Graphs sharing a pool may be replayed in any order here because nothing of a replay is read after the next: the loss
and norm are copied out and the gradients and AdamW's state live outside the pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """One optimizer step on one micro-batch, replayed from a CUDA graph per batch shape (module docstring).

    model: the single-process model (its forward returns (logits, loss, state)); autocast_dtype: bf16 or None;
    capture: `capture_for(device)`, or `eager_capture` in tests; optimizer: torch's AdamW with fused=True over the
    model's parameters; max_norm: the gradient clip (inf: none)."""

    def __init__(
        self,
        model: nn.Module,
        autocast_dtype: torch.dtype | None,
        capture: Capture,
        optimizer: torch.optim.Optimizer,
        max_norm: float,
    ) -> None:
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError(
                "training.cuda_graph records the optimizer step, which needs torch's fused AdamW (fused=True): it "
                "skips a non-finite step on the device; build the optimizer with fused=True"
            )
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.capture = capture
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.pool: Any = None
        self.held: list[Tensor] = []  # the gradients and AdamW's state, as first recorded
        self.seen: dict[tuple[Any, ...], int] = {}
        self.graphs: dict[tuple[Any, ...], tuple[Callable[[], None], Tensor, Tensor, Tensor, Tensor]] = {}
        device = next(model.parameters()).device
        self.lrs = [torch.zeros((), device=device) for _ in optimizer.param_groups]  # filled before each step
        self.skip = torch.zeros((), device=device)  # AdamW's found_inf: 1.0 holds the update back

    def __call__(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """One step on (inputs, targets) [B, T]: returns (loss, pre-clip gradient norm), 0-d float64 device tensors,
        after updating the parameters unless either is NaN/Inf. The gradients are left in `.grad`, clipped."""
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])  # this step's rate from the schedule: a write, no host read
        key = (tuple(inputs.shape), tuple(targets.shape), inputs.device)
        if key in self.graphs:
            replay, static_inputs, static_targets, loss, norm = self.graphs[key]
            self._check_held()
            if isinstance(self.model, TitansLM):  # what the recorded forward could not check (a host sync)
                self.model.check_inputs(inputs, targets)
            static_inputs.copy_(inputs)
            static_targets.copy_(targets)
            replay()
            return loss, norm
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] > WARM_UP_STEPS and len(self.graphs) < MAX_GRAPHS:
            self.graphs[key] = self._record(inputs, targets)
            return self(inputs, targets)
        return self._eager(inputs, targets)

    def _gradients(self) -> list[Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _outside_tensors(self) -> list[Tensor]:
        """What a recording writes outside its pool: every gradient and AdamW state tensor, in a fixed order."""
        state = [value for group in self.optimizer.param_groups for p in group["params"]
                 for value in self.optimizer.state.get(p, {}).values() if isinstance(value, Tensor)]  # fmt: skip
        return self._gradients() + state

    def _check_held(self) -> None:
        """The graphs write the tensors recorded at the first recording; a parameter whose `.grad` was set to None
        or replaced since, or an optimizer state loaded since, would silently stop training."""
        now = self._outside_tensors()
        if len(now) != len(self.held) or any(a is not b for a, b in zip(now, self.held, strict=True)):
            raise RuntimeError(
                "a parameter's .grad or the optimizer's state was replaced since the training step was recorded as a "
                "CUDA graph; with training.cuda_graph, zero gradients in place (optimizer.zero_grad(set_to_none="
                "False)) or not at all, and load checkpoints before the first step"
            )

    @contextlib.contextmanager
    def _device_rates(self, recording: bool) -> Iterator[None]:
        """The optimizer's groups hold the device learning rates, and AdamW the skip flag, while the step runs;
        `capturable` is set while recording (torch checks it before recording a step, and warns when set outside)."""
        rates = [group["lr"] for group in self.optimizer.param_groups]
        flags = [group["capturable"] for group in self.optimizer.param_groups]
        try:
            for group, lr, flag in zip(self.optimizer.param_groups, self.lrs, flags, strict=True):
                group["lr"], group["capturable"] = lr, flag or recording
            self.optimizer.found_inf = self.skip  # type: ignore[attr-defined]
            yield
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
            for group, lr, flag in zip(self.optimizer.param_groups, rates, flags, strict=True):
                group["lr"], group["capturable"] = lr, flag

    def _step(self, inputs: Tensor, targets: Tensor, loss_out: Tensor, norm_out: Tensor, recording: bool) -> None:
        """The step's device work, into `loss_out` and `norm_out` (both 0-d float64): what is recorded."""
        device = inputs.device.type
        enabled = self.autocast_dtype is not None
        with torch.autocast(device, dtype=self.autocast_dtype, enabled=enabled, cache_enabled=False):
            _, loss, _ = self.model(inputs, targets)
        loss.backward()
        loss_out.copy_(loss.detach())
        norm_out.copy_(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm))
        torch.logical_not(torch.isfinite(loss_out) & torch.isfinite(norm_out), out=self.skip)
        with self._device_rates(recording):
            self.optimizer.step()

    def _eager(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """A warm-up or unrecorded step: the same work, eagerly (on a side stream on CUDA, as recording asks)."""
        gradients = self._gradients()
        if gradients:  # none before the first step
            torch._foreach_zero_(gradients)
        loss, norm = (torch.zeros((), dtype=torch.float64, device=inputs.device) for _ in range(2))
        if inputs.device.type != "cuda":
            self._step(inputs, targets, loss, norm, recording=False)
            return loss, norm
        side = torch.cuda.Stream(inputs.device)
        side.wait_stream(torch.cuda.current_stream(inputs.device))
        with torch.cuda.stream(side):
            self._step(inputs, targets, loss, norm, recording=False)
        torch.cuda.current_stream(inputs.device).wait_stream(side)
        return loss, norm

    def _record(self, inputs: Tensor, targets: Tensor) -> tuple[Callable[[], None], Tensor, Tensor, Tensor, Tensor]:
        static_inputs, static_targets = inputs.clone(), targets.clone()
        if not self.held:  # made by the warm-up steps; recorded by address from here on
            self.held = self._outside_tensors()
        self._check_held()
        gradients = self._gradients()
        # float64 holds a float32 loss exactly
        loss, norm = (torch.zeros((), dtype=torch.float64, device=inputs.device) for _ in range(2))

        def record() -> None:
            torch._foreach_zero_(gradients)
            with inputs_checked_by_caller():
                self._step(static_inputs, static_targets, loss, norm, recording=True)

        replay, self.pool = self.capture(record, self.pool)
        return replay, static_inputs, static_targets, loss, norm
