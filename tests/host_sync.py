"""A check that code could be recorded as a CUDA graph: it neither synchronises with the host nor copies host data.

A CUDA graph records device work only. Reading a tensor's value on the host (`.item()`, `int(t)`, `bool(t)`, a shape
that depends on values such as `nonzero`'s) or building a tensor from Python data (`torch.tensor([...], device=...)`)
inside the recorded region fails on a GPU, and no CPU test would otherwise notice. `HostSyncs` watches the operators
torch dispatches while it is active and lists each such one with the line of titans code that asked for it, so CPU
tests can hold the recorded regions (tests/test_train_graph.py, tests/test_decode_graph.py) free of them.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# aten operators that read values on the host or make a tensor from host data
FLAGGED = {
    "_local_scalar_dense",  # .item(), int(), float(), bool() of a tensor
    "lift_fresh",  # torch.tensor(data)
    "lift_fresh_copy",
    "nonzero",  # value-dependent output shapes
    "masked_select",
    "_unique2",
    "unique_dim",
    "equal",  # a Python bool
    "is_nonzero",
}


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as found: ...` then `found.hits`: Counter of (operator, "file:line code") it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in FLAGGED:
            ours = [f for f in traceback.extract_stack() if "/titans/" in f.filename and "/tests/" not in f.filename]
            where = f"{ours[-1].filename.rsplit('/titans/', 1)[-1]}:{ours[-1].lineno} {ours[-1].line}" if ours else "?"
            self.hits[(name, where)] += 1
        return func(*args, **(kwargs or {}))
