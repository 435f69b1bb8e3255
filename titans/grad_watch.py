"""Gradient spikes in training: a step whose pre-clip gradient norm is far above the recent ones, said out loud.

The gradient clip (training.gradient_clip) keeps such a step's update bounded, so a run with spikes does not diverge;
it just stops learning, because every clipped step then points along the one direction that blew up. Its loss curve
looks like a plateau, and nothing in the log says why. In the memory variants the usual cause is the memory's
chunk-start write turning unstable as training moves its gates and keys (docs/results.md, "Why MAC's gradient norms
exploded on S-NIAH"): the gradient then grows exponentially with the sequence length. `GradientWatch` counts steps
whose norm is over `factor` times the median of the last `window` ordinary steps and words a warning on the 1st,
10th, 100th, ... such step; the count goes into the run's result.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path


class GradientWatch:
    """Counts gradient-norm spikes: a step over `factor` x the median norm of the last `window` steps that were not
    spikes themselves (so a run that stays exploded keeps counting), once `warmup` such steps are known."""

    def __init__(self, has_memory: bool, run_path: Path, window: int = 50, factor: float = 100.0, warmup: int = 20):
        if window < 1 or warmup < 1 or warmup > window or factor <= 1:
            raise ValueError(f"need 1 <= warmup <= window and factor > 1, got {warmup}, {window}, {factor}")
        self.has_memory, self.run_path = has_memory, run_path
        self.factor, self.warmup = factor, warmup
        self.recent: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def check(self, step: int, grad_norm: float) -> str | None:
        """Record step `step`'s (1-based) pre-clip norm; the warning to print when this spike is the 1st, 10th,
        100th, ... one. Non-finite norms are training.nan_policy's business and are not counted."""
        if not math.isfinite(grad_norm):
            return None
        median = statistics.median(self.recent) if len(self.recent) >= self.warmup else None
        if median is None or grad_norm <= self.factor * median:
            self.recent.append(grad_norm)
            return None
        self.spikes += 1
        if not _power_of_ten(self.spikes):
            return None
        return self._message(step, grad_norm, median)

    def _message(self, step: int, grad_norm: float, median: float) -> str:
        said = (
            f"step {step}: gradient norm {grad_norm:.3g} is {grad_norm / median:,.0f}x the median of recent steps "
            f"({median:.3g}); {self.spikes} such step{'s' if self.spikes > 1 else ''} so far. The clip bounds each "
            "update, but steps like these teach little."
        )
        if self.has_memory:
            said += (
                " In a memory variant this is usually the memory's chunk-start write turning unstable (docs/results.md,"
                ' "Why MAC\'s gradient norms exploded on S-NIAH"): `python scripts/gradient_growth.py --run '
                f"{self.run_path}` measures it from a checkpoint; model.memory.exact_last_layer=true, or a smaller "
                "model.memory.theta_init or eta_init, keeps the write stable."
            )
        return said


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
