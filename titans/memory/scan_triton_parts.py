"""What the Triton kernels of the memory scan share (`scan_triton.py` forward, `scan_triton_backward.py` backward):
the optional import of triton, the padded tile sizes, the dual form's coefficients built in tensor ops for every span
at once, and the per-layer pieces of the forward that the backward recomputes (jit functions, inlined by Triton).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from titans.memory.scan_torch import ScanGates, span_coefficients

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional dependency: `unavailable` says so, and fused_memory raises it
    triton = None

# Triton decides at import whether `triton.jit` compiles (GPU) or interprets (numpy, CPU tensors): TRITON_INTERPRET=1
# in the environment before the first `import triton` picks the interpreter for the whole process (tests/conftest.py).
INTERPRETING = triton is not None and bool(triton.knobs.runtime.interpret)
jit = triton.jit if triton is not None else (lambda fn: fn)  # without triton the kernels are never launched


def _block(n: int) -> int:
    """n padded to a power of two of at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def _two_layers(ts: Sequence[Tensor]) -> list[Tensor]:
    """Per-layer tensors as the kernels take them, contiguous: layer 1's and layer 2's (at depth 1 layer 1's twice,
    in the slot the kernel never reads)."""
    return [ts[0].contiguous(), ts[-1].contiguous()]


