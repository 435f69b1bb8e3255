"""Chunk-parallel Titans memory: the same results as `naive.py`, a handful of matmuls per chunk.

Inside a chunk of b tokens every inner gradient is taken at the chunk-start weights (the anchor, Eq. 16), so all
b gradients come from one batched forward/backward of the keys (rank one per token: u_t = g_t a_t^T). Momentum and
forgetting still act per token (Eqs. 13, 14, 18). Unrolled over the chunk, with A_t = prod_{j<=t}(1 - alpha_j) and
E_t = prod_{j<=t} eta_j (products from the chunk start; TECHNICAL_REPORT.md §3.2):

    M_t = A_t M_0 + rho_t S_0 - sum_{i<=t} C_{t,i} theta_i u_i
    rho_t = sum_{s<=t} (A_t / A_s) E_s,        C_{t,i} = sum_{s=i}^{t} (A_t / A_s) (E_s / E_i)

The output of token t reads its own M_t (Eq. 15) without ever forming M_t (the dual form, §3.3): layer by layer,

    z_t = A_t (M_0 h_t) + rho_t (S_0 h_t) - sum_{i<=t} C_{t,i} theta_i (a_i . h_t) g_i

which over the chunk is two [b, d] x [d, d'] matmuls and one masked [b, b] mix. The ratios A_t / A_s and E_s / E_i
come from segment sums of logs masked before `exp`, so nothing overflows. Chunks run in sequence (the recurrence
across chunks is non-linear); the backward pass keeps the state only every `checkpoint_every` chunks and recomputes
the chunks in between, so training memory does not grow with one weight copy per chunk (§3.6).

With `exact_last_layer` the last layer's gradients come from `exact_last_key_path` (its errors by forward
substitution) instead of the anchor's key path; everything after it is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from titans.matmul import matmul
from titans.memory.inputs import GateArg, LayerGates, prepare
from titans.memory.network import MemoryMLP, activation, activation_and_derivative, layer_norm
from titans.memory.state import MemoryState
from titans.system import compile_options


def segment_sum(x: Tensor) -> Tensor:
    """out[..., t, s] = sum_{j=s+1}^{t} x[..., j] for s <= t and -inf above the diagonal. x [..., b] -> [..., b, b].

    Built by a masked cumulative sum (not a difference of cumulative sums) so that -inf never meets -inf.
    """
    b = x.shape[-1]
    rows = x.unsqueeze(-1).expand(*x.shape, b)
    strictly_lower = torch.ones(b, b, dtype=torch.bool, device=x.device).tril(-1)
    out = rows.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    return out.masked_fill(~strictly_lower.logical_or(torch.eye(b, dtype=torch.bool, device=x.device)), float("-inf"))


@dataclass
class ChunkCoefficients:
    """How the state and each token's gradient enter every later state of one chunk of b tokens (one layer).

    Shapes for one chunk (`build` also accepts extra leading axes, e.g. [B, H, n_chunks, ...]):
    decay      A_t                 [B, H, b]   ([B, H, b, c] with channel-wise forgetting)
    carry      rho_t or None       like decay (None without momentum: S_0 never reaches M_t)
    mix        C_{t,i} theta_i     [B, H, b, b] ([B, H, c, b, b] channel-wise), zero above the diagonal
    mom_decay  E_b or None         [B, H]
    mom_mix    theta_i E_b / E_i   [B, H, b]  (without momentum: theta_b at i = b, zero elsewhere)
    """

    decay: Tensor
    carry: Tensor | None
    mix: Tensor
    mom_decay: Tensor | None
    mom_mix: Tensor
    channelwise: bool

    @classmethod
    def build(cls, theta: Tensor, eta: Tensor | None, alpha: Tensor | None) -> ChunkCoefficients:
        """theta, eta [..., b]; alpha [..., b] or channel-wise [..., b, c]; eta/alpha None = switched off."""
        b = theta.shape[-1]
        channelwise = alpha is not None and alpha.dim() == theta.dim() + 1
        if alpha is None:
            log_keep = torch.zeros_like(theta)
        else:
            # a saturated gate (alpha == 1 exactly: sigmoid of a logit above ~17 in float32) would make log(0) = -inf,
            # whose derivative times a zero upstream gradient is NaN; clamped, it keeps eps of the past instead of 0
            log_keep = torch.log1p(-alpha.clamp(max=1.0 - torch.finfo(alpha.dtype).eps))
            if channelwise:
                log_keep = log_keep.transpose(-1, -2)  # [..., c, b]: the time axis last for the scans
        decay_ratio = segment_sum(log_keep).exp()  # A_t / A_s, [..., b, b]
        decay = log_keep.cumsum(-1).exp()  # A_t
        if eta is None:
            mix, carry, mom_decay = decay_ratio, None, None
            # theta at the chunk's last token, 0 elsewhere (built on theta's device: no host data, CUDA-graph safe)
            mom_mix = theta * (torch.arange(b, device=theta.device) == b - 1).to(theta)
        else:
            log_eta = torch.log(eta.clamp_min(torch.finfo(eta.dtype).tiny))  # eta == 0 (underflow): same reason
            mom_ratio = segment_sum(log_eta).exp()  # E_s / E_i, [..., b, b]
            mom_cum = log_eta.cumsum(-1).exp()  # E_s
            mom_decay, mom_mix = mom_cum[..., -1], mom_ratio[..., -1, :] * theta
            if channelwise:
                mom_ratio, mom_cum = mom_ratio.unsqueeze(-3), mom_cum.unsqueeze(-2)
            mix = matmul(decay_ratio, mom_ratio)
            carry = matmul(decay_ratio, mom_cum.unsqueeze(-1)).squeeze(-1)
        theta_cols = theta[..., None, None, :] if channelwise else theta[..., None, :]
        mix = mix * theta_cols
        if channelwise:
            decay = decay.transpose(-1, -2)
            carry = None if carry is None else carry.transpose(-1, -2)
        return cls(decay, carry, mix, mom_decay, mom_mix, channelwise)

    @classmethod
    def for_spans(cls, gates: LayerGates, spans: list[tuple[int, int]], chunk_size: int) -> list[ChunkCoefficients]:
        """Coefficients of each span; runs of whole chunks are built in one batched call (fewer, larger ops)."""
        out: list[ChunkCoefficients] = []
        i = 0
        while i < len(spans):
            j = i
            while j < len(spans) and spans[j][1] - spans[j][0] == chunk_size:
                j += 1
            if j - i <= 1:
                lo, hi = spans[i]
                g = gates.span(lo, hi)
                out.append(cls.build(g.theta, g.eta, g.alpha))
                i += 1
                continue
            lo, hi, n = spans[i][0], spans[j - 1][1], j - i
            g = gates.span(lo, hi)

            def chunks(t: Tensor | None, n: int = n) -> Tensor | None:  # [B, H, n*b(, c)] -> [B, H, n, b(, c)]
                return None if t is None else t.reshape(*t.shape[:2], n, chunk_size, *t.shape[3:])

            batch = cls.build(chunks(g.theta), chunks(g.eta), chunks(g.alpha))
            out.extend(batch.unbind())
            i = j
        return out

    def scaled(self, scale: Tensor) -> ChunkCoefficients:
        """The same coefficients with token i's gradient scaled by scale[..., i] [B, H, b] (inner gradient clipping)."""
        cols = scale[..., None, None, :] if self.channelwise else scale[..., None, :]
        return ChunkCoefficients(
            self.decay, self.carry, self.mix * cols, self.mom_decay, self.mom_mix * scale, self.channelwise
        )

    def unbind(self) -> list[ChunkCoefficients]:
        """One ChunkCoefficients per chunk of coefficients built with a chunk axis at dim 2.

        `unbind`, not one index per chunk: an index's backward writes its gradient into a zero tensor of all n chunks
        (n^2 work over the n chunks), an unbind's backward stacks the n gradients once.
        """
        fields = [self.decay, self.carry, self.mix, self.mom_decay, self.mom_mix]
        n = self.decay.shape[2]
        parts = [[None] * n if t is None else t.unbind(2) for t in fields]
        return [ChunkCoefficients(*(p[c] for p in parts), self.channelwise) for c in range(n)]


