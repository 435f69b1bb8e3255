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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from titans.config import ModelConfig
from titans.models.layers import ResidualProjection, RMSNorm
from titans.tasks.base import IGNORE_INDEX

INIT_STD = 0.02


@dataclass
class LMState:
    """What TitansLM carries between calls on one stream.

    block_states: one state per block, in order (None = that block has not started). prefix_emitted: whether the
    persistent tokens were already fed at the start of this stream (they are fed once, never again).
    """

    block_states: list[Any]
    prefix_emitted: bool


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


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
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.persistent = nn.Parameter(torch.empty(n_prefix, cfg.d_model)) if n_prefix > 0 else None
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
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

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: LMState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, LMState]:
        """idx [B, T] long -> (logits [B, T, V], loss or None, state to continue the stream).

        loss: cross-entropy in at least float32, averaged over targets != IGNORE_INDEX (0 if none is scored).
        """
        if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a [B, T] long tensor with T >= 1, got {idx.dtype} {tuple(idx.shape)}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if state is not None and len(state.block_states) != len(self.blocks):
            raise ValueError(
                f"state has {len(state.block_states)} block states but the model has {len(self.blocks)} blocks; "
                "pass the state this model returned, or None to start a stream"
            )
        B = idx.shape[0]
        x = self.embed(idx)
        emit_prefix = self.persistent is not None and (state is None or not state.prefix_emitted)
        if emit_prefix:
            x = torch.cat([self.persistent.to(x.dtype).expand(B, -1, -1), x], dim=1)
        block_states = [None] * len(self.blocks) if state is None else state.block_states
        new_states = []
        for block, block_state in zip(self.blocks, block_states, strict=True):
            x, block_state = block(x, block_state)
            new_states.append(block_state)
        if emit_prefix:
            # the persistent positions carry no token to predict
            x = x[:, self.n_prefix :]
        logits = self.head(self.norm(x))

        loss = None
        if targets is not None:
            flat = logits.reshape(-1, logits.shape[-1])
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
            # a batch with nothing to score gives loss 0 (no gradient) rather than 0/0 = NaN
            loss = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        prefix_emitted = emit_prefix or (state is not None and state.prefix_emitted)
        return logits, loss, LMState(new_states, prefix_emitted)

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
        if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a [B, T0] long prompt with T0 >= 1, got {idx.dtype} {tuple(idx.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no truncation), got {top_k}")

        out = idx
        logits, _, state = self(idx)
        for step in range(max_new_tokens):
            next_token = self._sample(logits[:, -1], temperature, top_k, generator)
            out = torch.cat([out, next_token], dim=1)
            if step == max_new_tokens - 1:
                break
            if use_cache:
                logits, _, state = self(next_token, state=state)
            else:
                logits, _, _ = self(out)
        return out

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
