"""MAC, Memory as a Context (v1 §4.1, Eqs. 21-25, Figures 2 and 3a).

The sequence is cut into segments of C = `segment_len` tokens. For segment s, with M*_{s-1} the memory committed at
the end of segment s-1:

    h   = M*_{s-1}(q),  q = S W_Q                    Eq. 21: retrieve the past, no update
    S~  = [p_1 .. p_Np] || h || S                    Eq. 22: persistent tokens, retrieved tokens, the segment
    y   = Attn(S~)                                   Eq. 23: attention inside the segment only
    M_t = M_{t-1}(y_t)                               Eq. 24: write the attention output into the memory
    o   = y (x) M*(y)                                Eq. 25: read it back after the write

Causality (the paper leaves it open; see docs/paper_alignment.md): token i of a segment attends to all persistent
tokens, to h_j and to S_j for j <= i only. The write is per token, so M*(y_i) reads the state that holds y_1..y_i and
nothing later (the chunked memory's per-token states). Across segments information flows only through the memory.
(x) is GatedCombine: RMSNorm(y) * sigmoid(RMSNorm(M*(y))). Each block then adds a SwiGLU MLP.

Streaming: the state holds the memory (written up to the last token), the committed memory M*_{s-1}, and the keys and
values of the current segment's retrieved and input tokens — at most 2C positions, so decoding cost is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titans.config import ModelConfig
from titans.memory import MemoryState, NeuralMemory, NeuralMemoryState
from titans.memory.module import CausalDepthwiseConv
from titans.models.backbone import TitansLM
from titans.models.layers import GatedCombine, RMSNorm, SwiGLU, apply_rope, rope_cache, swiglu_hidden


@dataclass
class MACState:
    """memory: the memory after every write so far; committed: M*_{s-1}, read by Eq. 21 for the current segment;
    retrieve_conv: the retrieval query conv's history [B, D, K-1];
    keys/values: rotated k/v of the current segment's retrieved tokens ("h") and input tokens ("x"), [B, H, n, Dh];
    position: tokens of the stream seen by this block."""

    memory: NeuralMemoryState
    committed: MemoryState
    retrieve_conv: torch.Tensor
    h_keys: torch.Tensor
    h_values: torch.Tensor
    x_keys: torch.Tensor
    x_values: torch.Tensor
    position: int


class MACBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        d = cfg.d_model
        if d % cfg.n_heads or (d // cfg.n_heads) % 2:
            raise ValueError(f"n_heads ({cfg.n_heads}) must divide d_model ({d}) into even head sizes (RoPE)")
        self.segment_len = cfg.segment_len
        self.n_persistent = cfg.persistent_memory_size
        self.heads, self.head_dim, self.rope_base = cfg.n_heads, d // cfg.n_heads, cfg.rope_base
        self.norm = RMSNorm(d)
        self.memory = NeuralMemory.from_config(cfg)
        # Eq. 21's W_Q: the read of M*_{s-1} has its own query projection (the memory's own q path runs over y),
        # followed like every q/k/v projection by the short causal conv of v1 §4.4
        self.retrieve_query = nn.Linear(d, d, bias=False)
        self.retrieve_conv = CausalDepthwiseConv(d, cfg.memory.conv_kernel)
        self.retrieve_norm = nn.Parameter(torch.ones(self.memory.head_dim))
        self.retrieve_out = nn.Linear(d, d, bias=False)
        self.persistent = nn.Parameter(torch.zeros(self.n_persistent, d)) if self.n_persistent > 0 else None
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.combine = GatedCombine(d)
        self.mlp_norm = RMSNorm(d)
        self.mlp = SwiGLU(d, swiglu_hidden(d, cfg.mlp_ratio))

    def init_weights(self) -> None:
        if self.persistent is not None:
            nn.init.normal_(self.persistent, 0.0, 0.02)

    def _fresh_state(self, x: torch.Tensor) -> MACState:
        memory = self.memory.initial_state(x.shape[0], x.device, x.dtype)
        conv = self.retrieve_conv.empty_history(x.shape[0], x.device, x.dtype)
        empty = x.new_zeros(x.shape[0], self.heads, 0, self.head_dim)
        return MACState(memory, memory.memory, conv, empty, empty, empty, empty, 0)

    def _retrieve(
        self, h: torch.Tensor, committed: MemoryState, conv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 21: h [B, n, D] -> (M*_{s-1}(q) [B, n, D], conv history): a read of the committed weights, no update."""
        B, n, d = h.shape
        heads, head_dim = self.memory.heads, self.memory.head_dim
        q, conv = self.retrieve_conv(self.retrieve_query(h), conv)
        q = F.silu(q).view(B, n, heads, head_dim).transpose(1, 2)
        q = F.normalize(q, dim=-1).to(committed.weights[0].dtype)
        r = self.memory.network.forward_with(committed.weights, q)
        r = F.rms_norm(r, (head_dim,), self.retrieve_norm.to(r.dtype), eps=1e-6)
        return self.retrieve_out(r.to(h.dtype).transpose(1, 2).reshape(B, n, d)), conv

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, D] -> [B, H, n, Dh]."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, h: torch.Tensor, retrieved: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """Eqs. 22-23 for n tokens of the current segment. h, retrieved [B, n, D] -> y [B, n, D]."""
        B, n, d = h.shape
        offset = state.position % self.segment_len  # tokens of this segment already seen
        q, k_x, v_x = (self._heads(t) for t in self.qkv(h).split(d, dim=-1))
        _, k_h, v_h = (self._heads(t) for t in self.qkv(retrieved).split(d, dim=-1))
        # positions: persistent tokens 0..Np-1, then the j-th retrieved token and the j-th segment token both at Np + j
        local = torch.arange(offset, offset + n, device=h.device) + self.n_persistent
        cos, sin = rope_cache(local, self.head_dim, self.rope_base, h.dtype, h.device)
        q, k_x, k_h = apply_rope(q, cos, sin), apply_rope(k_x, cos, sin), apply_rope(k_h, cos, sin)
        h_keys, h_values = torch.cat([state.h_keys, k_h], 2), torch.cat([state.h_values, v_h], 2)
        x_keys, x_values = torch.cat([state.x_keys, k_x], 2), torch.cat([state.x_values, v_x], 2)
        keys, values = [h_keys, x_keys], [h_values, x_values]
        # token i (segment position offset + i) sees h_j and S_j for j <= offset + i
        causal = (
            torch.arange(offset + n, device=h.device)[None, :] <= (offset + torch.arange(n, device=h.device))[:, None]
        )
        masks = [causal, causal]
        if self.persistent is not None:
            p = self.persistent.to(h.dtype).unsqueeze(0)
            _, k_p, v_p = (self._heads(t) for t in self.qkv(p).split(d, dim=-1))
            cos_p, sin_p = rope_cache(
                torch.arange(self.n_persistent, device=h.device), self.head_dim, self.rope_base, h.dtype, h.device
            )
            keys.insert(0, apply_rope(k_p, cos_p, sin_p).expand(B, -1, -1, -1))
            values.insert(0, v_p.expand(B, -1, -1, -1))
            masks.insert(0, torch.ones(n, self.n_persistent, dtype=torch.bool, device=h.device))
        y = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=torch.cat(masks, 1))
        y = self.attn_out(y.transpose(1, 2).reshape(B, n, d))
        cache = MACState(
            state.memory, state.committed, state.retrieve_conv, h_keys, h_values, x_keys, x_values, state.position
        )
        return y, cache

    def forward(self, x: torch.Tensor, state: MACState | None = None) -> tuple[torch.Tensor, MACState]:
        """x [B, T, D] -> x [B, T, D], segment by segment (segments depend on each other through the memory)."""
        if state is None:
            state = self._fresh_state(x)
        outputs, start, T = [], 0, x.shape[1]
        while start < T:
            n = min(T - start, self.segment_len - state.position % self.segment_len)
            piece = x[:, start : start + n]
            h = self.norm(piece)
            retrieved, conv = self._retrieve(h, state.committed, state.retrieve_conv)
            y, state = self._attend(h, retrieved, state)
            m, memory = self.memory(y, state.memory)  # Eqs. 24-25: write y token by token, read after each write
            piece = piece + self.combine(y, m)
            outputs.append(piece + self.mlp(self.mlp_norm(piece)))
            position = state.position + n
            if position % self.segment_len == 0:
                # segment finished: commit its memory for the next segment's retrieval and drop its keys and values
                empty = x.new_zeros(x.shape[0], self.heads, 0, self.head_dim)
                state = MACState(memory, memory.memory, conv, empty, empty, empty, empty, position)
            else:
                kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
                state = MACState(memory, state.committed, conv, *kv, position)
            start += n
        return torch.cat(outputs, dim=1), state


def build_mac(cfg: ModelConfig) -> TitansLM:
    # MAC's persistent tokens live inside each segment's attention (Eq. 22), not in front of the sequence
    return TitansLM(cfg, MACBlock, n_prefix=0)
