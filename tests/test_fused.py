"""The fused memory scan equals chunked_memory and naive_memory: outputs, states, every gradient (float64).

Through both of its implementations (the C++ op and the tensor-op fallback), streamed in any pieces."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_memory import leaves, make_inputs

from titans.memory import MemoryState, chunked_memory, naive_memory, scan_cpp
from titans.memory.fused import fused_memory, fused_supports
from titans.memory.inputs import prepare
from titans.system import cpu_compiler

DT = torch.float64
needs_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="the C++ scan is built with a C++ compiler")
BACKENDS = [pytest.param("cpp", marks=needs_compiler), "torch"]
EXACT = pytest.mark.parametrize("exact", [False, True], ids=["anchored", "exact-last-layer"])


def _loss(y: torch.Tensor, state: MemoryState) -> torch.Tensor:
    """Touches the outputs and every part of the final state (the anchor with a cube, so it is not a multiple of the
    weights' term), so that gradients flow back through all of them."""
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=DT).to(y.dtype)
    return (
        (y * probe).sum()
        + sum((w * w).sum() for w in state.weights)
        + sum((s * s).sum() for s in state.momentum)
        + sum((a * a * a).sum() for a in state.anchor)
    )


def assert_same(out, state, ref, ref_state, named, grad_tol: float | None = None) -> None:
    torch.testing.assert_close(out, ref, msg=lambda m: f"outputs: {m}")
    for name in ("weights", "momentum", "anchor"):
        for i, (a, b) in enumerate(zip(getattr(state, name), getattr(ref_state, name), strict=True)):
            torch.testing.assert_close(a, b, msg=lambda m, n=name, i=i: f"final {n}[{i}]: {m}")
    assert state.position == ref_state.position
    grads = torch.autograd.grad(_loss(out, state), list(named.values()), allow_unused=True, retain_graph=True)
    refs = torch.autograd.grad(_loss(ref, ref_state), list(named.values()), allow_unused=True)
    for name, a, b in zip(named, grads, refs, strict=True):
        if (a is None) != (b is None):  # an op's backward returns zeros where autograd finds no path
            reached = a if b is None else b
            assert not reached.any(), f"d{name}: reached in one implementation only"
            continue
        if a is not None:
            kw = {} if grad_tol is None else {"rtol": grad_tol, "atol": grad_tol}
            torch.testing.assert_close(a, b, msg=lambda m, n=name: f"d{n}: {m}", **kw)