def _span_tensors(lengths: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Each span's first token and length, int32 [n] each, for the kernels (read only)."""
    return _span_tensors_of(tuple(lengths), device)


@functools.lru_cache(maxsize=256)
def _span_tensors_of(lengths: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached: a copy from host memory would synchronise with the GPU, which a CUDA graph cannot record
    # (training.cuda_graph); the warm-up steps before a recording build every layout the recorded step asks for.
    starts = [sum(lengths[:c]) for c in range(len(lengths))]
    return (
        torch.tensor(starts, dtype=torch.int32, device=device),
        torch.tensor(lengths, dtype=torch.int32, device=device),
    )


def _span_groups(lengths: Sequence[int], chunk: int) -> list[tuple[int, int, int]]:
    """(first token, spans, span length) of each run of whole chunks, and of each partial span alone."""
    groups, i, start = [], 0, 0
    while i < len(lengths):
        r, j = lengths[i], i + 1
        while r == chunk and j < len(lengths) and lengths[j] == chunk:
            j += 1
        groups.append((start, j - i, r))
        start, i = start + r * (j - i), j
    return groups


def _padded(t: Tensor | None, like: Tensor, rows: int, shape: tuple[int, ...]) -> Tensor:
    """A coefficient [N * count, r] or [N * count, r, r] (zeros for None, shaped like `like`) zero-padded to `rows`
    on its token axes and shaped [N, count, rows(, rows)]."""
    t = torch.zeros_like(like) if t is None else t
    dims = t.dim() - 1
    return torch.nn.functional.pad(t, [0, rows - t.shape[-1]] * dims).reshape(*shape, *([rows] * dims))


def _coefficients(gates: Sequence[ScanGates], lengths: Sequence[int], chunk: int, rows: int) -> list[Tensor]:
    """The dual form's coefficients of every span, zero-padded to `rows`, layers stacked first:
    decay, carry [L, N, n, rows]; mix [L, N, n, rows, rows]; ends [L, N, n, 3] (end decay, end carry, momentum
    decay); end_mixes [L, N, n, 2, rows] (omega, the momentum's mix). Zeros where momentum is off. Runs of whole
    chunks are built in one batched call each."""
    n_mem = gates[0].theta.shape[0]
    per_layer: list[list[Tensor]] = [[] for _ in range(5)]
    for g in gates:
        parts: list[list[Tensor]] = [[] for _ in range(5)]
        for start, count, r in _span_groups(lengths, chunk):
            flat = [ScanGates(*(None if t is None else t[:, start : start + count * r].reshape(-1, r) for t in g))]
            co = span_coefficients(flat, 0, r)[0]
            shape = (n_mem, count)
            zero = torch.zeros_like(co.end_decay)
            end_carry = zero if co.end_carry is None else co.end_carry
            mom_decay = zero if co.mom_decay is None else co.mom_decay
            parts[0].append(_padded(co.decay, co.decay, rows, shape))
            parts[1].append(_padded(co.carry, co.decay, rows, shape))
            parts[2].append(_padded(co.mix, co.mix, rows, shape))
            parts[3].append(torch.stack([co.end_decay, end_carry, mom_decay], -1).reshape(*shape, 3))
            end_mixes = [_padded(t, t, rows, shape) for t in (co.end_mix, co.mom_mix)]
            parts[4].append(torch.stack(end_mixes, 2))
        for out, part in zip(per_layer, parts, strict=True):
            out.append(torch.cat(part, dim=1))
    return [torch.stack(layers).contiguous() for layers in per_layer]


@jit
def _span_rows(
    q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, m, T, c,
    I1: tl.constexpr, O2: tl.constexpr, BI1: tl.constexpr, BO2: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Span c of memory m: its token indices [R], the masks of its [R, BI1] and [R, BO2] rows (inside the span and the
    widths), and its q, k [R, BI1] and v [R, BO2] rows, zero outside those masks."""
    rows, i1, o2 = tl.arange(0, R), tl.arange(0, BI1), tl.arange(0, BO2)
    tok = m * T + tl.load(start_ptr + c) + rows
    row_in = rows < tl.load(length_ptr + c)
    in_rows, out_rows = row_in[:, None] & (i1[None, :] < I1), row_in[:, None] & (o2[None, :] < O2)
    qc = tl.load(q_ptr + tok[:, None] * I1 + i1[None, :], mask=in_rows, other=0.0)
    kc = tl.load(k_ptr + tok[:, None] * I1 + i1[None, :], mask=in_rows, other=0.0)
    vc = tl.load(v_ptr + tok[:, None] * O2 + o2[None, :], mask=out_rows, other=0.0)
    return tok, in_rows, out_rows, qc, kc, vc


@jit
def _activation(z, SILU: tl.constexpr):
    """sigma(z) and sigma'(z), exact GELU or SiLU (as `network.activation_and_derivative`)."""
    if SILU:
        sg = tl.sigmoid(z)
        act, deriv = z * sg, sg * (1.0 + z * (1.0 - sg))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        act, deriv = z * cdf, cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return act, deriv


@jit
def _span_coefficients(decay_ptr, carry_ptr, mix_ptr, ends_ptr, end_mix_ptr, at, R: tl.constexpr):
    """One layer's coefficients of one span (`at` = its index in the [L, N, n] grid): decay, carry [R], mix [R, R],
    omega, the momentum's mix [R], then end decay, end carry, momentum decay (scalars)."""
    rows = tl.arange(0, R)
    decay = tl.load(decay_ptr + at * R + rows)
    carry = tl.load(carry_ptr + at * R + rows)
    mix = tl.load(mix_ptr + at * R * R + rows[:, None] * R + rows[None, :])
    omega = tl.load(end_mix_ptr + at * 2 * R + rows)
    mom_mix = tl.load(end_mix_ptr + at * 2 * R + R + rows)
    ends = ends_ptr + at * 3
    return decay, carry, mix, omega, mom_mix, tl.load(ends), tl.load(ends + 1), tl.load(ends + 2)


@jit
def _clip_scale(g, a, clip):
    """s = clip / max(clip, |g| |a|) per row: the inner-gradient clip of the rows' gradients g a^T."""
    return clip / tl.maximum(clip, tl.sqrt(tl.sum(g * g, 1)) * tl.sqrt(tl.sum(a * a, 1)))


@jit
def _dual_layer(x, W, S, A, G, decay, carry, mix, MOMENTUM: tl.constexpr):
    """One layer of the query path in the dual form: Z = decay . (x W^T) + carry . (x S^T) - ((x A^T) * mix) G."""
    z = decay[:, None] * tl.dot(x, tl.trans(W), input_precision="ieee")
    z -= tl.dot(tl.dot(x, tl.trans(A), input_precision="ieee") * mix, G, input_precision="ieee")
    if MOMENTUM:
        z += carry[:, None] * tl.dot(x, tl.trans(S), input_precision="ieee")
    return z


@jit
def _end_state(W, S, G, A, omega, mom_mix, end_decay, end_carry, mom_decay, MOMENTUM: tl.constexpr):
    """One layer's state after the span: W_r = A_r W + rho_r S - G^T (omega . A), S_r = E_r S - G^T (mom_mix . A)."""
    w = end_decay * W - tl.dot(tl.trans(G * omega[:, None]), A, input_precision="ieee")
    s = -tl.dot(tl.trans(G * mom_mix[:, None]), A, input_precision="ieee")
    if MOMENTUM:
        w += end_carry * S
        s += mom_decay * S
    return w, s


@jit
def _exact_last_layer(
    a, W, S, vc, decay_ptr, carry_ptr, mix_ptr, at, clip,
    R: tl.constexpr, CLIP: tl.constexpr, MOMENTUM: tl.constexpr, HIDDEN: tl.constexpr,
):  # fmt: skip
    """The exact last layer's gradients by forward substitution (`scan_exact.last_layer`): a [R, d_in] the layer's
    inputs, (W, S) its span-start weights and momentum, `at` its coefficients' span index. Row t's error is taken at
    M_{t-1} = decay_{t-1} W + carry_{t-1} S - sum_{i<t} mix[t-1, i] s_i g_i a_i^T, so the rows are solved in order.
    Returns G^L = 2 e [R, d_out] and B = M_{t-1}^T G^L [R, d_in] for the layer below (HIDDEN; else G^L again)."""
    rows = tl.arange(0, R)
    later = rows > 0
    # the coefficients of M_{t-1}: every row moved down by one, row 0 the start state itself (decay 1, carry 0)
    decay = tl.load(decay_ptr + at * R + rows - 1, mask=later, other=1.0)
    mix = tl.load(mix_ptr + at * R * R + (rows[:, None] - 1) * R + rows[None, :], mask=later[:, None], other=0.0)
    base = decay[:, None] * tl.dot(a, tl.trans(W), input_precision="ieee") - vc
    if MOMENTUM:
        carry = tl.load(carry_ptr + at * R + rows - 1, mask=later, other=0.0)
        base += carry[:, None] * tl.dot(a, tl.trans(S), input_precision="ieee")
    weight = mix * tl.dot(a, tl.trans(a), input_precision="ieee")
    a_norm = tl.sqrt(tl.sum(a * a, 1))
    errors = tl.zeros_like(base)
    clipped = tl.zeros_like(base)  # s_i g_i of the rows solved so far
    for t in range(0, R):
        here = rows == t
        e = tl.sum(tl.where(here[:, None], base, 0.0), 0)
        e -= tl.sum(tl.sum(tl.where(here[:, None], weight, 0.0), 0)[:, None] * clipped, 0)
        g = 2.0 * e
        if CLIP:
            g = g * (clip / tl.maximum(clip, tl.sqrt(tl.sum(g * g, 0)) * tl.sum(tl.where(here, a_norm, 0.0), 0)))
        errors = tl.where(here[:, None], e[None, :], errors)
        clipped = tl.where(here[:, None], g[None, :], clipped)
    G = 2.0 * errors
    B = G
    if HIDDEN:
        B = decay[:, None] * tl.dot(G, W, input_precision="ieee")
        if MOMENTUM:
            B += carry[:, None] * tl.dot(G, S, input_precision="ieee")
        B -= tl.dot(mix * tl.dot(G, tl.trans(clipped), input_precision="ieee"), a, input_precision="ieee")
    return G, B


@jit
def _key_gradients(
    kc, vc, P1, P2, W, S, decay_ptr, carry_ptr, mix_ptr, at_last, clip,
    DEPTH: tl.constexpr, SILU: tl.constexpr, EXACT: tl.constexpr, CLIP: tl.constexpr, MOMENTUM: tl.constexpr,
    R: tl.constexpr,
):  # fmt: skip
    """The span's keys through the anchor (P1, P2): the hidden features A^2 = sigma(k P1^T) and the pre-activation
    gradients G^1, G^2 of the inner loss ||M(k) - v||^2; with EXACT the last layer's at its current weights (W, S:
    its span-start state; at_last: its coefficients' span index). At depth 1 A^2 and G^2 repeat k and G^1."""
    K1 = tl.dot(kc, tl.trans(P1), input_precision="ieee")
    if DEPTH == 2:
        H1, D1 = _activation(K1, SILU)
        if EXACT:
            G2, B1 = _exact_last_layer(
                H1, W, S, vc, decay_ptr, carry_ptr, mix_ptr, at_last, clip, R, CLIP, MOMENTUM, True
            )
        else:
            G2 = 2.0 * (tl.dot(H1, tl.trans(P2), input_precision="ieee") - vc)
            B1 = tl.dot(G2, P2, input_precision="ieee")
        G1 = B1 * D1
    else:
        H1 = kc
        if EXACT:
            G1, _ = _exact_last_layer(
                kc, W, S, vc, decay_ptr, carry_ptr, mix_ptr, at_last, clip, R, CLIP, MOMENTUM, False
            )
        else:
            G1 = 2.0 * (K1 - vc)
        G2 = G1
    return H1, G1, G2
