"""The memory function: chunked == per-token reference (outputs, states, gradients), and the reference == textbook."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from titans.memory import MemoryMLP, MemoryState, chunked_memory, naive_memory

DT = torch.float64


def make_inputs(
    T: int,
    depth: int,
    *,
    momentum: bool = True,
    forgetting: bool = True,
    per_layer: bool = True,
    channelwise: bool = False,
    residual_norm: bool = False,
    B: int = 2,
    H: int = 2,
    D: int = 4,
    seed: int = 0,
):
    """Random memory inputs as leaves that require grad. Keys are l2-normalised as in the model (bounded updates)."""
    gen = torch.Generator().manual_seed(seed)
    net = MemoryMLP(D, depth, H, expansion=2, residual_norm=residual_norm).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) / p.shape[-1] ** 0.5)

    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, generator=gen, dtype=DT) * scale).requires_grad_()

    q = torch.randn(B, H, T, D, generator=gen, dtype=DT).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen, dtype=DT), dim=-1).requires_grad_()
    v = torch.randn(B, H, T, D, generator=gen, dtype=DT).requires_grad_()
    gate_shape = (B, H, T, depth) if per_layer else (B, H, T)
    theta = rand(*gate_shape, scale=0.2)
    # eta in (0.05, 0.8): the log-space scans need eta > 0; eta = 0 is the momentum=False path
    eta = (rand(*gate_shape, scale=0.75).detach() + 0.05).requires_grad_() if momentum else None
    if channelwise:
        alpha = [rand(B, H, T, d_out, scale=0.3) for d_out, _ in net.shapes]
    else:
        alpha = rand(*gate_shape, scale=0.3) if forgetting else None
    return dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha, network=net)


def leaves(inputs) -> dict[str, torch.Tensor]:
    named = {n: inputs[n] for n in ("q", "k", "v", "theta", "eta") if inputs[n] is not None}
    alpha = inputs["alpha"]
    if isinstance(alpha, list):
        named.update({f"alpha{i}": a for i, a in enumerate(alpha)})
    elif alpha is not None:
        named["alpha"] = alpha
    named.update({f"M0_{i}": p for i, p in enumerate(inputs["network"].initial_weights)})
    return named


def assert_same_run(inputs, chunk_size: int, checkpoint_every: int = 2, impl=chunked_memory, **options) -> None:
    """`impl` (chunked_memory or fused_memory) equals naive_memory in outputs, final state and every gradient;
    `options` (grad_clip, exact_last_layer) go to both."""
    ref, ref_state = naive_memory(**inputs, chunk_size=chunk_size, **options)
    out, state = impl(**inputs, chunk_size=chunk_size, checkpoint_every=checkpoint_every, **options)
    torch.testing.assert_close(out, ref, msg=lambda m: f"outputs: {m}")
    for name in ("weights", "momentum", "anchor"):
        for i, (a, b) in enumerate(zip(getattr(state, name), getattr(ref_state, name), strict=True)):
            torch.testing.assert_close(a, b, msg=lambda m, n=name, i=i: f"final {n}[{i}]: {m}")
    assert state.position == ref_state.position
    # a loss touching outputs and the final state, so gradients flow through both
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(ref.shape, generator=gen, dtype=DT)

    def outer_loss(y, st):
        return (y * probe).sum() + sum((w * w).sum() for w in st.weights) + sum((s * s).sum() for s in st.momentum)

    named = leaves(inputs)
    g_ref = torch.autograd.grad(outer_loss(ref, ref_state), list(named.values()))
    g_out = torch.autograd.grad(outer_loss(out, state), list(named.values()))
    for name, a, b in zip(named, g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(
    "chunk_size, T, depth",
    list(itertools.product([1, 2, 4, 16], [1, 7, 16, 37, 64], [1, 2, 3])),
    ids=lambda x: str(x),
)
def test_chunked_matches_reference(chunk_size: int, T: int, depth: int) -> None:
    assert_same_run(make_inputs(T, depth, seed=T * 10 + depth), chunk_size)


OPTIONS = {
    "no-momentum": dict(momentum=False),
    "no-forgetting": dict(forgetting=False),
    "neither": dict(momentum=False, forgetting=False),
    "shared-gates": dict(per_layer=False),
    "residual-norm": dict(residual_norm=True),
    "channelwise": dict(channelwise=True),
    "channelwise-no-momentum": dict(channelwise=True, momentum=False),
    "everything": dict(channelwise=True, residual_norm=True, per_layer=True),
}


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size, T", [(1, 7), (4, 19)])
def test_chunked_matches_reference_with_inner_gradient_clipping(depth: int, chunk_size: int, T: int) -> None:
    inputs = make_inputs(T, depth, seed=3, channelwise=True)
    clip = 0.3  # below the typical per-token gradient norm here, so most tokens are clipped
    ref, ref_state = naive_memory(**inputs, chunk_size=chunk_size, grad_clip=clip)
    out, state = chunked_memory(**inputs, chunk_size=chunk_size, grad_clip=clip, checkpoint_every=2)
    torch.testing.assert_close(out, ref)
    for a, b in zip(state.weights, ref_state.weights, strict=True):
        torch.testing.assert_close(a, b)
    unclipped, _ = naive_memory(**inputs, chunk_size=chunk_size)
    assert not torch.allclose(unclipped, ref), "the clip should bind in this test"
    named = leaves(inputs)
    g_ref = torch.autograd.grad(ref.square().sum(), list(named.values()))
    g_out = torch.autograd.grad(out.square().sum(), list(named.values()))
    for name, a, b in zip(named, g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size, T", [(1, 7), (4, 19), (16, 19)])
def test_chunked_matches_reference_options(option: str, depth: int, chunk_size: int, T: int) -> None:
    assert_same_run(make_inputs(T, depth, seed=depth, **OPTIONS[option]), chunk_size)


def test_checkpointing_changes_nothing() -> None:
    inputs = make_inputs(50, 2)
    named = leaves(inputs)
    results = []
    for every in (0, 1, 3):
        y, st = chunked_memory(**inputs, chunk_size=4, checkpoint_every=every)
        grads = torch.autograd.grad(y.square().sum() + st.weights[0].sum(), list(named.values()))
        results.append((y, grads))
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=0, atol=0)
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "impl",
    [
        naive_memory,
        chunked_memory,
        functools.partial(naive_memory, exact_last_layer=True),
        functools.partial(chunked_memory, exact_last_layer=True, grad_clip=0.3),
    ],
    ids=["naive", "chunked", "naive-exact-last-layer", "chunked-exact-last-layer-clipped"],
)
@pytest.mark.parametrize("split", [[5, 11, 21], [1] * 23, [16, 7], [3, 3, 3, 3, 11]], ids=str)
def test_streaming_pieces_equal_one_call(impl, split) -> None:
    inputs = make_inputs(sum(split), 2, channelwise=True)
    full, full_state = impl(**inputs, chunk_size=4)
    state, outs, start = None, [], 0
    for n in split:
        piece = dict(inputs)
        for name in ("q", "k", "v", "theta", "eta"):
            piece[name] = inputs[name][:, :, start : start + n]
        piece["alpha"] = [a[:, :, start : start + n] for a in inputs["alpha"]]
        y, state = impl(**piece, state=state, chunk_size=4)
        outs.append(y)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), full)
    for name in ("weights", "momentum", "anchor"):
        for a, b in zip(getattr(state, name), getattr(full_state, name), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: where 1e-30 ** 2 underflows to 0
@pytest.mark.parametrize("impl", [naive_memory, chunked_memory])
def test_clipping_keeps_gradients_finite_when_a_token_needs_no_update(impl, dtype) -> None:
    """A token the memory already fits (v = W0 k) has inner gradient 0; its clip factor must back-propagate 0, not
    0 * inf = NaN (the bug seen in training: clip / max(norm, 1e-30) has an infinite derivative at norm = 0)."""
    B, H, T, D = 1, 1, 5, 3
    gen = torch.Generator().manual_seed(7)
    W0 = torch.randn(1, D, D, generator=gen, dtype=dtype)
    q = torch.randn(B, H, T, D, generator=gen, dtype=dtype).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, D, generator=gen, dtype=dtype)
    k[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)  # a one-hot key, so that W0 k is exact in any order
    v[0, 0, 0] = W0[0, :, 0]  # exactly fitted: u_1 = 0
    k, v = k.requires_grad_(), v.requires_grad_()
    theta = torch.full((B, H, T), 0.3, dtype=dtype, requires_grad=True)
    net = MemoryMLP.from_weights([W0]).to(dtype)
    y, _ = impl(q, k, v, theta, None, None, net, chunk_size=T, grad_clip=0.5)
    grads = torch.autograd.grad(y.square().sum(), [q, k, v, theta, *net.initial_weights])
    assert all(torch.isfinite(g).all() for g in grads)


def test_saturated_forgetting_gate_keeps_gradients_finite() -> None:
    """alpha == 1 exactly (a sigmoid saturated in float32) erases the memory; the log-space coefficients must not turn
    log(0) into NaN gradients (seen in training at lr 5e-3), and the result still equals the reference."""
    inputs = make_inputs(9, 2, seed=11)
    with torch.no_grad():
        inputs["alpha"][:, :, 4] = 1.0  # forget everything at token 5
    for name in ("q", "k", "v", "theta", "eta", "alpha"):
        inputs[name] = inputs[name].detach().float().requires_grad_()
    inputs["network"] = inputs["network"].float()
    out, _ = chunked_memory(**inputs, chunk_size=4)
    ref, _ = naive_memory(**inputs, chunk_size=4)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), list(leaves(inputs).values()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_reference_is_the_textbook_recurrence_for_a_linear_memory() -> None:
    """naive_memory(C=1) == Eqs. 13-15 written out with the closed-form gradient 2 (W k - v) k^T."""
    B, H, T, D = 2, 3, 13, 5
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(H, D, D, generator=gen, dtype=DT)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=DT) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    theta, eta, alpha = (torch.rand(B, H, T, generator=gen, dtype=DT) * s for s in (0.4, 1.0, 0.2))

    y, state = naive_memory(q, k, v, theta, eta, alpha, MemoryMLP.from_weights([W0]).to(DT), chunk_size=1)

    expected = torch.empty(B, H, T, D, dtype=DT)
    for b in range(B):
        for h in range(H):
            W, S = W0[h].clone(), torch.zeros(D, D, dtype=DT)
            for t in range(T):
                grad = 2.0 * torch.outer(W @ k[b, h, t] - v[b, h, t], k[b, h, t])
                S = eta[b, h, t] * S - theta[b, h, t] * grad
                W = (1.0 - alpha[b, h, t]) * W + S
                expected[b, h, t] = W @ q[b, h, t]
            torch.testing.assert_close(state.weights[0][b, h], W)
            torch.testing.assert_close(state.momentum[0][b, h], S)
    torch.testing.assert_close(y, expected)


def test_chunk_gradients_are_taken_at_the_chunk_start() -> None:
    """With C = T and no momentum/forgetting, M_T = M_0 - sum_t theta_t grad l(M_0; k_t, v_t) (Eq. 16/17)."""
    B, H, T, D = 1, 1, 6, 3
    gen = torch.Generator().manual_seed(5)
    W0 = torch.randn(1, D, D, generator=gen, dtype=DT)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=DT) for _ in range(3))
    theta = torch.rand(B, H, T, generator=gen, dtype=DT)
    net = MemoryMLP.from_weights([W0]).to(DT)
    _, state = chunked_memory(q, k, v, theta, None, None, net, chunk_size=T)
    # eta = 0 means S_t = -theta_t u_t, so M_T = M_0 + sum_t S_t
    grads = sum(theta[0, 0, t] * 2.0 * torch.outer(W0[0] @ k[0, 0, t] - v[0, 0, t], k[0, 0, t]) for t in range(T))
    torch.testing.assert_close(state.weights[0][0, 0], W0[0] - grads)


def test_state_mismatch_is_a_clear_error() -> None:
    inputs = make_inputs(5, 2)
    _, state = chunked_memory(**inputs)
    other = make_inputs(5, 2, B=3)
    with pytest.raises(ValueError, match="batch size 3"):
        chunked_memory(**other, state=state)
    with pytest.raises(ValueError, match="theta must have shape"):
        chunked_memory(**{**inputs, "theta": inputs["theta"][..., :3, :]})
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_memory(**inputs, chunk_size=0)


def test_initial_state_is_per_sequence() -> None:
    net = MemoryMLP(4, 2, 2)
    state = MemoryState.initial(net, 3)
    assert state.weights[0].shape == (3, 2, 16, 4)
    torch.testing.assert_close(state.weights[0][2], net.initial_weights[0].detach())
