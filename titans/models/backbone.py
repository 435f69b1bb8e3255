"""The Llama-style language model shared by all five variants; only the blocks differ.

token embedding -> [n_prefix persistent tokens || sequence] (first call of a stream only) -> blocks -> RMSNorm ->
untied LM head. Persistent tokens (paper Eq. 19; MAG Eq. 26, MAL Eq. 29) are learnable, input-independent vectors
prepended to the embedded sequence; their outputs are dropped before the head, so logits line up with the input tokens.

Block protocol, which every variant implements:
    block(x [B, T, D], state: Any | None) -> (x [B, T, D], new_state)
state None means the start of a stream; a block keeps its own absolute position and caches inside its state, so
feeding a stream in pieces with the returned states must equal one call.

Init (GPT-2): every nn.Linear and nn.Embedding ~ N(0, 0.02), biases 0; ResidualProjection layers use std
0.02 / sqrt(2 * n_layers). A module that needs its own init (e.g. memory gate biases) defines `init_weights(self)`;
it runs after these defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from titans.config import ModelConfig
from titans.memory.module import NeuralMemory
from titans.memory.step import decode_linear, drop_weight_caches
from titans.models.decode_graph import Capture, DecodeGraph, cuda_capture
from titans.models.layers import ResidualProjection, RMSNorm
from titans.system import compile_options
from titans.tasks.base import IGNORE_INDEX

INIT_STD = 0.02
# MemoryConfig fields that pick an algorithm for the same function, not a different model (see model_signature).
_COMPUTE_ONLY_MEMORY_FIELDS = ("impl", "checkpoint_every")


@dataclass
class LMState:
    """What TitansLM carries between calls on one stream.

    block_states: one state per block, in order (None = that block has not started). prefix_emitted: whether the
    persistent tokens were already fed at the start of this stream (they are fed once, never again).
    signature / batch_size: stamped by the model that returned the state, so that passing it to a model of another
    configuration, or with another batch size, fails with a clear error before any compute (None = not stamped,
    e.g. a hand-made fresh state; then only the block count is checked).
    """

    block_states: list[Any]
    prefix_emitted: bool
    signature: str | None = None
    batch_size: int | None = None


def detach_state(state: Any) -> Any:
    """A copy of a model's streaming state with every tensor detached (truncated back-propagation through time).

    Works on any nesting of dataclasses, lists, tuples and dicts: every model's state is built from those.
    """
    if isinstance(state, torch.Tensor):
        return state.detach()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(
            state, **{f.name: detach_state(getattr(state, f.name)) for f in dataclasses.fields(state) if f.init}
        )
    if isinstance(state, list | tuple):
        return type(state)(detach_state(item) for item in state)
    if isinstance(state, dict):
        return {key: detach_state(value) for key, value in state.items()}
    return state


def model_signature(cfg: ModelConfig, n_prefix: int) -> str:
    """A readable identity of a model configuration, e.g. "MAG(d_model=64, n_heads=4, n_layers=2, vocab=14) #3fa1c2d0".

    The hash covers every field of cfg that shapes the model or its state; the memory's `impl` and
    `checkpoint_every` only change how the same function is computed, so states pass freely between such models.
    The readable part is what error messages show.
    """
    fields = asdict(cfg)
    fields["memory"] = {k: v for k, v in fields["memory"].items() if k not in _COMPUTE_ONLY_MEMORY_FIELDS}
    digest = hashlib.sha1(json.dumps([fields, n_prefix], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return (
        f"{cfg.variant}(d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_layers={cfg.n_layers}, "
        f"vocab={cfg.vocab_size}) #{digest}"
    )


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


# Set while a caller that checked the inputs itself records the forward (train_graph.GraphedStep): the token-range
# checks read the ids on the host, a synchronisation a CUDA graph cannot record.
_inputs_checked_by_caller = contextvars.ContextVar("inputs_checked_by_caller", default=False)


@contextlib.contextmanager
def inputs_checked_by_caller() -> Iterator[None]:
    """Within it, `TitansLM.forward` skips its data-dependent input checks: the caller ran `check_inputs`."""
    token = _inputs_checked_by_caller.set(True)
    try:
        yield
    finally:
        _inputs_checked_by_caller.reset(token)


def _skip_guard_checks() -> contextlib.AbstractContextManager:
    """torch.compile's stance without per-call guard checks, unless the caller chose a stance of their own
    (force_eager, fail_on_recompile, ...), which is kept. torch has no public getter for the current stance; without
    the private one this keeps the guards."""
    current = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", None)
    if current != "default":
        return contextlib.nullcontext()
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


class TitansLM(nn.Module):
    """Decoder-only LM: embedding, optional persistent tokens, cfg.n_layers blocks from make_block, norm, head.

    make_block(cfg, layer_index) builds block layer_index (0-based). n_prefix persistent tokens are prepended on the
    first call of each stream.
    """

    def __init__(
        self, cfg: ModelConfig, make_block: Callable[[ModelConfig, int], nn.Module], n_prefix: int = 0
    ) -> None:
        super().__init__()
        if cfg.vocab_size is None or cfg.vocab_size < 1:
            raise ValueError(f"cfg.vocab_size must be a positive int (set it from the task), got {cfg.vocab_size}")
        if cfg.d_model < 1 or cfg.n_layers < 1:
            raise ValueError(f"need d_model >= 1 and n_layers >= 1, got d_model={cfg.d_model}, n_layers={cfg.n_layers}")
        if n_prefix < 0:
            raise ValueError(f"n_prefix must be >= 0, got {n_prefix}")
        self.cfg = cfg
        self.n_prefix = n_prefix
        # Taken now: cfg may be edited after construction, but the modules were built from these values.
        self.signature = model_signature(cfg, n_prefix)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.persistent = nn.Parameter(torch.empty(n_prefix, cfg.d_model)) if n_prefix > 0 else None
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._compiled_step = None  # compile_decode()
        self._decode_capture: Capture | None = None  # graph_decode()
        self._init_parameters()

    def _init_parameters(self) -> None:
        residual_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(
                    module.weight, 0.0, residual_std if isinstance(module, ResidualProjection) else INIT_STD
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
        if self.persistent is not None:
            nn.init.normal_(self.persistent, 0.0, INIT_STD)
        # custom inits last, so a block's own choices override the defaults above
        for module in self.modules():
            if module is not self and callable(getattr(module, "init_weights", None)):
                module.init_weights()

    def train(self, mode: bool = True) -> TitansLM:
        """nn.Module.train (and so eval), which also drops the decode-time copies of weights (`drop_weight_caches`):
        a fused optimizer's updates leave the version counters those copies are keyed on unchanged."""
        drop_weight_caches(self)
        return super().train(mode)

    def compile_blocks(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run each block's sequential inner loop through torch.compile (eager when enabled is False).

        MAC blocks compile their whole per-segment step (`MACBlock.compile_segments`, which includes the memory);
        in LMM, MAG and MAL the memory compiles its per-chunk step (`NeuralMemory.compile_chunks`) when it runs
        `chunked_memory` (the default fused scan is faster and is kept); the baseline has no such loop and is left
        as it is. Compiled and eager results are equal (tests/test_compile.py); inductor on CPU needs a C++ compiler.
        """
        for block in self.blocks:
            if callable(getattr(block, "compile_segments", None)):
                block.compile_segments(enabled, backend)
                continue
            for module in block.modules():
                if isinstance(module, NeuralMemory):
                    module.compile_chunks(enabled, backend)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: LMState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, LMState]:
        """idx [B, T] long -> (logits [B, T, V], loss or None, state to continue the stream).

        loss: cross-entropy in at least float32, averaged over targets != IGNORE_INDEX (0 if none is scored).
        Raises, before any compute, TypeError for a non-tensor idx/targets/state and ValueError for a wrong dtype or
        rank, an empty batch, ids outside [0, vocab_size), or a state from a model of another configuration or
        for another batch size.
        """
        if not _inputs_checked_by_caller.get():
            self.check_inputs(idx, targets, state)
        return self._forward(idx, targets, state)

    def check_inputs(self, idx: Any, targets: Any = None, state: Any = None) -> None:
        """forward's input checks (its docstring lists the errors); one host synchronisation for the id ranges."""
        self._check_tokens(idx, "idx")
        if targets is not None:
            self._check_targets(targets, idx)
        if state is not None:
            self._check_state(state, idx.shape[0])

    def _forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None, state: LMState | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, LMState]:
        """`forward` after its checks (generate calls it directly for tokens it sampled itself, already valid)."""
        B = idx.shape[0]
        x = self.embed(idx)
        emit_prefix = self.persistent is not None and (state is None or not state.prefix_emitted)
        if emit_prefix:
            x = torch.cat([self.persistent.to(x.dtype).expand(B, -1, -1), x], dim=1)
        block_states = [None] * len(self.blocks) if state is None else state.block_states
        x, new_states = self._run_blocks(x, block_states)
        if emit_prefix:
            # the persistent positions carry no token to predict
            x = x[:, self.n_prefix :]
        if x.shape[1] == 1 and not torch.is_grad_enabled():
            # decoding: the head as one matmul against a cached transposed copy of its weight
            logits = decode_linear(self.norm(x[:, 0]), self.head).unsqueeze(1)
        else:
            logits = self.head(self.norm(x))

        loss = None
        if targets is not None:
            flat = logits.reshape(-1, logits.shape[-1])
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            # a batch with nothing to score gives loss 0 (no gradient) rather than 0/0 = NaN
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        prefix_emitted = emit_prefix or (state is not None and state.prefix_emitted)
        return logits, loss, LMState(new_states, prefix_emitted, self.signature, B)

    def _run_blocks(self, x: torch.Tensor, block_states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """x [B, T, D] through every block in order, each over the whole sequence -> (x, the blocks' new states).

        block_states: one per block, None for a fresh stream. Subclasses may reorder the work (MACLM runs segment by
        segment through all blocks) as long as the results are the same.
        """
        new_states = []
        for block, block_state in zip(self.blocks, block_states, strict=True):
            x, block_state = block(x, block_state)
            new_states.append(block_state)
        return x, new_states

    # ---- input validation: every check runs before any compute and names the bad value and the fix

    def _check_tokens(self, idx: Any, name: str) -> None:
        """idx must be a [B, T] long tensor, B, T >= 1, with ids in [0, vocab_size)."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype != torch.long:
            raise ValueError(
                f"{name} must be a [B, T] long (int64) tensor of token ids, got dtype {idx.dtype}; convert with "
                f"{name}.long()"
            )
        if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
            raise ValueError(
                f"{name} must be a [B, T] long tensor with B >= 1 and T >= 1, got shape {tuple(idx.shape)}; "
                f"add a batch dimension with {name}.unsqueeze(0) for a single sequence"
            )
        # A data-dependent check (a host sync); skipped while torch.compile traces, where it would break the graph.
        if not torch.compiler.is_compiling():
            low, high = (int(v) for v in idx.aminmax())
            vocab = self.cfg.vocab_size
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{name} holds token id {bad}, outside the vocabulary [0, {vocab}); check the tokenizer, or "
                    f"build the model with model.vocab_size > {high}"
                )

    def _check_targets(self, targets: Any, idx: torch.Tensor) -> None:
        """targets must be a long tensor shaped like idx, holding ids in [0, vocab_size) or IGNORE_INDEX."""
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if targets.dtype != torch.long:
            raise ValueError(f"targets must be a long (int64) tensor, got dtype {targets.dtype}; use targets.long()")
        if not torch.compiler.is_compiling():
            scored = targets[targets != IGNORE_INDEX]
            if scored.numel() > 0:
                low, high = (int(v) for v in scored.aminmax())
                vocab = self.cfg.vocab_size
                if low < 0 or high >= vocab:
                    bad = low if low < 0 else high
                    raise ValueError(
                        f"targets hold id {bad}, outside the vocabulary [0, {vocab}); unscored positions must be "
                        f"IGNORE_INDEX ({IGNORE_INDEX})"
                    )

    def _check_state(self, state: Any, batch_size: int) -> None:
        """state must be an LMState this model (or one of the same configuration) returned for this batch size."""
        if not isinstance(state, LMState):
            raise TypeError(
                f"state must be the LMState a previous call returned, or None to start a stream; got "
                f"{type(state).__name__}"
            )
        if state.signature is not None and state.signature != self.signature:
            raise ValueError(
                f"state was made by a different model, {state.signature}, but this model is {self.signature}; "
                "pass the state this model returned, or None to start a stream"
            )
        if len(state.block_states) != len(self.blocks):
            raise ValueError(
                f"state has {len(state.block_states)} block states but the model has {len(self.blocks)} blocks; "
                "pass the state this model returned, or None to start a stream"
            )
        if state.batch_size is not None and state.batch_size != batch_size:
            raise ValueError(
                f"state holds {state.batch_size} sequences but idx has batch size {batch_size}; continue each "
                "stream with its own batch, or pass state=None to start new streams"
            )

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue idx [B, T0] by max_new_tokens sampled tokens -> [B, T0 + max_new_tokens].

        temperature 0 or top_k 1 is greedy. use_cache=True prefills the prompt once and then feeds one token at a time
        with the carried state; use_cache=False re-runs the whole sequence every step (the reference).
        """
        self._check_tokens(idx, "idx")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (no truncation), got {top_k!r}")

        drop_weight_caches(self)  # built afresh from the weights as they are now (see `train`)
        new_tokens: list[torch.Tensor] = []
        logits, _, state = self(idx)
        logits = logits[:, -1]
        fixed = self._fixed_states(state, idx.shape[1] + max_new_tokens) if use_cache else None
        graph = None
        with contextlib.ExitStack() as guards:
            for step in range(max_new_tokens):
                next_token = self._sample(logits, temperature, top_k, generator)
                new_tokens.append(next_token)
                if step == max_new_tokens - 1:
                    break
                if fixed is not None and self._decode_capture is not None:
                    if graph is None:  # recorded per call: the weight copies it reads were rebuilt above
                        if self._decode_capture is cuda_capture:
                            self._require_cuda(idx.device)
                        decode = self._compiled_step or self._fixed_step
                        graph = DecodeGraph(decode, next_token, fixed, self._decode_capture)
                    logits = graph(next_token)
                elif fixed is not None and self._compiled_step is not None:
                    logits, fixed = self._compiled_step(next_token, fixed)
                    if step == 0:
                        # The first call checked every guard (or compiled). Later calls get the previous step's outputs
                        # and a token of the same shape: the same shapes, strides and dtypes by construction, and the
                        # parameters cannot change inside this loop, so re-checking every tensor guard per token (a
                        # measurable share of a step) is skipped; guards that tell apart other compilations (batch
                        # sizes) still run.
                        guards.enter_context(_skip_guard_checks())
                elif fixed is not None:
                    logits, fixed = self._fixed_step(next_token, fixed)
                elif use_cache:
                    # the prompt and the state were checked by the first call; sampled ids are in the vocabulary by
                    # construction, so each step skips forward's validation (a host sync per token)
                    logits, _, state = self._forward(next_token, None, state)
                    logits = logits[:, -1]
                else:
                    logits = self(torch.cat([idx, *new_tokens], dim=1))[0][:, -1]
        return torch.cat([idx, *new_tokens], dim=1)

    def compile_decode(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run `generate`'s cached one-token step through torch.compile (eager when enabled is False).

        The step (`_fixed_step`: embedding, every block's `decode_fixed`, norm, head) has fixed shapes and carries the
        position as a tensor, so one compilation serves a whole generation and every later one with the same batch
        size and dtype. Its results equal the eager step's (tests/test_compile.py). It applies when every block has a
        fixed-shape decode (all five variants do) and the memory writes normally (no stats probe, writes on).
        The first generation pays the compilation (once per inductor cache; timed in benchmarks/README.md);
        inductor on CPU needs a C++ compiler. backend: torch.compile's ("aot_eager" for tests).
        """
        options = compile_options(backend, self.head.weight.device.type)
        self._compiled_step = (
            torch.compile(self._fixed_step, dynamic=False, fullgraph=True, backend=backend, options=options)
            if enabled
            else None
        )

    def graph_decode(self, enabled: bool = True) -> None:
        """Replay `generate`'s cached one-token step as a CUDA graph (eager launches when enabled is False).

        Each `generate` call records the fixed-shape step (`_fixed_step`, or the compiled one after `compile_decode`)
        once after two warm-up tokens and replays it for every later token: one launch per token instead of one per
        kernel (`decode_graph.py`). Results equal the eager step's (tests/test_cuda.py). It applies where the fixed
        step does (`compile_decode`'s conditions); elsewhere `generate` decodes as without it. Needs the model on a
        CUDA device.
        """
        if enabled:
            self._require_cuda(self.head.weight.device)
        self._decode_capture = cuda_capture if enabled else None

    @staticmethod
    def _require_cuda(device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"graph_decode records CUDA graphs, but the model is on {device.type}; move it to a GPU "
                "(model.to('cuda')) or call graph_decode(False)"
            )

    def _fixed_states(self, state: LMState, capacity: int) -> list[Any] | None:
        """Every block's state in fixed-shape form (`block.fixed_state`), or None when some block has none or a memory
        is probed, read-only or ablated (`NeuralMemory.plain` false), which the fixed step does not implement.
        capacity: stream positions the decode may reach (full attention preallocates its cache to it)."""
        for module in self.modules():
            if isinstance(module, NeuralMemory) and not module.plain:
                return None
        if torch.is_autocast_enabled(self.head.weight.device.type):
            return None
        if not all(callable(getattr(block, "decode_fixed", None)) for block in self.blocks):
            return None
        capacity += self.n_prefix
        return [block.fixed_state(s, capacity) for block, s in zip(self.blocks, state.block_states, strict=True)]

    def _fixed_step(self, token: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One decoded token on fixed-shape block states: token [B, 1] -> (logits [B, V], states after it)."""
        x = self.embed(token[:, 0])  # [B, D]
        new_states = []
        for block, state in zip(self.blocks, states, strict=True):
            x, state = block.decode_fixed(x, state)
            new_states.append(state)
        return decode_linear(self.norm(x), self.head), new_states

    @staticmethod
    def _sample(
        logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """logits [B, V] -> next tokens [B, 1]."""
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