OPTIONS = {
    "defaults": {},
    "no-momentum": dict(momentum=False),
    "no-forgetting": dict(forgetting=False),
    "neither": dict(momentum=False, forgetting=False),
    "shared-gates": dict(per_layer=False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("clip", [None, 0.3], ids=["no-clip", "clip"])
@pytest.mark.parametrize("chunk_size, T, every", [(1, 7, 0), (4, 19, 2), (16, 37, 0), (16, 16, 1)], ids=str)
def test_fused_equals_chunked_and_reference(backend, option, depth, clip, chunk_size, T, every) -> None:
    """Every option of the contract; a partial last chunk (19, 37); every chunk kept (every=0) or recomputed."""
    inputs = make_inputs(T, depth, seed=T + depth, **OPTIONS[option])
    out, state = fused_memory(**inputs, chunk_size=chunk_size, grad_clip=clip, checkpoint_every=every, backend=backend)
    ref, ref_state = chunked_memory(**inputs, chunk_size=chunk_size, grad_clip=clip)
    assert_same(out, state, ref, ref_state, leaves(inputs))
    if depth == 2 and T < 20:  # and the per-token ground truth
        naive, naive_state = naive_memory(**inputs, chunk_size=chunk_size, grad_clip=clip)
        assert_same(out, state, naive, naive_state, leaves(inputs))


def test_the_clip_binds_in_these_tests() -> None:
    inputs = make_inputs(19, 2, seed=21)
    clipped, _ = fused_memory(**inputs, chunk_size=4, grad_clip=0.3)
    free, _ = fused_memory(**inputs, chunk_size=4)
    assert not torch.allclose(clipped, free)


def _pieces(inputs, split):
    start = 0
    for n in split:
        piece = dict(inputs)
        for name in ("q", "k", "v", "theta", "eta", "alpha"):
            if inputs[name] is not None:
                piece[name] = inputs[name][:, :, start : start + n]
        yield piece
        start += n


@EXACT
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [[1] * 13, [5, 1, 9, 6], [4, 4, 13], [3, 3, 3, 3, 3, 3, 3], [2, 17]], ids=str)
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_pieces_equal_one_call(backend, split, depth, exact) -> None:
    """Pieces of one token, cuts in the middle of a chunk (the next call resumes with the carried anchor), and the
    gradients through every carried state equal one call of chunked_memory."""
    inputs = make_inputs(sum(split), depth, seed=len(split))
    state, outs = None, []
    opts = dict(chunk_size=4, grad_clip=0.3, exact_last_layer=exact)
    for piece in _pieces(inputs, split):
        y, state = fused_memory(**piece, state=state, checkpoint_every=2, backend=backend, **opts)
        outs.append(y)
    ref, ref_state = chunked_memory(**inputs, **opts)
    assert_same(torch.cat(outs, dim=2), state, ref, ref_state, leaves(inputs))


@EXACT
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_a_state_carried_in_mid_chunk(backend, exact) -> None:
    """A state whose weights, momentum and anchor are leaves, at a position inside a chunk: the scan's gradients of
    the incoming state (dW, dS and the separate anchor's) equal chunked_memory's."""
    inputs = make_inputs(11, 2, seed=4)
    gen = torch.Generator().manual_seed(9)
    shapes = [p.shape for p in inputs["network"].initial_weights]

    def leaf(shape, scale):
        return (torch.randn(2, *shape, generator=gen, dtype=DT) * scale).requires_grad_()

    weights = tuple(leaf(s, 0.3) for s in shapes)
    momentum = tuple(leaf(s, 0.05) for s in shapes)
    anchor = tuple(leaf(s, 0.3) for s in shapes)
    state = MemoryState(weights, momentum, anchor, position=6)  # 2 tokens into the second chunk of 4
    named = {**leaves(inputs), **{f"state_{i}": t for i, t in enumerate(weights + momentum + anchor)}}
    opts = dict(chunk_size=4, grad_clip=0.3, exact_last_layer=exact)
    out, out_state = fused_memory(**inputs, state=state, backend=backend, **opts)
    ref, ref_state = chunked_memory(**inputs, state=state, **opts)
    assert_same(out, out_state, ref, ref_state, named)


def test_call_inside_one_chunk_keeps_the_incoming_anchor() -> None:
    inputs = make_inputs(3, 2, seed=2)
    _, first = fused_memory(**next(_pieces(inputs, [1])), chunk_size=8)
    rest = list(_pieces(inputs, [1, 2]))[1]
    _, second = fused_memory(**rest, state=first, chunk_size=8)
    for a, b in zip(second.anchor, first.anchor, strict=True):
        assert a is b  # still the first chunk: the anchor is the stream's start weights


@EXACT
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_compiler
def test_cpp_and_tensor_op_scans_agree(dtype, exact) -> None:
    inputs = make_inputs(45, 3, seed=8)
    for name in ("q", "k", "v", "theta", "eta", "alpha"):
        inputs[name] = inputs[name].detach().to(dtype).requires_grad_()
    inputs["network"] = inputs["network"].to(dtype)
    named = leaves(inputs)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    results = []
    for backend in ("cpp", "torch"):
        y, st = fused_memory(
            **inputs, chunk_size=8, grad_clip=0.5, checkpoint_every=2, backend=backend, exact_last_layer=exact
        )
        results.append((y, st, torch.autograd.grad(_loss(y, st), list(named.values()))))
    (y1, s1, g1), (y2, s2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    for a, b in zip(s1.weights + s1.momentum, s2.weights + s2.momentum, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for name, a, b in zip(named, g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10, msg=lambda m, n=name: f"d{n}: {m}")


@EXACT
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_agrees_with_float64_within_stated_tolerance(backend, exact) -> None:
    """float32 through the fused scan against the float64 reference: outputs and states within 1e-5, gradients
    within 1e-4 relative to their norm (the documented tolerances)."""
    inputs = make_inputs(64, 2, seed=12, D=8)
    ref, ref_state = chunked_memory(**inputs, chunk_size=16, grad_clip=1.0, exact_last_layer=exact)
    named = leaves(inputs)
    ref_grads = torch.autograd.grad(_loss(ref, ref_state), list(named.values()))
    single = {n: (t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    single["network"] = inputs["network"].float()
    out, state = fused_memory(**single, chunk_size=16, grad_clip=1.0, backend=backend, exact_last_layer=exact)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.weights[0].double(), ref_state.weights[0], rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(_loss(out, state), list(leaves(single).values()))
    for name, a, b in zip(named, grads, ref_grads, strict=True):
        rel = ((a.double() - b).norm() / b.norm()).item()
        assert rel < 1e-4, f"d{name}: relative error {rel:.2e}"


@pytest.mark.parametrize(
    "option, reason",
    [(dict(channelwise=True), "channel-wise forgetting"), (dict(residual_norm=True), "residual + LayerNorm memory")],
)
def test_options_outside_the_fused_scan_run_chunked_memory(option, reason) -> None:
    inputs = make_inputs(19, 2, seed=3, **option)
    gates, _ = prepare(**{n: inputs[n] for n in ("q", "k", "v", "theta", "eta", "alpha", "network")},
                       state=None, chunk_size=4)  # fmt: skip
    assert fused_supports(inputs["network"], gates, None) == reason
    out, state = fused_memory(**inputs, chunk_size=4)
    ref, ref_state = chunked_memory(**inputs, chunk_size=4)
    assert_same(out, state, ref, ref_state, leaves(inputs))
    stats: dict = {}
    fused_memory(**make_inputs(9, 2), chunk_size=4, stats=stats)
    assert stats["surprise"].shape == (2, 2, 9)  # stats come from chunked_memory


@needs_compiler
def test_cpp_scan_builds_here() -> None:
    """With a compiler the C++ op must build and load (a silent fallback would hide a broken build)."""
    assert scan_cpp.kernels(required=True) is scan_cpp
    assert scan_cpp.library_path().exists()


def test_without_a_compiler_the_tensor_op_scan_takes_over(tmp_path) -> None:
    """No compiler and an empty cache: one warning naming the cause, and the same results through the fallback."""
    script = textwrap.dedent(
        """
        import warnings, torch, sys
        sys.path.insert(0, "tests")
        from test_memory import make_inputs
        from titans.memory import chunked_memory
        from titans.memory.fused import fused_memory
        inputs = make_inputs(19, 2, seed=5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, _ = fused_memory(**inputs, chunk_size=4)
        ref, _ = chunked_memory(**inputs, chunk_size=4)
        torch.testing.assert_close(y, ref)
        messages = [str(w.message) for w in caught]
        assert any("no C++ compiler" in m and "tensor-op scan" in m for m in messages), messages
        print("fallback ok")
        """
    )
    env = {**os.environ, "TITANS_CACHE_DIR": str(tmp_path), "CXX": "", "PATH": "/nonexistent"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_automatic_checkpointing_keeps_every_chunk_within_the_budget_and_groups_beyond(monkeypatch) -> None:
    """checkpoint_every=None: every chunk kept while the call's kept tensors fit the budget, else groups of about
    sqrt(chunks x memories / threads); an explicit value is used as given. Results are the same either way."""
    from titans.memory import fused

    net = make_inputs(4, 2)["network"]
    assert fused.scan_stride(None, 64, 16, net, 16, 4) == 1  # a few MB: everything kept
    assert fused.scan_stride(5, 64, 16, net, 16, 4) == 5
    assert fused.scan_stride(0, 64, 16, net, 16, 4) == 1
    assert fused.scan_stride(100, 64, 16, net, 16, 4) == 1  # a group as long as the call: nothing to recompute
    monkeypatch.setattr(fused, "KEEP_ALL_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert fused.scan_stride(None, 64, 16, net, 16, 4) == round((64 * 16 / 2) ** 0.5)
    inputs = make_inputs(37, 2, seed=6)  # 10 chunks of 4 over 4 memories: groups of 4
    out, state = fused_memory(**inputs, chunk_size=4, grad_clip=0.3)
    ref, ref_state = chunked_memory(**inputs, chunk_size=4, grad_clip=0.3)
    assert_same(out, state, ref, ref_state, leaves(inputs))
