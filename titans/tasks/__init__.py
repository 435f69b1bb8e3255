"""Task registry: `data.dataset` names a class in TASKS; make_task(data) builds it from the DataConfig.

Registering a task is one line in TASKS; `DataConfig` validates `dataset` against this dict. A registered class
takes the DataConfig, must be cheap to construct (validation builds one before any tensor exists) and raises
`ConfigError` naming the `data.*` key to change when the layout does not fit.
"""

from __future__ import annotations

from titans.config import DataConfig
from titans.tasks.base import IGNORE_INDEX, Batch, Task
from titans.tasks.copy import CopyTask
from titans.tasks.needle import NeedleTask
from titans.tasks.patterns import PatternTask

TASKS: dict[str, type] = {
    "copy_task": CopyTask,
    "language_modeling": PatternTask,
    "needle_haystack": NeedleTask,
}


def make_task(data_cfg: DataConfig) -> Task:
    """The task named by data_cfg.dataset, configured by data_cfg (sizes, vocabulary, task-specific keys)."""
    if not isinstance(data_cfg, DataConfig):
        raise TypeError(f"make_task expects a DataConfig, got {type(data_cfg).__name__}")
    return TASKS[data_cfg.dataset](data_cfg)


__all__ = ["IGNORE_INDEX", "TASKS", "Batch", "CopyTask", "NeedleTask", "PatternTask", "Task", "make_task"]
