"""titans: Titans (Behrouz, Zhong, Mirrokni 2025) in PyTorch: the neural long-term memory and MAC/MAG/MAL/LMM.

The public API, importable from here:

    from titans import ModelConfig, build_model                 # a model: baseline, LMM, MAC, MAG or MAL
    from titans import NeuralMemory, fused_memory, chunked_memory, naive_memory   # the memory, as a layer or a function
    from titans import load_config, load_trained                # a run's config, and a trained model back
    from titans.train import train                               # a training run (the module keeps its name)
"""

from titans.config import ConfigError, DataConfig, MemoryConfig, ModelConfig, RunConfig, TrainingConfig, load_config
from titans.memory import (
    MemoryMLP,
    MemoryState,
    NeuralMemory,
    NeuralMemoryState,
    chunked_memory,
    fused_memory,
    naive_memory,
    step_memory,
)
from titans.models import LMState, TitansLM, build_model, num_parameters
from titans.run import load_trained
from titans.tasks import Batch, Task, make_task

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ConfigError",
    "DataConfig",
    "LMState",
    "MemoryConfig",
    "MemoryMLP",
    "MemoryState",
    "ModelConfig",
    "NeuralMemory",
    "NeuralMemoryState",
    "RunConfig",
    "Task",
    "TitansLM",
    "TrainingConfig",
    "__version__",
    "build_model",
    "chunked_memory",
    "fused_memory",
    "load_config",
    "load_trained",
    "make_task",
    "naive_memory",
    "num_parameters",
    "step_memory",
]
