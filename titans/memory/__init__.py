"""The neural long-term memory (paper §3): reference loop, chunk-parallel form, fused scan, NeuralMemory layer."""

from titans.memory.chunked import chunked_memory
from titans.memory.fused import fused_memory
from titans.memory.module import NeuralMemory, NeuralMemoryState
from titans.memory.naive import naive_memory
from titans.memory.network import MemoryMLP
from titans.memory.state import MemoryState
from titans.memory.step import step_memory

__all__ = [
    "MemoryMLP",
    "MemoryState",
    "NeuralMemory",
    "NeuralMemoryState",
    "chunked_memory",
    "fused_memory",
    "naive_memory",
    "step_memory",
]
