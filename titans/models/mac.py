"""MAC, Memory as a Context (v1 §4.1, Eqs. 21-25, Figures 2 and 3a).

The sequence is cut into segments of C = `segment_len` tokens. For segment s, with M*_{s-1} the memory committed at
the end of segment s-1:

    h   = M*_{s-1}(q),  q = S W_Q                    Eq. 21: retrieve the past, no update
    S~  = [p_1 .. p_Np] || h || S                    Eq. 22: persistent tokens, retrieved tokens, the segment
    y   = Attn(S~)                                   Eq. 23: attention inside the segment only
    M_t = M_{t-1}(u_t),  u = h_in + y                Eq. 24: write the residual stream after attention
    o   = y (x) M*(u)                                Eq. 25: read it back after the write

Causality (the paper leaves it open; see docs/paper_alignment.md): token i of a segment attends to all persistent
tokens, to h_j and to S_j for j <= i only. The write is per token, so M*(u_i) reads the state that holds u_1..u_i and
nothing later (the chunked memory's per-token states). Across segments information flows only through the memory.
(x) is GatedCombine: RMSNorm(y) * sigmoid(RMSNorm(M*(u))). Each block then adds a SwiGLU MLP. h_in is the block's
normed input, so u is the residual stream after the attention sublayer (the paper's blocks are residual);
`model.mac_memory_input: attention` writes and reads y alone instead, Eq. 24 read literally (`_memory_input`;
docs/paper_alignment.md says why the default is u).

Streaming: the state holds the memory (written up to the last token), the committed memory M*_{s-1}, and the keys and
values of the current segment's retrieved and input tokens — at most 2C positions, so decoding cost is bounded.

This file is the reference: the eager computation above, segment by segment (`MACBlock.forward_segments` through
`_segment_at_start`). The forms that compute the same values faster live in titans/models/mac_fast.py, mixed into
MACBlock and MACLM and tested equal to this code: the default eager path, which runs what does not depend on the
memory once over the whole call (`_forward_hoisted`), the fixed-shape one-token decode (`decode_fixed`, which
`forward` takes for one token with gradients off), the compiled training segments (`compile_segments`) and the
segment-major compiled training order (`MACLM.compile_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from titans.config import ModelConfig
from titans.matmul import Linear
from titans.memory import MemoryState, NeuralMemory, NeuralMemoryState
from titans.memory.conv import CausalDepthwiseConv
from titans.models.backbone import TitansLM
from titans.models.layers import GatedCombine, RMSNorm, SwiGLU, apply_rope, rope_cache, swiglu_hidden
from titans.models.mac_fast import MACBlockFastPaths, MACLMFastPaths


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


class MACBlock(MACBlockFastPaths, nn.Module):
    """One MAC layer: Eqs. 21-25 per segment, then a SwiGLU MLP. x [B, T, D] -> x [B, T, D]."""

    state_type = MACState  # for the fast paths (mac_fast.py), which cannot import this module

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        d = cfg.d_model
        if d % cfg.n_heads or (d // cfg.n_heads) % 2:
            raise ValueError(f"n_heads ({cfg.n_heads}) must divide d_model ({d}) into even head sizes (RoPE)")
        self.segment_len = cfg.segment_len
        self.memory_input = cfg.mac_memory_input
        self.n_persistent = cfg.persistent_memory_size
        self.heads, self.head_dim, self.rope_base = cfg.n_heads, d // cfg.n_heads, cfg.rope_base
        self.norm = RMSNorm(d)
        self.memory = NeuralMemory.from_config(cfg)
        # Eq. 21's W_Q: the read of M*_{s-1} has its own query projection (the memory's own q path runs over y),
        # followed like every q/k/v projection by the short causal conv of v1 §4.4
        self.retrieve_query = Linear(d, d, bias=False)
        self.retrieve_conv = CausalDepthwiseConv(d, cfg.memory.conv_kernel)
        self.retrieve_norm = nn.Parameter(torch.ones(self.memory.head_dim))
        self.retrieve_out = Linear(d, d, bias=False)
        self.persistent = nn.Parameter(torch.zeros(self.n_persistent, d)) if self.n_persistent > 0 else None
        self.qkv = Linear(d, 3 * d, bias=False)
        self.attn_out = Linear(d, d, bias=False)
        self.combine = GatedCombine(d)
        self.mlp_norm = RMSNorm(d)
        self.mlp = SwiGLU(d, swiglu_hidden(d, cfg.mlp_ratio))
        # per-call work that depends only on constants or parameters, kept between calls (see _rope, _persistent_kv)
        self._rope_tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._persistent_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def init_weights(self) -> None:
        if self.persistent is not None:
            nn.init.normal_(self.persistent, 0.0, 0.02)

    def _fresh_state(self, x: torch.Tensor) -> MACState:
        memory = self.memory.initial_state(x.shape[0], x.device, x.dtype)
        conv = self.retrieve_conv.empty_history(x.shape[0], x.device, x.dtype)
        empty = x.new_zeros(x.shape[0], self.heads, 0, self.head_dim)
        return MACState(memory, memory.memory, conv, empty, empty, empty, empty, 0)

    def forward(self, x: torch.Tensor, state: MACState | None = None) -> tuple[torch.Tensor, MACState]:
        """x [B, T, D] -> x [B, T, D] (segments depend on each other through the memory).

        One token with gradients off, outside autocast and with memory writes on (decoding) takes `_decode`; once
        `compile_segments` ran, the segment-by-segment loop (`forward_segments`) with whole training segments
        compiled; otherwise `_forward_hoisted` (all three in mac_fast.py), which runs what does not depend on the
        memory once over all T and equals `forward_segments` (tested).
        """
        if state is None:
            state = self._fresh_state(x)
        if (
            x.shape[1] == 1
            and not torch.is_grad_enabled()
            and self.memory.plain
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return self._decode(x, state)
        if self._compiled_segment is None:
            return self._forward_hoisted(x, state)
        return self.forward_segments(x, state)

    def forward_segments(self, x: torch.Tensor, state: MACState | None = None) -> tuple[torch.Tensor, MACState]:
        """The reference order: x [B, T, D] cut at segment boundaries, each piece through `_segment` (the eager
        `_segment_at_start`, or its compiled form for whole training segments)."""
        if state is None:
            state = self._fresh_state(x)
        outputs = []
        # pieces from one split: slicing x per segment would make each slice's backward fill a zero tensor as long as x
        for piece in x.split(self._segment_sizes(state.position, x.shape[1]), dim=1):
            out, state = self._segment(piece, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1) if outputs else x, state

    def _segment_sizes(self, position: int, length: int) -> list[int]:
        """The lengths of the pieces that `length` tokens from stream position `position` cut into at segment
        boundaries (the first and last may be partial)."""
        sizes, start = [], 0
        while start < length:
            sizes.append(min(length - start, self.segment_len - (position + start) % self.segment_len))
            start += sizes[-1]
        return sizes

    def _segment_at_start(self, piece: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """Eqs. 21-25 for the n tokens of `piece` [B, n, D] given the state before them (the eager reference)."""
        h = self.norm(piece)
        queries, conv = self._retrieval_queries(h, state.retrieve_conv)
        read = self._read_committed(queries, state.committed, h.dtype)  # Eq. 21
        q, k_x, v_x = self._segment_qkv(h, state.position)
        k_h, v_h = self._retrieved_kv(self.retrieve_out(read), self._retrieved_kv_weights())
        y, state = self._attend(q, k_x, v_x, k_h, v_h, state)  # Eqs. 22-23
        # Eqs. 24-25: write u = h + y token by token, read after each write
        m, memory = self.memory(self._memory_input(h, y), state.memory)
        return self._combine_and_mlp(piece, y, m), self._advance(state, memory, conv, piece.shape[1])

    def _advance(self, state: MACState, memory: NeuralMemoryState, conv: torch.Tensor, n: int) -> MACState:
        """The state after n more tokens whose writes left `memory`: at a segment's end its memory is committed for
        the next segment's retrieval and its keys and values are dropped."""
        position = state.position + n
        if position % self.segment_len == 0:
            empty = conv.new_zeros(conv.shape[0], self.heads, 0, self.head_dim)
            return MACState(memory, memory.memory, conv, empty, empty, empty, empty, position)
        kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
        return MACState(memory, state.committed, conv, *kv, position)

    def _memory_input(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Eq. 24's y_t as the memory writes and reads it: the residual stream after the attention sublayer, the
        block's normed input h plus y (`model.mac_memory_input: residual`, the default), or the attention output y
        alone (`attention`). h, y [B, n, D] (or [B, D] for one decoded token)."""
        return y if self.memory_input == "attention" else h + y

    def _combine_and_mlp(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Eq. 25's o = y (x) M*(u) into the residual stream, then the block's MLP: x, y, m [B, n, D] -> [B, n, D]."""
        x = x + self.combine(y, m)
        return x + self.mlp(self.mlp_norm(x))

    def _retrieval_queries(self, h: torch.Tensor, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 21's queries q = S W_Q (then conv, SiLU, L2 norm, as the memory's own): h [B, n, D] ->
        (q [B, H_mem, n, D_mem], the conv history after them)."""
        B, n, _ = h.shape
        q, conv = self.retrieve_conv(self.retrieve_query(h), conv)
        q = F.silu(q).view(B, n, self.memory.heads, self.memory.head_dim).transpose(1, 2)
        return F.normalize(q, dim=-1), conv

    def _read_committed(self, q: torch.Tensor, committed: MemoryState, dtype: torch.dtype) -> torch.Tensor:
        """Eq. 21: M*_{s-1}(q), a read of the committed weights, no update: q [B, H_mem, n, D_mem] -> [B, n, D] in
        `dtype` (the block's activations'), each memory head's read RMS-normed; `retrieve_out` is applied by the
        caller (`_retrieved_kv`)."""
        B, heads, n, head_dim = q.shape
        inner = committed.weights[0].dtype
        r = self.memory.network.forward_with(committed.weights, q if q.dtype == inner else q.to(inner))
        norm_weight = self.retrieve_norm if self.retrieve_norm.dtype == r.dtype else self.retrieve_norm.to(r.dtype)
        r = F.rms_norm(r, (head_dim,), norm_weight, eps=1e-6)
        r = r.transpose(1, 2).reshape(B, n, heads * head_dim)
        return r if r.dtype == dtype else r.to(dtype)

    def _segment_qkv(self, h: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The segment tokens' query, key and value, [B, H, n, Dh] each, q and k rotated to their local positions
        (`_local_rope`): h [B, n, D] at stream positions position .. position + n - 1."""
        q, k, v = (self._heads(t) for t in self.qkv(h).split(h.shape[-1], dim=-1))
        cos, sin = self._local_rope(position, h.shape[1], h.dtype, h.device)
        q, k = apply_rope(torch.stack([q, k]), cos, sin).unbind(0)  # one rotation for both
        return q, k, v

    def _retrieved_kv_weights(self, fold_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The retrieved tokens' key and value projection: W_QKV's k and v rows [2D, D] and their bias (the
        retrieved tokens serve only as keys and values, never as queries). fold_out: multiplied by `retrieve_out`'s
        weight, so that the normed read goes to keys and values in one product instead of two (retrieve_out has no
        bias); one [2D, D] x [D, D] product per call, saving a [n, D] x [D, D] one per segment."""
        d = self.qkv.weight.shape[1]
        kv_weight = self.qkv.weight[d:]
        kv_bias = None if self.qkv.bias is None else self.qkv.bias[d:]
        return (kv_weight @ self.retrieve_out.weight if fold_out else kv_weight), kv_bias

    def _retrieved_kv(
        self, retrieved: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, n, Dh] (keys not yet rotated) of n retrieved tokens [B, n, D] under `weights`
        (`_retrieved_kv_weights`)."""
        d = retrieved.shape[-1]
        return tuple(self._heads(t) for t in F.linear(retrieved, *weights).split(d, dim=-1))

    def _attend(
        self,
        q: torch.Tensor,
        k_x: torch.Tensor,
        v_x: torch.Tensor,
        k_h: torch.Tensor,
        v_h: torch.Tensor,
        state: MACState,
    ) -> tuple[torch.Tensor, MACState]:
        """Eqs. 22-23 for n tokens of the current segment: q, k_x, v_x [B, H, n, Dh] from `_segment_qkv`, the
        retrieved tokens' k_h, v_h [B, H, n, Dh] from `_retrieved_kv` -> (y [B, n, D], the state with the segment's
        longer key/value cache)."""
        B, _, n, _ = q.shape
        d = self.heads * self.head_dim
        offset = state.position % self.segment_len  # tokens of this segment already seen
        # positions: persistent tokens 0..Np-1, then the j-th retrieved token and the j-th segment token both at Np + j
        k_h = apply_rope(k_h, *self._local_rope(state.position, n, q.dtype, q.device))
        cache, keys, values = self._extend_cache(state, k_h, v_h, k_x, v_x)
        mask = None  # one query (decoding) sees every cached key: no mask to build
        if n > 1:
            # token i (segment position offset + i) sees h_j and S_j for j <= offset + i, and every persistent token
            causal = torch.arange(offset + n, device=q.device)[None, :] <= (
                offset + torch.arange(n, device=q.device)[:, None]
            )
            masks = [causal, causal]
            if self.persistent is not None:
                masks.insert(0, torch.ones(n, self.n_persistent, dtype=torch.bool, device=q.device))
            mask = torch.cat(masks, 1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = self.attn_out(y.transpose(1, 2).reshape(B, n, d))
        return y, cache

    def _extend_cache(
        self, state: MACState, k_h: torch.Tensor, v_h: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor
    ) -> tuple[MACState, torch.Tensor, torch.Tensor]:
        """Append the new retrieved (h) and segment (x) keys/values [B, H, n, Dh] to the segment's cache.

        Returns (the state with the longer cache, keys, values): keys/values [B, H, Np + 2 * seen, Dh] laid out as
        [persistent | retrieved | segment], the order of Eq. 22 and of `_attend`'s mask.
        """
        h_keys, h_values = torch.cat([state.h_keys, k_h], 2), torch.cat([state.h_values, v_h], 2)
        x_keys, x_values = torch.cat([state.x_keys, k_x], 2), torch.cat([state.x_values, v_x], 2)
        keys, values = [h_keys, x_keys], [h_values, x_values]
        if self.persistent is not None:
            k_p, v_p = self._persistent_kv(k_x.dtype)
            batch = k_x.shape[0]
            keys.insert(0, k_p.expand(batch, -1, -1, -1))
            values.insert(0, v_p.expand(batch, -1, -1, -1))
        cache = MACState(
            state.memory, state.committed, state.retrieve_conv, h_keys, h_values, x_keys, x_values, state.position
        )
        return cache, torch.cat(keys, 2), torch.cat(values, 2)

    def _persistent_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the persistent tokens, [1, H, Np, Dh] each (Eq. 22's p_1 .. p_Np).

        They depend on parameters only, so with gradients off they are computed once and reused until a parameter
        changes (version counters and storage identify it; `drop_weight_caches` clears the copy for updates that
        bump neither, as fused optimizers' do); with gradients on they are recomputed (autograd needs the graph) and
        no key is read: under torch.func transforms (vmap, functional_call) a parameter has no storage.
        """
        p, w = self.persistent, self.qkv.weight
        cached = not torch.is_grad_enabled()
        key = (dtype, p.data_ptr(), p._version, w.data_ptr(), w._version) if cached else None
        if cached and self._persistent_cache is not None and self._persistent_cache[0] == key:
            return self._persistent_cache[1]
        d = w.shape[1]
        _, k_p, v_p = (self._heads(t) for t in self.qkv(p.to(dtype).unsqueeze(0)).split(d, dim=-1))
        cos_p, sin_p = self._rope(0, self.n_persistent, dtype, p.device)
        kv = (apply_rope(k_p, cos_p, sin_p), v_p)
        if cached:
            self._persistent_cache = (key, kv)
        return kv

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, n, D] -> [B, H, n, Dh]."""
        return t.view(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _rope(self, start: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, Dh/2] of local positions start .. start+n-1, sliced from one table per dtype and device.

        Local positions never exceed n_persistent + segment_len - 1, so the table (rope_cache over all of them,
        elementwise, hence the same values) is built once instead of per call.
        """
        key = (dtype, device)
        table = self._rope_tables.get(key)
        if table is None:
            positions = torch.arange(self.n_persistent + self.segment_len, device=device)
            table = self._rope_tables[key] = rope_cache(positions, self.head_dim, self.rope_base, dtype, device)
        return table[0][start : start + n], table[1][start : start + n]

    def _local_rope(
        self, position: int, n: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, Dh/2] at the local positions of stream positions position .. position + n - 1: a token at
        segment position j sits at Np + j (after the persistent tokens), so a span crossing segments wraps around."""
        offset, C = position % self.segment_len, self.segment_len
        if offset + n <= C:
            return self._rope(self.n_persistent + offset, n, dtype, device)
        cos, sin = self._rope(0, self.n_persistent + C, dtype, device)
        local = self.n_persistent + (torch.arange(position, position + n, device=device) % C)
        return cos.index_select(0, local), sin.index_select(0, local)


class MACLM(MACLMFastPaths, TitansLM):
    """TitansLM of MAC blocks; with `compile_blocks`, training runs segment-major (MACLMFastPaths, mac_fast.py)."""

    def __init__(self, cfg: ModelConfig) -> None:
        # MAC's persistent tokens live inside each segment's attention (Eq. 22), not in front of the sequence
        super().__init__(cfg, MACBlock, n_prefix=0)


def build_mac(cfg: ModelConfig) -> MACLM:
    return MACLM(cfg)
