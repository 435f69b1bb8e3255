"""MAC's fast paths: fixed-shape decoding and compiled training segments, tested against the reference mac.py.

titans/models/mac.py holds the paper's computation (Eqs. 21-25) in eager PyTorch: that is the reference. This module
holds the forms that compute the same values faster, each held equal to the reference by tests/test_decode.py and
tests/test_compile.py:

    MACBlockFastPaths   mixed into MACBlock:
                          _forward_hoisted: eager training and prefill with what does not depend on the memory run
                            once over all T, not per segment (tests/test_mac_hoisted.py)
                          decode_fixed, fixed_state, state_from_fixed: one token on fixed-shape state (FixedMACState),
                            the step `TitansLM.compile_decode` compiles; `_decode` runs it for MACBlock.forward's
                            one-token calls
                          compile_segments, compilable, _segment: whole training segments through torch.compile
    MACLMFastPaths      mixed into MACLM: compile_blocks, _run_blocks: training segment-major, LAYERS_PER_CALL blocks
                          of one segment per compiled call (`_segment_through`)

The mixins add methods and non-parameter attributes only, so parameter names and checkpoints are the reference's.
mac.py imports this module (its classes inherit the mixins), so this one never imports mac.py (but for type
checking): it builds a MACState as `type(state)(...)` from the state it was given, or as `self.state_type(...)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titans.memory import MemoryState, NeuralMemoryState
from titans.memory.module import FixedMemoryState
from titans.memory.step import decode_linear, read_flat, rms_norm_rows
from titans.models.layers import apply_rope
from titans.system import compile_options

if TYPE_CHECKING:
    from titans.models.mac import MACBlock, MACState


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


class MACBlockFastPaths:
    """MACBlock's fixed-shape decode and compiled segments (see the module docstring); `self` is a MACBlock."""

    state_type: type[MACState]  # MACState, set by MACBlock in mac.py
    _compiled_segment = None  # compile_segments()

    # ---- fixed-shape decoding: one token, forward only

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
        return self.state_type(
            memory, committed_state, fixed.retrieve_conv, h_keys, h_values, x_keys, x_values, position
        )

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
        m, memory_state = memory.decode_fixed(self._memory_input(h, y), fixed.memory)  # Eqs. 24-25
        piece = row + self.combine(y, m)
        out = piece + self.mlp(self.mlp_norm(piece))
        # the segment's last token commits the memory for the next segment's retrieval; stale slots stay masked
        ends_segment = offset == C - 1
        committed = tuple(
            torch.where(ends_segment, w, c) for w, c in zip(memory_state.weights, fixed.committed, strict=True)
        )
        return out, FixedMACState(memory_state, committed, conv.contiguous(), keys, values, fixed.position + 1)

    # ---- hoisted eager training: what does not depend on the memory, once over the whole call

    def _forward_hoisted(self, x: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """`forward_segments` with only the recurrent part in the segment loop: x [B, T, D] -> (x [B, T, D], state).

        Segment s needs the memory committed after segment s-1 only through Eq. 21's read; the block's input norm,
        the retrieval queries (projection, conv, SiLU, L2 norm), the segment tokens' q, k, v and their rotation
        depend on x alone, and Eq. 25's combine and the MLP on y and M*(y) alone. Those run once over all T (fewer,
        larger ops, and one autograd node each instead of one per segment); the loop keeps the read of the committed
        memory, the attention over [persistent | retrieved | segment] and the memory's writes. The read goes to the
        retrieved tokens' keys and values through one product with `retrieve_out` folded into W_QKV's k and v rows
        (the reference applies the two in turn). Same values as the reference up to float rounding
        (tests/test_mac_hoisted.py, float64).
        """
        if x.shape[1] == 0:
            return x, state
        h = self.norm(x)
        queries, conv = self._retrieval_queries(h, state.retrieve_conv)
        q, k_x, v_x = self._segment_qkv(h, state.position)
        sizes = self._segment_sizes(state.position, x.shape[1])
        # retrieve_out folded into the retrieved tokens' key and value rows: one product per segment instead of two
        kv_weights = self._retrieved_kv_weights(fold_out=True)
        ys, ms = [], []
        # one split per tensor: a slice per segment would make each slice's backward fill a zero tensor as long as T
        pieces = zip(*(t.split(sizes, dim=2) for t in (queries, q, k_x, v_x)), h.split(sizes, dim=1), strict=True)
        for q_r, q_s, k_s, v_s, h_s in pieces:
            read = self._read_committed(q_r, state.committed, h.dtype)  # Eq. 21
            y, state = self._attend(q_s, k_s, v_s, *self._retrieved_kv(read, kv_weights), state)  # Eqs. 22-23
            m, memory = self.memory(self._memory_input(h_s, y), state.memory)  # Eqs. 24-25
            state = self._advance(state, memory, conv, q_s.shape[2])
            ys.append(y)
            ms.append(m)
        return self._combine_and_mlp(x, torch.cat(ys, dim=1), torch.cat(ms, dim=1)), state

    # ---- compiled training segments

    def compile_segments(self, enabled: bool = True, backend: str = "inductor") -> None:
        """Run every whole training segment through `torch.compile` (inductor) instead of op by op.

        A MAC training step is a chain of segments, each a few hundred small ops (retrieval, attention, two memory
        chunks, the MLP) whose per-op dispatch costs more than their arithmetic at small widths; compiled, a
        segment's forward and backward are each one generated program. Only segments that are whole, start on a
        segment boundary and with gradients on take the compiled function (training); streams, decoding and eval keep
        the eager code, which is the reference (tests hold the two equal). The function sees every segment at stream
        position 0 (positions enter only modulo the segment and chunk lengths, which then agree), so one compilation
        serves the whole sequence. The first calls pay the compilation, minutes on a small CPU with an empty inductor
        cache (one C++ build per fused kernel, forward and backward, for a fresh stream's first segment and for the
        rest; timed in benchmarks/README.md), seconds once cached. backend: torch.compile's ("aot_eager" traces without
        generating code, for tests).
        """
        options = compile_options(backend, self.qkv.weight.device.type)
        self._compiled_segment = (
            torch.compile(self._segment_at_start, dynamic=False, backend=backend, options=options) if enabled else None
        )

    def compilable(self, n: int, state: MACState) -> bool:
        """Whether n tokens at `state` may run as a compiled segment (`compile_segments`, MACLM's segment-major path):
        a whole segment from a segment boundary with gradients on (training), the memory at a chunk boundary, and
        none of what the traced function leaves out (a probed, read-only or ablated memory, the naive reference)."""
        chunk = self.memory.chunk_size
        return (
            torch.is_grad_enabled()
            and n == self.segment_len
            and state.position % self.segment_len == 0
            and state.memory.memory.position % chunk == 0
            and self.segment_len % chunk == 0
            and self.memory.plain
            and self.memory.impl != "naive"
        )

    def _segment(self, piece: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """One segment, or the part of one a stream holds: piece [B, n, D] -> (out [B, n, D], state after it);
        compiled when `compilable`, else the eager `_segment_at_start`."""
        n = piece.shape[1]
        if self._compiled_segment is not None and self.compilable(n, state):
            self._rope(0, 1, piece.dtype, piece.device)  # build the RoPE table outside the traced function
            out, after = self._compiled_segment(piece, _at_position(state, 0, 0))
            return out, _at_position(after, state.position + n, state.memory.memory.position + n, commit=True)
        return self._segment_at_start(piece, state)


def _at_position(state: MACState, position: int, memory_position: int, commit: bool = False) -> MACState:
    """The same state at other stream positions (the block's and its memory's); tensors untouched.

    commit: the segment just ended, so the committed memory is the memory itself (as `_segment_at_start` returns it).
    """
    memory = state.memory.memory
    moved = MemoryState(memory.weights, memory.momentum, memory.anchor, memory_position)
    kv = (state.h_keys, state.h_values, state.x_keys, state.x_values)
    committed = moved if commit else state.committed
    return type(state)(NeuralMemoryState(moved, state.memory.conv), committed, state.retrieve_conv, *kv, position)


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
        after.append(type(state)(memory, state.committed, state.retrieve_conv.contiguous(), *kv, state.position))
    return piece, tuple(after)


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
    return type(state)(neural, moved, zeros(state.retrieve_conv), *kv, state.position)


# Blocks per compiled call on MACLM's segment-major path. Each call costs a fixed overhead outside its generated
# code (AOTAutograd's wrappers, guard checks, autograd nodes), so two blocks per call halve it; the cold compilation
# grows with the blocks per call, which is why it is not every block of a deep model (both measured in
# benchmarks/README.md).
LAYERS_PER_CALL = 2


class MACLMFastPaths:
    """MACLM's segment-major training path; `self` is a MACLM (a TitansLM of MACBlocks).

    Segment s of block l reads only segment s of block l-1 and block l's own state after segment s-1, so running a
    sequence segment by segment through all blocks computes the same values as running it block by block through all
    segments (the eager order, kept for streams, evaluation and decoding). The compiled training path takes the
    segment-major order and runs LAYERS_PER_CALL blocks of one segment per compiled call instead of one: the same
    compiled work in fewer, larger calls (its speed-up over the block-by-block path: benchmarks/README.md).
    """

    _compiled_layers = None  # compile_blocks()

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
        (FSDP2 unshards parameters in one; those models keep the block-by-block order).

        The hook check reads torch's private hook registries (a block's `_forward_pre_hooks` and `_forward_hooks`,
        torch.nn.modules.module's global ones): torch has public functions that register hooks but none that lists
        them, and any hook, not only FSDP2's, needs the block-by-block order, where `nn.Module.__call__` runs it
        (`isinstance(block, FSDPModule)`, public, would miss every other hook)."""
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
