"""Task registry: `data.dataset` names a builder in TASKS; make_task(data) builds the task from the DataConfig.

Registering a task is one line in TASKS; `DataConfig` validates `dataset` against this dict. A builder takes the
DataConfig, must be cheap (validation builds one before any tensor exists, so corpora are read lazily) and raises
`ConfigError` naming the `data.*` key to change when the layout does not fit. The synthetic tasks of the seed are
their own builders (classes taking the DataConfig); the evaluation tasks, which also take plain keyword arguments,
register their `from_config` classmethod.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from titans.tasks.base import IGNORE_INDEX, Batch, Task, is_data_config
from titans.tasks.copy import CopyTask
from titans.tasks.mqar import MQAR
from titans.tasks.needle import NeedleTask
from titans.tasks.niah import SNIAH
from titans.tasks.patterns import PatternTask
from titans.tasks.text import TextTask

if TYPE_CHECKING:
    from titans.config import DataConfig

TASKS: dict[str, Callable[[DataConfig], Task]] = {
    "copy_task": CopyTask,
    "language_modeling": PatternTask,
    "needle_haystack": NeedleTask,
    "mqar": MQAR.from_config,  # Zoology multi-query associative recall
    "niah": SNIAH.from_config,  # RULER single-needle NIAH, byte level
    "text": TextTask.from_config,  # byte-level LM on a UTF-8 file or Penn Treebank
}


def make_task(data_cfg: DataConfig) -> Task:
    """The task named by data_cfg.dataset, configured by data_cfg (sizes, vocabulary, task-specific keys)."""
    if not is_data_config(data_cfg):
        raise TypeError(f"make_task expects a DataConfig, got {type(data_cfg).__name__}")
    return TASKS[data_cfg.dataset](data_cfg)


__all__ = [
    "IGNORE_INDEX",
    "MQAR",
    "SNIAH",
    "TASKS",
    "Batch",
    "CopyTask",
    "NeedleTask",
    "PatternTask",
    "Task",
    "TextTask",
    "make_task",
]
