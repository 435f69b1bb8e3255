"""Run configuration: typed dataclasses are the source of truth; YAML files store them.

The seed's schema (model / data / training sections) loads unchanged; new keys extend it. Every dataclass checks
and coerces its own fields in `__post_init__` (so a bad value fails when the object is made, before any tensor),
and `RunConfig` checks the combinations that span sections.

    cfg = load_config("config.yaml", ["training.learning_rate=3e-4", "model.memory.chunk_size=8"])
    save_config(cfg, "runs/x/config.yaml")  # load_config of that file gives back an equal RunConfig

The loader is strict: an unknown key, a value of the wrong type or an impossible combination raises `ConfigError`
naming the full dotted key and what to change. `ConfigError` is the only exception `load_config` lets escape.

Modules: `model`, `data`, `training` (the sections), `run` (`RunConfig`), `coerce` (value checks and conversion),
`load` (YAML, overrides, load and save); `ConfigError` lives in `titans.errors`.
"""

from titans.config.data import DataConfig
from titans.config.load import all_keys, config_to_dict, load_config, save_config
from titans.config.model import MAX_VOCAB, VARIANTS, MemoryConfig, ModelConfig
from titans.config.run import FLEX_ON_CPU_ERROR, RunConfig
from titans.config.training import TrainingConfig
from titans.errors import ConfigError

__all__ = [
    "FLEX_ON_CPU_ERROR",
    "MAX_VOCAB",
    "VARIANTS",
    "ConfigError",
    "DataConfig",
    "MemoryConfig",
    "ModelConfig",
    "RunConfig",
    "TrainingConfig",
    "all_keys",
    "config_to_dict",
    "load_config",
    "save_config",
]
