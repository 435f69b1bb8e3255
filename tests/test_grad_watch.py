"""GradientWatch: spikes of the pre-clip gradient norm are counted and said on the 1st, 10th, 100th ... one."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from titans.grad_watch import GradientWatch


def watch_over(norms, has_memory=True, **kwargs):
    watch = GradientWatch(has_memory, Path("runs/x"), **kwargs)
    said = {}
    for step, norm in enumerate(norms, 1):
        message = watch.check(step, norm)
        if message is not None:
            said[step] = message
    return watch, said


def test_a_noisy_healthy_run_has_no_spikes():
    rng = random.Random(0)
    # norms spread over a factor of ~50 (log-uniform), drifting down tenfold as training settles
    norms = [10 ** (rng.uniform(-0.85, 0.85) - step / 500) for step in range(500)]
    watch, said = watch_over(norms)
    assert watch.spikes == 0 and said == {}


def test_an_exploded_run_counts_every_step_and_speaks_on_powers_of_ten():
    norms = [1.0 + 0.1 * (step % 3) for step in range(40)] + [10.0 ** (3 + step % 5) for step in range(150)]
    watch, said = watch_over(norms)
    # the median is of ordinary steps only, so an explosion that stays keeps counting
    assert watch.spikes == 150
    assert sorted(said) == [41, 50, 140]
    assert "step 41: gradient norm 1e+03 is 909x the median" in said[41]
    assert "1 such step so far" in said[41] and "100 such steps so far" in said[140]
    assert "scripts/gradient_growth.py --run runs/x" in said[41] and "exact_last_layer=true" in said[41]


def test_a_spike_needs_warmup_steps_before_it_counts_and_the_baseline_gets_no_memory_advice():
    watch, said = watch_over([1.0] * 5 + [1e6], warmup=20)
    assert watch.spikes == 0
    watch, said = watch_over([1.0] * 20 + [1e6, 1.0], has_memory=False)
    assert watch.spikes == 1 and list(said) == [21]
    assert "gradient_growth" not in said[21] and "teach little" in said[21]


def test_non_finite_norms_are_left_to_the_nan_policy():
    watch, said = watch_over([1.0] * 30 + [math.inf, math.nan, 1.0])
    assert watch.spikes == 0 and said == {}


@pytest.mark.parametrize("kwargs", [{"factor": 1.0}, {"warmup": 0}, {"window": 10, "warmup": 20}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="warmup"):
        GradientWatch(True, Path("."), **kwargs)