def _layer_output(h: Tensor, w0: Tensor, s0: Tensor, a: Tensor, g: Tensor, co: ChunkCoefficients) -> Tensor:
    """z_t = M_t h_t for every token of the chunk, without forming M_t (dual form).

    h [B, H, b, d_in]; w0, s0 [B, H, d_out, d_in]; a [B, H, b, d_in]; g [B, H, b, d_out] -> [B, H, b, d_out].
    """
    scores = matmul(h, a.transpose(-1, -2))  # (a_i . h_t): [B, H, b, b]
    if co.channelwise:
        out = co.decay * matmul(h, w0.transpose(-1, -2))
        if co.carry is not None:
            out = out + co.carry * matmul(h, s0.transpose(-1, -2))
        return out - torch.einsum("bhti,bhcti,bhic->bhtc", scores, co.mix, g)
    out = co.decay.unsqueeze(-1) * matmul(h, w0.transpose(-1, -2))
    if co.carry is not None:
        out = out + co.carry.unsqueeze(-1) * matmul(h, s0.transpose(-1, -2))
    return out - matmul(scores * co.mix, g)


def _layer_end_state(w0: Tensor, s0: Tensor, a: Tensor, g: Tensor, co: ChunkCoefficients) -> tuple[Tensor, Tensor]:
    """(M_b, S_b) of one layer at the chunk's last token (TECHNICAL_REPORT.md §3.4). All [B, H, d_out, d_in]."""
    s_new = -matmul((g * co.mom_mix.unsqueeze(-1)).transpose(-1, -2), a)
    if co.mom_decay is not None:
        s_new = s_new + co.mom_decay[..., None, None] * s0
    if co.channelwise:
        row = co.mix[..., -1, :].transpose(-1, -2)  # C_{b,i,c} theta_i as [B, H, b, c]
        w_new = co.decay[:, :, -1, :, None] * w0 - matmul((g * row).transpose(-1, -2), a)
        if co.carry is not None:
            w_new = w_new + co.carry[:, :, -1, :, None] * s0
        return w_new, s_new
    w_new = co.decay[..., -1, None, None] * w0 - matmul((g * co.mix[..., -1, :].unsqueeze(-1)).transpose(-1, -2), a)
    if co.carry is not None:
        w_new = w_new + co.carry[..., -1, None, None] * s0
    return w_new, s_new


