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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titans.config import ModelConfig
from titans.matmul import Linear
from titans.memory import MemoryState, NeuralMemory, NeuralMemoryState
from titans.memory.module import CausalDepthwiseConv, FixedMemoryState
from titans.memory.step import decode_linear, read_flat, rms_norm_rows
from titans.models.backbone import TitansLM
from titans.models.layers import GatedCombine, RMSNorm, SwiGLU, apply_rope, rope_cache, swiglu_hidden
from titans.system import compile_options


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


class FixedMACState(NamedTuple):
    """MACState for fixed-shape decoding (`MACBlock.decode_fixed`), tensors only: the memory's FixedMemoryState;
    committed: M*_{s-1} per layer [B * H, d_l, d_{l-1}]; retrieve_conv as in MACState; keys/values
    [B, H, Np + 2C, Dh]: persistent, then retrieved-token slots 0..C-1, then segment-token slots 0..C-1 (slots past the
    segment's current token are stale and masked); position: 0-d long tensor."""

    memory: FixedMemoryState
    committed: tuple[torch.Tensor, ...]
    retrieve_conv: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor


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
        self._compiled_segment = None  # compile_segments()

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
        q = F.normalize(F.silu(q).view(B, n, heads, head_dim).transpose(1, 2), dim=-1)
        inner = committed.weights[0].dtype
        r = self.memory.network.forward_with(committed.weights, q if q.dtype == inner else q.to(inner))
        norm_weight = self.retrieve_norm if self.retrieve_norm.dtype == r.dtype else self.retrieve_norm.to(r.dtype)
        r = F.rms_norm(r, (head_dim,), norm_weight, eps=1e-6)
        r = r.transpose(1, 2).reshape(B, n, d)
        return self.retrieve_out(r if r.dtype == h.dtype else r.to(h.dtype)), conv

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

    def _persistent_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the persistent tokens, [1, H, Np, Dh] each (Eq. 22's p_1 .. p_Np).

        They depend on parameters only, so with gradients off they are computed once and reused until a parameter
        changes (version counters and storage identify it); with gradients on they are recomputed (autograd needs
        the graph) and no key is read: under torch.func transforms (vmap, functional_call) a parameter has no storage.
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

    def _attend(self, h: torch.Tensor, retrieved: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """Eqs. 22-23 for n tokens of the current segment. h, retrieved [B, n, D] -> y [B, n, D]."""
        B, n, d = h.shape
        offset = state.position % self.segment_len  # tokens of this segment already seen
        q, k_x, v_x = (self._heads(t) for t in self.qkv(h).split(d, dim=-1))
        # the retrieved tokens serve only as keys and values: their rows of W_QKV, not the query's
        kv_weight = self.qkv.weight[d:]
        kv_bias = None if self.qkv.bias is None else self.qkv.bias[d:]
        k_h, v_h = (self._heads(t) for t in F.linear(retrieved, kv_weight, kv_bias).split(d, dim=-1))
        # positions: persistent tokens 0..Np-1, then the j-th retrieved token and the j-th segment token both at Np + j
        cos, sin = self._rope(offset + self.n_persistent, n, h.dtype, h.device)
        q, k_x, k_h = apply_rope(torch.stack([q, k_x, k_h]), cos, sin).unbind(0)  # one rotation for all three
        cache, keys, values = self._extend_cache(state, k_h, v_h, k_x, v_x)
        mask = None  # one query (decoding) sees every cached key: no mask to build
        if n > 1:
            # token i (segment position offset + i) sees h_j and S_j for j <= offset + i, and every persistent token
            causal = torch.arange(offset + n, device=h.device)[None, :] <= (
                offset + torch.arange(n, device=h.device)[:, None]
            )
            masks = [causal, causal]
            if self.persistent is not None:
                masks.insert(0, torch.ones(n, self.n_persistent, dtype=torch.bool, device=h.device))
            mask = torch.cat(masks, 1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = self.attn_out(y.transpose(1, 2).reshape(B, n, d))
        return y, cache

    def _decode(self, x: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """One token, forward only, for `forward`: x [B, 1, D] -> (x [B, 1, D], state), through `decode_fixed`."""
        out, fixed = self.decode_fixed(x[:, 0], self.fixed_state(state))
        return out.unsqueeze(1), self.state_from_fixed(fixed)

    def fixed_state(self, state: MACState, capacity: int = 0) -> FixedMACState:
        """The state as `decode_fixed` carries it: the segment's keys and values in fixed slots, the position as a
        tensor. capacity (positions a decode may reach) is not needed: MAC's cache is bounded by the segment."""
        C = self.segment_len
        batch, seen = state.x_keys.shape[0], state.x_keys.shape[2]
        dtype = state.retrieve_conv.dtype
        free = state.x_keys.new_zeros(batch, self.heads, C - seen, self.head_dim)
        keys, values = [state.h_keys, free, state.x_keys, free], [state.h_values, free, state.x_values, free]
        if self.persistent is not None:
            k_p, v_p = self._persistent_kv(dtype)
            keys.insert(0, k_p.expand(batch, -1, -1, -1))
            values.insert(0, v_p.expand(batch, -1, -1, -1))
        self._rope(0, 1, dtype, state.retrieve_conv.device)  # build the RoPE table outside any traced function
        n = batch * self.memory.heads
        committed = tuple(w.reshape(n, *w.shape[2:]).clone() for w in state.committed.weights)
        return FixedMACState(
            self.memory.fixed_state(state.memory),
            committed,
            state.retrieve_conv.contiguous(),
            torch.cat(keys, 2),
            torch.cat(values, 2),
            torch.tensor(state.position, device=state.retrieve_conv.device),
        )

    def state_from_fixed(self, fixed: FixedMACState) -> MACState:
        """The MACState that `fixed` stands for (the inverse of `fixed_state`)."""
        C, Np = self.segment_len, self.n_persistent
        position = int(fixed.position)
        seen = position % C
        memory = self.memory.state_from_fixed(fixed.memory)
        batch = fixed.keys.shape[0]
        committed = tuple(w.view(batch, self.memory.heads, *w.shape[1:]) for w in fixed.committed)
        # Eq. 21 reads only the committed weights: the fixed state carries no momentum or anchor for them
        committed_state = MemoryState(committed, committed, committed, position - seen)
        cached = [t[:, :, start : start + seen] for t in (fixed.keys, fixed.values) for start in (Np, Np + C)]
        h_keys, x_keys, h_values, x_values = cached
        return MACState(memory, committed_state, fixed.retrieve_conv, h_keys, h_values, x_keys, x_values, position)

    def decode_fixed(self, row: torch.Tensor, fixed: FixedMACState) -> tuple[torch.Tensor, FixedMACState]:
        """Eqs. 21-25 for one token on fixed-shape state, forward only: row [B, D] -> (row [B, D], state after it).

        Equals `forward` (tested). Written for torch.compile: no Python branch on the position and no growing
        shape, so one traced step serves every position. The segment's keys and values sit in fixed slots
        [persistent | retrieved 0..C-1 | segment 0..C-1]; token i of the segment writes slot i of both halves and
        attends with a mask to the persistent slots and slots <= i. Projections sharing an input run as one matmul
        (`decode_linear`); the retrieval reads the committed weights with `bmm`.
        """
        B, d = row.shape
        heads, head_dim, C, Np = self.heads, self.head_dim, self.segment_len, self.n_persistent
        offset = fixed.position % C  # the token's place in its segment
        h = self.norm(row)
        # Eq. 21's query and the segment token's q, k, v: two projections of h in one matmul
        r_q, q, k_x, v_x = decode_linear(h, self.retrieve_query, self.qkv).split(d, dim=1)
        r_q, conv = self.retrieve_conv.step(r_q, fixed.retrieve_conv)
        memory = self.memory
        inner = fixed.committed[0].dtype
        r_q = F.normalize(F.silu(r_q).view(-1, 1, memory.head_dim), dim=-1)
        r = read_flat(memory.network, fixed.committed, r_q if r_q.dtype == inner else r_q.to(inner))  # Eq. 21
        r = rms_norm_rows(r, self.retrieve_norm.to(r.dtype), 1e-6).view(B, d)
        retrieved = decode_linear(r if r.dtype == h.dtype else r.to(h.dtype), self.retrieve_out)
        _, k_h, v_h = decode_linear(retrieved, self.qkv).split(d, dim=1)
        cos_table, sin_table = self._rope_tables[(h.dtype, h.device)]
        at = (offset + Np).view(1)  # the retrieved and the segment token share position Np + offset
        cos, sin = cos_table.index_select(0, at), sin_table.index_select(0, at)
        rotated = apply_rope(torch.stack([q, k_x, k_h]).view(3, B, heads, 1, head_dim), cos, sin)
        q, k_x, k_h = rotated.unbind(0)  # each [B, H, 1, Dh]
        v_x, v_h = v_x.view(B, heads, 1, head_dim), v_h.view(B, heads, 1, head_dim)
        slots = torch.arange(Np + 2 * C, device=row.device)
        in_segment = slots - Np - torch.where(slots >= Np + C, C, 0)  # segment position of each slot
        write_h = (slots == Np + offset)[:, None]
        write_x = (slots == Np + C + offset)[:, None]
        keys = torch.where(write_h, k_h, torch.where(write_x, k_x, fixed.keys))
        values = torch.where(write_h, v_h, torch.where(write_x, v_x, fixed.values))
        visible = ((slots < Np) | (in_segment <= offset))[None, :]  # Eq. 22's causal mask for this token, [1, S]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)  # Eq. 23
        y = decode_linear(y.reshape(B, d), self.attn_out)
        m, memory_state = memory.decode_fixed(y, fixed.memory)  # Eqs. 24-25
        piece = row + self.combine(y, m)
        out = piece + self.mlp(self.mlp_norm(piece))
        # the segment's last token commits the memory for the next segment's retrieval; stale slots stay masked
        ends_segment = offset == C - 1
        committed = tuple(
            torch.where(ends_segment, w, c) for w, c in zip(memory_state.weights, fixed.committed, strict=True)
        )
        return out, FixedMACState(memory_state, committed, conv.contiguous(), keys, values, fixed.position + 1)

    def forward(self, x: torch.Tensor, state: MACState | None = None) -> tuple[torch.Tensor, MACState]:
        """x [B, T, D] -> x [B, T, D], segment by segment (segments depend on each other through the memory).

        One token with gradients off, outside autocast and with memory writes on (decoding) takes `_decode`.
        """
        if state is None:
            state = self._fresh_state(x)
        if (
            x.shape[1] == 1
            and not torch.is_grad_enabled()
            and self.memory.update_memory
            and self.memory.stats_sink is None
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return self._decode(x, state)
        # Segment pieces from one split: slicing x per segment would make each slice's backward fill a zero tensor
        # as long as x (quadratic in T).
        sizes, start, T = [], 0, x.shape[1]
        while start < T:
            sizes.append(min(T - start, self.segment_len - (state.position + start) % self.segment_len))
            start += sizes[-1]
        outputs = []
        for piece in x.split(sizes, dim=1):
            out, state = self._segment(piece, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1) if outputs else x, state

    def compile_segments(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run every whole training segment through `torch.compile` (inductor) instead of op by op.

        A MAC training step is a chain of segments, each a few hundred small ops (retrieval, attention, two memory
        chunks, the MLP) whose per-op dispatch costs more than their arithmetic at small widths; compiled, a
        segment's forward and backward are each one generated program. Only segments that are whole, start on a
        segment boundary and with gradients on take the compiled function (training); streams, decoding and eval
        keep the eager code, which is the reference (tests hold the two equal). The function sees every segment at
        stream position 0 (positions enter only modulo the segment and chunk lengths, which then agree), so one
        compilation serves the whole sequence. The first calls pay the compilation: about 3 minutes on 2 CPU cores
        with an empty inductor cache (one C++ build per fused kernel, forward and backward, for a fresh stream's
        first segment and for the rest), seconds once cached. backend: torch.compile's ("aot_eager" traces without
        generating code, for tests).
        """
        options = compile_options(backend, self.qkv.weight.device.type)
        self._compiled_segment = (
            torch.compile(self._segment_at_start, dynamic=False, backend=backend, options=options) if enabled else None
        )

    def compilable(self, n: int, state: MACState) -> bool:
        """Whether n tokens at `state` may run as a compiled segment (`compile_segments`, MACLM's segment-major path):
        a whole segment from a segment boundary with gradients on (training), the memory at a chunk boundary, and
        none of what the traced function leaves out (the memory's statistics sink, the naive reference)."""
        chunk = self.memory.chunk_size
        return (
            torch.is_grad_enabled()
            and n == self.segment_len
            and state.position % self.segment_len == 0
            and state.memory.memory.position % chunk == 0
            and self.segment_len % chunk == 0
            and self.memory.stats_sink is None
            and self.memory.impl != "naive"
        )

    def _segment(self, piece: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """One segment, or the part of one a stream holds: piece [B, n, D] -> (out [B, n, D], state after it)."""
        n = piece.shape[1]
        if self._compiled_segment is not None and self.compilable(n, state):
            self._rope(0, 1, piece.dtype, piece.device)  # build the RoPE table outside the traced function
            out, after = self._compiled_segment(piece, _at_position(state, 0, 0))
            return out, _at_position(after, state.position + n, state.memory.memory.position + n, commit=True)
        return self._segment_at_start(piece, state)

    def _segment_at_start(self, piece: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """Eqs. 21-25 for the n tokens of `piece` [B, n, D] given the state before them (the eager reference)."""
        n = piece.shape[1]
        h = self.norm(piece)
        retrieved, conv = self._retrieve(h, state.committed, state.retrieve_conv)
        y, state = self._attend(h, retrieved, state)
        m, memory = self.memory(y, state.memory)  # Eqs. 24-25: write y token by token, read after each write
        piece = piece + self.combine(y, m)
        out = piece + self.mlp(self.mlp_norm(piece))
        position = state.position + n
        if position % self.segment_len == 0:
            # segment finished: commit its memory for the next segment's retrieval and drop its keys and values
            empty = piece.new_zeros(piece.shape[0], self.heads, 0, self.head_dim)
            return out, MACState(memory, memory.memory, conv, empty, empty, empty, empty, position)
        kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
        return out, MACState(memory, state.committed, conv, *kv, position)


def _at_position(state: MACState, position: int, memory_position: int, commit: bool = False) -> MACState:
    """The same state at other stream positions (the block's and its memory's); tensors untouched.

    commit: the segment just ended, so the committed memory is the memory itself (as `_segment_at_start` returns it).
    """
    memory = state.memory.memory
    moved = MemoryState(memory.weights, memory.momentum, memory.anchor, memory_position)
    kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
    committed = moved if commit else state.committed
    return MACState(NeuralMemoryState(moved, state.memory.conv), committed, state.retrieve_conv, *kv, position)


def _segment_through(
    blocks: tuple[MACBlock, ...], piece: torch.Tensor, states: tuple[MACState, ...]
) -> tuple[torch.Tensor, tuple[MACState, ...]]:
    """One whole segment through consecutive MAC blocks, each from its state at stream position 0 (the function
    MACLM compiles): piece [B, C, D] -> (the last block's output [B, C, D], each block's state after the segment)."""
    after = []
    for block, state in zip(blocks, states, strict=True):
        piece, state = block._segment_at_start(piece, state)
        # the conv histories come out as views into the segment's conv inputs; returned contiguous, they have the
        # layout of a fresh stream's (see _like_a_later_state), and the next call's guards pass
        memory = NeuralMemoryState(state.memory.memory, state.memory.conv.contiguous())
        kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
        after.append(MACState(memory, state.committed, state.retrieve_conv.contiguous(), *kv, state.position))
    return piece, tuple(after)


# Blocks per compiled call on MACLM's segment-major path. Each call costs a fixed overhead outside its generated
# code (AOTAutograd's wrappers, guard checks, autograd nodes: about 1.5 ms per block and segment at d_model 64 on
# one CPU core), so two blocks per call halve it; the cold compilation grows with the blocks per call (264 s for two
# on 2 CPU cores), which is why it is not every block of a deep model.
LAYERS_PER_CALL = 2


class MACLM(TitansLM):
    """TitansLM of MAC blocks; with `compile_blocks`, training runs segment-major.

    Segment s of block l reads only segment s of block l-1 and block l's own state after segment s-1, so running a
    sequence segment by segment through all blocks computes the same values as running it block by block through all
    segments (the eager order, kept for streams, evaluation and decoding). The compiled training path takes the
    segment-major order and runs LAYERS_PER_CALL blocks of one segment per compiled call instead of one: the same
    compiled work in fewer, larger calls. Measured with the compiled MAC at d_model 64 x 2 layers, batch 2, 1 CPU
    thread, alternating with the block-by-block path in one process: 1.07-1.10x the tokens/s at T 512, 1.08x at T 2048.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        # MAC's persistent tokens live inside each segment's attention (Eq. 22), not in front of the sequence
        super().__init__(cfg, MACBlock, n_prefix=0)
        self._compiled_layers = None  # compile_blocks()

    def compile_blocks(self, enabled: bool = True, backend: str = "inductor") -> None:
        """As TitansLM.compile_blocks (each block's compiled segment serves streams that start mid-segment), plus
        the segment-major training path: `_segment_through` compiled once, shared by every group of blocks."""
        super().compile_blocks(enabled, backend)
        options = compile_options(backend, self.head.weight.device.type)
        self._compiled_layers = (
            torch.compile(_segment_through, dynamic=False, backend=backend, options=options) if enabled else None
        )

    def _segment_major(self, n: int, states: list[MACState]) -> bool:
        """Whether n tokens take the compiled segment-major path: compiled, every block at a state where a whole
        segment compiles, and no forward hooks that calling the blocks' segment function directly would skip
        (FSDP2 unshards parameters in one; those models keep the block-by-block order)."""
        blocks = list(self.blocks)
        hooks = nn.modules.module
        return (
            self._compiled_layers is not None
            and n >= blocks[0].segment_len
            and all(block.compilable(block.segment_len, state) for block, state in zip(blocks, states, strict=True))
            and not any(block._forward_pre_hooks or block._forward_hooks for block in blocks)
            and not (hooks._global_forward_pre_hooks or hooks._global_forward_hooks)
        )

    def _run_blocks(self, x: torch.Tensor, block_states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """TitansLM._run_blocks, segment-major when `_segment_major` allows: the whole segments through every block,
        LAYERS_PER_CALL blocks per compiled call; then a partial last segment block by block (eager)."""
        if self._compiled_layers is None or not torch.is_grad_enabled():
            return super()._run_blocks(x, block_states)
        blocks = list(self.blocks)
        states = [block._fresh_state(x) if s is None else s for block, s in zip(blocks, block_states, strict=True)]
        T, C = x.shape[1], blocks[0].segment_len
        if not self._segment_major(T, states):
            return super()._run_blocks(x, states)
        fresh = [given is None for given in block_states]
        states = [_like_a_later_state(state) if new else state for state, new in zip(states, fresh, strict=True)]
        for block in blocks:
            block._rope(0, 1, x.dtype, x.device)  # build the RoPE tables outside the traced function
        whole = T // C
        # one split: slicing x per segment would make each slice's backward fill a zero tensor as long as x
        pieces = x.split([C] * whole + ([T - whole * C] if T % C else []), dim=1)
        outputs = []
        for piece in pieces[:whole]:
            # contiguous like every later group's input: one compiled graph for all groups (a piece of x has x's
            # strides, which the graph would be specialised on)
            piece = piece.contiguous()
            for lo in range(0, len(blocks), LAYERS_PER_CALL):
                group = range(lo, min(lo + LAYERS_PER_CALL, len(blocks)))
                at_zero = tuple(_at_position(states[i], 0, 0) for i in group)
                piece, after = self._compiled_layers(tuple(blocks[i] for i in group), piece, at_zero)
                for i, state in zip(group, after, strict=True):
                    position, memory_position = states[i].position + C, states[i].memory.memory.position + C
                    states[i] = _at_position(state, position, memory_position, commit=True)
            outputs.append(piece)
        if len(pieces) > whole:
            tail, states = super()._run_blocks(pieces[whole], states)
            outputs.append(tail)
        return torch.cat(outputs, dim=1), states


def _like_a_later_state(state: MACState) -> MACState:
    """A fresh stream's state laid out as a later segment's state is, for the compiled segment function: the
    memory's weights materialised (not broadcast views of M_0) and the zero momentum and conv histories requiring
    gradients, as every state after a training segment does. Same values, same gradients to M_0; but the compiled
    function's guards (strides, requires_grad) then pass for the first segment too, and one compilation serves every
    segment instead of two (the cold compilation takes half as long). The zeros' own gradients are computed and
    dropped: a few small tensors per stream."""

    def zeros(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    memory = state.memory.memory
    weights = tuple(w.contiguous() for w in memory.weights)
    # the anchor is the weights at the chunk start: here the same tensors, as after a segment ending on a chunk
    moved = MemoryState(weights, tuple(zeros(m) for m in memory.momentum), weights, memory.position)
    kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
    neural = NeuralMemoryState(moved, zeros(state.memory.conv))
    return MACState(neural, moved, zeros(state.retrieve_conv), *kv, state.position)


def build_mac(cfg: ModelConfig) -> MACLM:
    return MACLM(cfg)
