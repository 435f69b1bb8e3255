"""generate's fixed-shape decode step as one CUDA graph (`TitansLM.graph_decode`).

Eager, a decoded token is a few hundred small kernels (embedding, per block the memory's read and write and the
attention's ring cache, the head), each launched by the host; at batch 1 the GPU finishes each before the host has
launched the next, so tokens/s is the host's launch rate. The fixed-shape step (`TitansLM._fixed_step`) has the same
shapes at every position and no host synchronisation (torch.compile traces it whole, tests/test_compile.py), so it can
be recorded once and replayed: one launch per token.

`DecodeGraph` owns static copies of the token and of every block's fixed state. The recorded work is the step plus
copying its new states over the static ones, so each replay advances the stream by one token in place; the logits
land in one static tensor, which the caller reads before the next replay. A graph records raw device pointers: every
tensor it reads must stay alive and in place while it is replayed. The parameters do (optimizers update them in
place); the decode-time weight copies (`decode_linear`'s) are built by the warm-up and dropped only by `TitansLM`'s
train/eval switches and at the start of `generate`, so `generate` records a graph per call and drops it at the end.

`capture` is how the step is recorded: `cuda_capture` on a GPU; tests on CPU pass `eager_capture`, which runs the
same static-buffer bookkeeping without a graph, so everything but the recording itself is checked without a GPU
(tests/test_decode_graph.py; the recorded graph against eager decoding in tests/test_cuda.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

Step = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
# capture(record, warm_up) -> (replay, logits): `warm_up` runs the step without changing any static buffer, `record`
# runs it and writes its new states over the static ones; after `replay()`, `logits` holds the step's output.
Capture = Callable[[Callable[[], torch.Tensor], Callable[[], torch.Tensor]], tuple[Callable[[], Any], torch.Tensor]]

WARM_UP_STEPS = 2  # the first builds lazy caches (decode weight copies); the second runs as every later one will


def cuda_capture(
    record: Callable[[], torch.Tensor], warm_up: Callable[[], torch.Tensor]
) -> tuple[Callable[[], Any], torch.Tensor]:
    """Warm the step up on a side stream (as torch.cuda.graphs asks: lazily built tensors and library handles exist
    before recording), then record `record` into a CUDA graph; returns its replay and its static logits."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_STEPS):
            warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = record()
    return graph.replay, logits


def eager_capture(
    record: Callable[[], torch.Tensor], warm_up: Callable[[], torch.Tensor]
) -> tuple[Callable[[], Any], torch.Tensor]:
    """`cuda_capture`'s contract without a graph: each replay runs `record` eagerly into one static logits tensor."""
    logits = torch.empty_like(warm_up())
    return (lambda: logits.copy_(record())), logits


class DecodeGraph:
    """One generation's decode step, recorded: `DecodeGraph(step, token, states)` then `logits = graph(token)` per
    token. token: [B, 1] long; states: the blocks' fixed states (a pytree of tensors) before that token; logits:
    [B, V], overwritten by the next call."""

    def __init__(self, step: Step, token: torch.Tensor, states: Any, capture: Capture = cuda_capture) -> None:
        self.token = token.clone()
        self.states = pytree.tree_map(torch.Tensor.clone, states)
        static = pytree.tree_leaves(self.states)

        def warm_up() -> torch.Tensor:
            return step(self.token, self.states)[0]

        def record() -> torch.Tensor:
            logits, new_states = step(self.token, self.states)
            fresh = pytree.tree_leaves(new_states)
            if len(fresh) != len(static):
                raise RuntimeError(
                    f"the decode step returned {len(fresh)} state tensors for {len(static)} given: its states must "
                    "keep their structure from token to token"
                )
            # Every new state is computed before any is copied over the old ones; one that is a view of a static
            # buffer (not the buffer itself, which needs no copy) is cloned first, so that no copy reads a value
            # another copy has already overwritten.
            held = {t.untyped_storage().data_ptr() for t in static}
            sources = [
                new if new is old or new.untyped_storage().data_ptr() not in held else new.clone()
                for old, new in zip(static, fresh, strict=True)
            ]
            for old, new in zip(static, sources, strict=True):
                if new is not old:
                    old.copy_(new)
            return logits

        self._replay, self.logits = capture(record, warm_up)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Decode `token` [B, 1] on the states the previous call left: the logits [B, V] of the next token."""
        self.token.copy_(token)
        self._replay()
        return self.logits