def _shifted(co: ChunkCoefficients) -> tuple[Tensor, Tensor | None, Tensor]:
    """How M_{t-1} (the state before token t, not after it) is made of the chunk-start state and the earlier tokens'
    gradients: (decay A_{t-1}, carry rho_{t-1} or None, mix C_{t-1,i} theta_i), each row moved down by one. Row 0 is
    the chunk-start state itself (A = 1, rho = 0, no gradient); the mix becomes strictly lower triangular.
    Shapes as `ChunkCoefficients`, time axis -1 of decay/carry in the scalar case, -2 channel-wise.
    """
    axis = -2 if co.channelwise else -1

    def down(x: Tensor, first: Tensor) -> Tensor:  # [first, x_0, ..., x_{b-2}] along the time axis
        return torch.cat([first, x.narrow(axis, 0, x.shape[axis] - 1)], axis)

    decay = down(co.decay, torch.ones_like(co.decay.narrow(axis, 0, 1)))
    carry = None if co.carry is None else down(co.carry, torch.zeros_like(co.carry.narrow(axis, 0, 1)))
    mix = torch.cat([torch.zeros_like(co.mix[..., :1, :]), co.mix[..., :-1, :]], -2)
    return decay, carry, mix


def exact_last_key_path(
    network: MemoryMLP,
    anchor: list[Tensor],
    w0: Tensor,
    s0: Tensor,
    co: ChunkCoefficients,
    k: Tensor,
    v: Tensor,
    grad_clip: float | None,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """`MemoryMLP.key_path` at the gradient point of `exact_last_layer`: layers 1..L-1 at the anchor, the last layer
    at the current weights M^L_{t-1}. Same returns (A, G, loss) for one chunk of b tokens.

    w0, s0 [B, H, d_out, d_in]: the last layer's weights and momentum at the chunk (span) start; co: its (unscaled)
    coefficients. With a = the anchor's features of the keys, M^L_{t-1} a_t in the dual form makes the last layer's
    errors e_t = M^L_{t-1} a_t - v_t a lower-triangular system in the earlier tokens' rows g_i = 2 e_i:

        e_t = A_{t-1} (w0 a_t) + rho_{t-1} (s0 a_t) - v_t - sum_{i<t} C_{t-1,i} theta_i s_i (a_i . a_t) g_i

    (DeltaNet's system when the memory is linear), solved by forward substitution because the clip scale s_i of row i
    (`grad_clip`) depends on g_i itself. The earlier layers back-propagate g_t through M^L_{t-1} (again in the dual
    form) and then through the anchor's layers.
    """
    inputs, derivs = [], []
    h = k
    for w in anchor[:-1]:
        inputs.append(h)
        h, d = activation_and_derivative(matmul(h, w.transpose(-1, -2)), network.activation)
        derivs.append(d)
    a = h
    inputs.append(a)
    decay, carry, mix = _shifted(co)
    if co.channelwise:  # decay/carry [B, H, b, c], mix [B, H, c, b, b] -> per (t, i) a row of c: [B, H, b, b, c]
        mix = mix.permute(0, 1, 3, 4, 2)
        base = decay * matmul(a, w0.transpose(-1, -2)) - v
        if carry is not None:
            base = base + carry * matmul(a, s0.transpose(-1, -2))
    else:
        base = decay.unsqueeze(-1) * matmul(a, w0.transpose(-1, -2)) - v
        if carry is not None:
            base = base + carry.unsqueeze(-1) * matmul(a, s0.transpose(-1, -2))
    scores = matmul(a, a.transpose(-1, -2))  # (a_i . a_t), [B, H, b, b]
    weight = mix * scores.unsqueeze(-1) if co.channelwise else mix * scores  # the system's strictly lower part
    a_norm = a.norm(dim=-1)
    errors: list[Tensor] = []
    rows: list[Tensor] = []  # s_i g_i, the clipped rows that later tokens' errors subtract
    for t in range(a.shape[-2]):
        e = base[..., t, :]
        if t > 0:
            earlier = torch.stack(rows, dim=-2)  # [B, H, t, d_out]
            if co.channelwise:
                e = e - (weight[..., t, :t, :] * earlier).sum(-2)
            else:
                e = e - matmul(weight[..., t : t + 1, :t], earlier).squeeze(-2)
        errors.append(e)
        g = 2.0 * e
        if grad_clip is not None:
            g = g * (grad_clip / (g.norm(dim=-1) * a_norm[..., t]).clamp_min(grad_clip)).unsqueeze(-1)
        rows.append(g)
    err = torch.stack(errors, dim=-2)
    g_last = 2.0 * err
    grads = [g_last]
    if network.depth > 1:
        clipped = torch.stack(rows, dim=-2)
        # M^L_{t-1}^T g_t in the dual form, then through the anchor's hidden layers
        if co.channelwise:
            back = matmul(decay * g_last, w0)
            if carry is not None:
                back = back + matmul(carry * g_last, s0)
            pair = torch.einsum("bhtic,bhtc,bhic->bhti", mix, g_last, clipped)
        else:
            back = decay.unsqueeze(-1) * matmul(g_last, w0)
            if carry is not None:
                back = back + carry.unsqueeze(-1) * matmul(g_last, s0)
            pair = mix * matmul(g_last, clipped.transpose(-1, -2))
        g = (back - matmul(pair, a)) * derivs[-1]
        grads.append(g)
        for i in range(network.depth - 2, 0, -1):
            g = matmul(g, anchor[i]) * derivs[i - 1]
            grads.append(g)
    grads.reverse()
    return inputs, grads, err.square().sum(-1)


def _chunk(
    network: MemoryMLP,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: list[LayerGates],
    coefficients: list[ChunkCoefficients],
    weights: list[Tensor],
    momentum: list[Tensor],
    anchor: list[Tensor],
    stats: dict[str, list[Tensor]] | None,
    grad_clip: float | None = None,
    exact_last_layer: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One chunk (or the part of one that a stream holds): outputs and the state after its last token."""
    if exact_last_layer:
        last = network.depth - 1
        inputs, grads, loss = exact_last_key_path(
            network, anchor, weights[last], momentum[last], coefficients[last], k, v, grad_clip
        )
    else:
        inputs, grads, loss = network.key_path(anchor, k, v)
    # ||u_t||_F = ||g_t|| ||a_t|| for a rank-one gradient: clipping it is a per-token factor on theta
    needs_norms = grad_clip is not None or stats is not None
    grad_norms = [g.norm(dim=-1) * a.norm(dim=-1) for g, a in zip(grads, inputs, strict=True)] if needs_norms else []
    if grad_clip is not None:
        scales = [grad_clip / n.clamp_min(grad_clip) for n in grad_norms]
        coefficients = [co.scaled(sc) for co, sc in zip(coefficients, scales, strict=True)]
        grad_norms = [n * sc for n, sc in zip(grad_norms, scales, strict=True)]
    h, new_weights, new_momentum = q, [], []
    for i in range(network.depth):
        z = _layer_output(h, weights[i], momentum[i], inputs[i], grads[i], coefficients[i])
        h = activation(z, network.activation) if i < network.depth - 1 else z
        w, s = _layer_end_state(weights[i], momentum[i], inputs[i], grads[i], coefficients[i])
        new_weights.append(w)
        new_momentum.append(s)
    y = q + layer_norm(h) if network.residual_norm else h
    if stats is not None:
        with torch.no_grad():
            # ||theta_t g_t a_t^T||_F = theta_t ||g_t|| ||a_t||, summed in square over layers
            norm_sq = sum((gl.theta * n).square() for gl, n in zip(gates, grad_norms, strict=True))
            stats["surprise"].append(loss.detach())
            stats["update_norm"].append(norm_sq.sqrt())
    return y, new_weights, new_momentum


_COMPILED_CHUNKS: dict[tuple[str, str], Callable] = {}


def compiled_chunk(backend: str = "inductor", device_type: str = "cpu") -> Callable:
    """`_chunk` through torch.compile with `backend` (one per backend and device type, shared by every caller;
    static shapes).

    The chunk body is a few dozen ops, many of them elementwise over weight-sized tensors (the decays and carries
    of Eq. 18's end state); compiled, those fuse into single passes over memory. Same function, same results.
    """
    key = (backend, device_type)
    if key not in _COMPILED_CHUNKS:
        options = compile_options(backend, device_type)
        _COMPILED_CHUNKS[key] = torch.compile(_chunk, dynamic=False, backend=backend, options=options)
    return _COMPILED_CHUNKS[key]


def chunked_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: GateArg,
    eta: GateArg,
    alpha: GateArg,
    network: MemoryMLP,
    state: MemoryState | None = None,
    chunk_size: int = 16,
    stats: dict[str, Tensor] | None = None,
    grad_clip: float | None = None,
    checkpoint_every: int | None = 16,
    compile_backend: str | None = None,
    exact_last_layer: bool = False,
) -> tuple[Tensor, MemoryState]:
    """Same contract and results as `naive_memory`; see its docstring. q, k, v [B, H, T, D] -> y [B, H, T, D].

    checkpoint_every: when gradients are being recorded, keep the state only every this many chunks and recompute
    the chunks in between during backward (0 keeps every chunk, None means 16; results and gradients are identical
    either way).
    compile_backend: run every whole chunk through `compiled_chunk(compile_backend)` (e.g. "inductor"; None = eager).
    Partial chunks and calls that collect stats stay eager, so one compilation serves a whole stream.
    exact_last_layer: as in `naive_memory`; the last layer's errors solve a triangular system per chunk
    (`exact_last_key_path`). Not with a residual + LayerNorm memory, whose errors are not linear in the last layer.
    """
    if exact_last_layer and network.residual_norm:
        raise ValueError(
            "exact_last_layer has no chunk-parallel form for a residual + LayerNorm memory (its errors are not "
            "linear in the last layer); use naive_memory, or a memory without residual_norm"
        )
    gates, state = prepare(q, k, v, theta, eta, alpha, network, state, chunk_size)
    length = q.shape[2]
    # Spans follow the chunk grid of the whole stream: a stream that stopped mid-chunk first finishes that chunk.
    bounds, start = [], 0
    while start < length:
        stop = min(length, start + chunk_size - (state.position + start) % chunk_size)
        bounds.append((start, stop))
        start = stop

    weights, momentum, anchor = list(state.weights), list(state.momentum), list(state.anchor)
    collected: dict[str, list[Tensor]] | None = {"surprise": [], "update_norm": []} if stats is not None else None
    depth = network.depth

    if checkpoint_every is None:
        checkpoint_every = 16
    use_checkpoint = checkpoint_every > 0 and torch.is_grad_enabled() and len(bounds) > checkpoint_every
    group = checkpoint_every if use_checkpoint else max(len(bounds), 1)
    groups = [bounds[first : first + group] for first in range(0, len(bounds), group)]
    # Inputs are cut into spans by one split each (gates: into groups), never sliced per chunk: a slice's backward
    # fills a zero tensor as long as the whole input, which made training cost per token grow with T.
    q_spans, k_spans, v_spans = (t.split([hi - lo for lo, hi in bounds], dim=2) for t in (q, k, v))
    group_gates = [g.split([span[-1][1] - span[0][0] for span in groups]) for g in gates]

    compiled = None
    if compile_backend is not None and collected is None:
        compiled = compiled_chunk(compile_backend, q.device.type)

    def run_spans(index: int, *flat_state: Tensor) -> tuple[Tensor, ...]:
        ws, ss, an = list(flat_state[:depth]), list(flat_state[depth : 2 * depth]), list(flat_state[2 * depth :])
        outs = []
        span_list, first = groups[index], index * group
        offset = span_list[0][0]
        local = [(lo - offset, hi - offset) for lo, hi in span_list]  # spans within this group's gates
        layer_gates = [per_group[index] for per_group in group_gates]
        per_layer = [ChunkCoefficients.for_spans(g, local, chunk_size) for g in layer_gates]
        for n, (lo, _) in enumerate(span_list):
            if (state.position + lo) % chunk_size == 0:
                an = ws
            span_gates = [g.span(*local[n]) for g in layer_gates] if collected is not None else []
            piece = (q_spans[first + n], k_spans[first + n], v_spans[first + n])
            coefficients = [layer[n] for layer in per_layer]
            step = compiled if compiled is not None and local[n][1] - local[n][0] == chunk_size else _chunk
            y, ws, ss = step(
                network, *piece, span_gates, coefficients, ws, ss, an, collected, grad_clip, exact_last_layer
            )
            outs.append(y)
        return (torch.cat(outs, dim=2), *ws, *ss, *an)

    outputs = []
    for index in range(len(groups)):
        if use_checkpoint:
            result = checkpoint(run_spans, index, *weights, *momentum, *anchor, use_reentrant=False)
        else:
            result = run_spans(index, *weights, *momentum, *anchor)
        outputs.append(result[0])
        weights = list(result[1 : 1 + depth])
        momentum = list(result[1 + depth : 1 + 2 * depth])
        anchor = list(result[1 + 2 * depth :])

    position = state.position + length
    if position % chunk_size == 0:
        anchor = list(weights)
    if stats is not None and collected is not None and collected["surprise"]:
        stats["surprise"] = torch.cat(collected["surprise"], dim=-1)
        stats["update_norm"] = torch.cat(collected["update_norm"], dim=-1)
    y = torch.cat(outputs, dim=2) if outputs else torch.zeros_like(q)
    return y, MemoryState(tuple(weights), tuple(momentum), tuple(anchor), position)
