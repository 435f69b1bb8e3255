"""The Triton kernels of the memory scan (`scan_triton`: forward; `scan_triton_backward`: the reverse scan), run
through Triton's interpreter on CPU (no GPU): the same outputs, final state and gradients as `chunked_memory` and
`naive_memory`, in float64, for every option they cover; the calls they do not cover run the tensor-op scan.
tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present (Triton reads it at its first import)."""

from __future__ import annotations

import pytest
import torch
from test_fused import OPTIONS, _pieces, assert_same
from test_memory import leaves, make_inputs

from titans.memory import MemoryState, chunked_memory, naive_memory, scan_torch
from titans.memory.fused import fused_memory

scan_triton = pytest.importorskip("titans.memory.scan_triton")
pytestmark = pytest.mark.skipif(
    scan_triton.triton is None or not scan_triton.INTERPRETING,
    reason="needs triton in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; on a GPU, "
    "tests/test_cuda.py runs the compiled kernels)",
)
DT = torch.float64


# every gate option at both depths with the clip, chunks of 4 (padded to 16) and every second chunk state
# recomputed; then the defaults without the clip, with chunks of 1 and of 16 (a partial last one) and all kept
# (three single-gate options at depth 1 only in `make test-slow`: the kernel sees them as the coefficients built
# outside it and as the flags `neither` also turns off, which the default run covers at both depths)
DEPTH1_SLOW = ("no-momentum", "no-forgetting", "shared-gates")
CASES = [
    pytest.param(option, depth, 0.3, 4, 19, 2, marks=[pytest.mark.slow] if depth == 1 and option in DEPTH1_SLOW else [])
    for option in OPTIONS
    for depth in (1, 2)
]
CASES += [("defaults", depth, None, chunk, T, 0) for depth in (1, 2) for chunk, T in [(1, 7), (16, 37)]]
EXACT_CASES = [(option, depth, clip) for option in ("defaults", "neither") for depth in (1, 2) for clip in (None, 0.3)]


@pytest.mark.parametrize("option, depth, clip, chunk_size, T, every", CASES, ids=str)
def test_triton_scan_equals_chunked_and_reference(option, depth, clip, chunk_size, T, every) -> None:
    """Forward and backward kernels: outputs, final state and every gradient; widths (4, hidden 8) and chunks (1, 4)
    padded to the 16-wide tiles; a partial last chunk (19, 37); chunk states kept or recomputed in the backward."""
    inputs = make_inputs(T, depth, seed=T + depth, **OPTIONS[option])
    out, state = fused_memory(**inputs, chunk_size=chunk_size, grad_clip=clip, checkpoint_every=every, backend="triton")
    ref, ref_state = chunked_memory(**inputs, chunk_size=chunk_size, grad_clip=clip)
    assert_same(out, state, ref, ref_state, leaves(inputs))
    if T < 20:  # and the per-token ground truth
        naive, naive_state = naive_memory(**inputs, chunk_size=chunk_size, grad_clip=clip)
        assert_same(out, state, naive, naive_state, leaves(inputs))


@pytest.mark.parametrize("option, depth, clip", EXACT_CASES, ids=str)
def test_exact_last_layer_in_the_forward_kernel(option, depth, clip) -> None:
    """`exact_last_layer` (the LMM's default): the forward kernel's row-by-row substitution, then the tensor-op
    reverse scan on its kept states; outputs, states and every gradient equal the references."""
    inputs = make_inputs(19, depth, seed=19 + depth, **OPTIONS[option])
    opts = dict(chunk_size=4, grad_clip=clip, exact_last_layer=True)
    out, state = fused_memory(**inputs, backend="triton", **opts)
    assert_same(out, state, *chunked_memory(**inputs, **opts), leaves(inputs))
    assert_same(out, state, *naive_memory(**inputs, **opts), leaves(inputs))


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_unpadded_widths_and_both_activations(activation) -> None:
    """Widths that fill the tiles exactly (16, hidden 32) and a whole chunk of 16, with each activation."""
    inputs = make_inputs(40, 2, D=16, seed=3)
    inputs["network"].activation = activation
    out, state = fused_memory(**inputs, chunk_size=16, grad_clip=1.0, backend="triton")
    ref, ref_state = chunked_memory(**inputs, chunk_size=16, grad_clip=1.0)
    assert_same(out, state, ref, ref_state, leaves(inputs))


@pytest.mark.parametrize("split", [[1] * 6, [5, 1, 9, 6]], ids=str)
@pytest.mark.parametrize("depth", [1, 2])
def test_streaming_pieces_equal_one_call(split, depth) -> None:
    """Pieces of one token and cuts inside a chunk: each later call's first span resumes with the carried anchor
    (the kernel's ANCHOR path), and the gradients through every carried state equal one chunked_memory call."""
    inputs = make_inputs(sum(split), depth, seed=len(split))
    state, outs = None, []
    for piece in _pieces(inputs, split):
        y, state = fused_memory(**piece, state=state, chunk_size=4, grad_clip=0.3, backend="triton")
        outs.append(y)
    ref, ref_state = chunked_memory(**inputs, chunk_size=4, grad_clip=0.3)
    assert_same(torch.cat(outs, dim=2), state, ref, ref_state, leaves(inputs))


def test_gradients_reach_a_state_carried_in_mid_chunk() -> None:
    """Weights, momentum and a separate anchor as leaves at a position inside a chunk: dW, dS and the anchor's
    gradient equal chunked_memory's."""
    inputs = make_inputs(11, 2, seed=4)
    gen = torch.Generator().manual_seed(9)
    shapes = [p.shape for p in inputs["network"].initial_weights]

    def leaf(shape, scale):
        return (torch.randn(2, *shape, generator=gen, dtype=DT) * scale).requires_grad_()

    weights, momentum, anchor = (tuple(leaf(s, scale) for s in shapes) for scale in (0.3, 0.05, 0.3))
    state = MemoryState(weights, momentum, anchor, position=6)  # 2 tokens into the second chunk of 4
    named = {**leaves(inputs), **{f"state_{i}": t for i, t in enumerate(weights + momentum + anchor)}}
    out, out_state = fused_memory(**inputs, state=state, chunk_size=4, grad_clip=0.3, backend="triton")
    ref, ref_state = chunked_memory(**inputs, state=state, chunk_size=4, grad_clip=0.3)
    assert_same(out, out_state, ref, ref_state, named)


def test_float32_agrees_with_float64() -> None:
    """float32 through the kernel (IEEE products, no TF32) within 1e-5 of the float64 tensor-op scan."""
    inputs = make_inputs(37, 2, D=16, seed=5)
    inputs32 = {n: (t.detach().float() if isinstance(t, torch.Tensor) else t) for n, t in inputs.items()}
    inputs32["network"] = inputs["network"].float()
    out32, state32 = fused_memory(**inputs32, chunk_size=16, grad_clip=0.3, backend="triton")
    inputs["network"] = inputs["network"].double()
    out64, state64 = fused_memory(**inputs, chunk_size=16, grad_clip=0.3, backend="torch")
    torch.testing.assert_close(out32.double(), out64.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(state32.weights + state32.momentum, state64.weights + state64.momentum, strict=True):
        torch.testing.assert_close(a.double(), b.detach(), rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_and_what_it_does_not_cover_runs_the_tensor_op_scan(monkeypatch) -> None:
    """Depth 1-2 calls launch the forward kernel (with the exact last layer too); depth 3 runs scan_torch's forward
    (same results)."""
    launched = []
    forward = scan_triton.scan_forward
    monkeypatch.setattr(scan_triton, "scan_forward", lambda *a, **k: launched.append(1) or forward(*a, **k))
    torch_forward = scan_torch.scan_forward
    fallbacks = []
    monkeypatch.setattr(scan_torch, "scan_forward", lambda *a, **k: fallbacks.append(1) or torch_forward(*a, **k))
    for depth, exact, covered in [(2, False, True), (3, False, False), (2, True, True), (1, True, True)]:
        inputs = make_inputs(9, depth, seed=depth)
        launched.clear()
        fallbacks.clear()
        out, _ = fused_memory(**inputs, chunk_size=4, backend="triton", exact_last_layer=exact)
        ref, _ = chunked_memory(**inputs, chunk_size=4, exact_last_layer=exact)
        torch.testing.assert_close(out, ref)
        assert (len(launched), len(fallbacks)) == ((1, 0) if covered else (0, 1)), (depth, exact)


@pytest.mark.parametrize("variant", ["LMM", "MAC", "MAG", "MAL"])
def test_models_with_impl_triton_give_the_reference_logits_and_gradients(variant: str, monkeypatch) -> None:
    """`memory.impl=triton` in every memory variant, against the per-token reference: logits and every parameter's
    gradient, on a sequence that crosses chunk and segment boundaries and ends inside a chunk. The LMM's default
    exact last layer runs in the forward kernel, its backward in tensor ops (the kernel must run)."""
    from test_models import small_model, tokens

    launches = []
    forward = scan_triton.scan_forward
    monkeypatch.setattr(scan_triton, "scan_forward", lambda *a, **k: launches.append(1) or forward(*a, **k))
    model = small_model(variant, impl="triton")
    naive = small_model(variant, impl="naive")
    naive.load_state_dict(model.state_dict())
    idx = tokens(2, 15)
    a, loss_a, _ = model(idx, idx)
    b, loss_b, _ = naive(idx, idx)
    assert launches
    torch.testing.assert_close(a, b)
    grads_a = torch.autograd.grad(loss_a, list(model.parameters()))
    grads_b = torch.autograd.grad(loss_b, list(naive.parameters()))
    for (name, _), ga, gb in zip(model.named_parameters(), grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, msg=lambda m, n=name: f"{n}: {m}")


def test_impl_triton_without_triton_or_a_gpu_says_what_to_do(monkeypatch) -> None:
    inputs = make_inputs(9, 2, seed=1)
    monkeypatch.setattr(scan_triton, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_memory(**inputs, chunk_size=4, backend="triton")
    monkeypatch.setattr(scan_triton, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        fused_memory(**inputs, chunk_size=4, backend="triton")


@pytest.fixture
def tiled(monkeypatch) -> list[int]:
    """Every layer counts as wide, and the hidden width is cut into tiles of 16: the tiled forward and reverse scan
    (`scan_triton_tiled_forward`, `scan_triton_tiled`) run at test sizes. Returns the list the tensor-op reverse scan
    appends to when called."""
    from titans.memory import scan_triton_tiled

    monkeypatch.setattr(scan_triton, "UNTILED_MAX_LAYER_ELEMENTS", 0)
    monkeypatch.setattr(scan_triton, "UNTILED_BACKWARD_MAX_LAYER_ELEMENTS", 0)  # and wide depth-1 memories
    monkeypatch.setattr(scan_triton_tiled, "HIDDEN_TILE", 16)
    calls: list[int] = []
    backward = scan_torch.scan_backward
    monkeypatch.setattr(scan_torch, "scan_backward", lambda *a: calls.append(1) or backward(*a))
    return calls


# (option, clip, chunk, T, every, width): hidden 2 x width in tiles of 16 (one padded tile at width 5, two at 16,
# four at 32); every gate option; chunk states kept and recomputed; partial last chunks. The default run keeps the
# defaults and an unclipped padded case without forgetting (several seconds each in the interpreter); `make
# test-slow` the rest.
SLOW = pytest.mark.slow
TILED_CASES = [("defaults", 0.3, 4, 19, 2, 16), ("no-forgetting", None, 4, 9, 3, 5)]
TILED_CASES += [
    pytest.param(option, 0.3, 4, 19, 2, 16, marks=SLOW)
    for option in ("no-momentum", "no-forgetting", "neither", "shared-gates")
]
TILED_CASES += [
    pytest.param("defaults", None, 16, 37, 0, 16, marks=SLOW),
    pytest.param("defaults", 0.3, 1, 7, 0, 16, marks=SLOW),
]
TILED_CASES += [pytest.param("defaults", 0.3, 4, 21, 2, 32, marks=SLOW)]


@pytest.mark.parametrize("option, clip, chunk_size, T, every, width", TILED_CASES, ids=str)
def test_tiled_kernels_equal_chunked(tiled, option, clip, chunk_size, T, every, width) -> None:
    """The forward and the reverse scan tiled over the hidden width (wide depth-2 memories): outputs, final state,
    kept states and every gradient equal chunked_memory's, and the tensor-op reverse scan is never called."""
    inputs = make_inputs(T, 2, D=width, seed=T, **OPTIONS[option])
    opts = dict(chunk_size=chunk_size, grad_clip=clip)
    out, state = fused_memory(**inputs, checkpoint_every=every, backend="triton", **opts)
    assert_same(out, state, *chunked_memory(**inputs, **opts), leaves(inputs))
    assert not tiled


@pytest.mark.parametrize("activation", ["gelu", pytest.param("silu", marks=pytest.mark.slow)])
def test_tiled_kernels_stream_and_resume_mid_chunk(tiled, activation) -> None:
    """Pieces cut inside chunks (each later call's first span resumes with its own anchor, whose gradient the tiled
    kernel writes in its own buffer) equal one chunked_memory call, with either activation."""
    inputs = make_inputs(15, 2, D=16, seed=2)
    inputs["network"].activation = activation
    state, outs = None, []
    for piece in _pieces(inputs, [6, 9]):  # chunks of 4: the second piece resumes mid-chunk
        y, state = fused_memory(**piece, state=state, chunk_size=4, grad_clip=0.3, backend="triton")
        outs.append(y)
    ref, ref_state = chunked_memory(**inputs, chunk_size=4, grad_clip=0.3)
    assert_same(torch.cat(outs, dim=2), state, ref, ref_state, leaves(inputs))
    assert not tiled


def test_tiled_kernels_in_float32_agree_with_float64(tiled) -> None:
    """float32 through the tiled kernels (IEEE products): gradients within 1e-5 of the float64 tensor-op scan."""
    inputs = make_inputs(37, 2, D=16, seed=5)
    inputs32 = {n: t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
    inputs32["network"] = inputs["network"].float()
    out32, _ = fused_memory(**inputs32, chunk_size=16, grad_clip=0.3, backend="triton")
    named32 = {n: t for n, t in inputs32.items() if isinstance(t, torch.Tensor)}
    grads32 = torch.autograd.grad((out32 * out32).sum(), list(named32.values()), allow_unused=True)
    assert not tiled  # (the reference below runs the tensor-op scan)
    inputs["network"] = inputs["network"].double()
    out64, _ = fused_memory(**inputs, chunk_size=16, grad_clip=0.3, backend="torch")
    grads64 = torch.autograd.grad((out64 * out64).sum(), [inputs[n] for n in named32], allow_unused=True)
    for name, a, b in zip(named32, grads32, grads64, strict=True):
        if b is not None:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_wide_layers_the_tiled_kernel_does_not_cover_run_the_tensor_op_reverse_scan(tiled, monkeypatch) -> None:
    """A wide depth-1 memory takes scan_torch's reverse scan on the forward kernel's kept states, and a kernel that
    does not fit the GPU (OutOfResources) falls back with one warning: the same gradients."""
    inputs = make_inputs(19, 1, seed=3)
    out, state = fused_memory(**inputs, chunk_size=4, grad_clip=0.3, backend="triton")
    assert_same(out, state, *chunked_memory(**inputs, chunk_size=4, grad_clip=0.3), leaves(inputs))
    assert tiled

    def too_big(*args, **kwargs):
        raise scan_triton.triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")

    tiled.clear()
    inputs = make_inputs(19, 2, seed=3)
    monkeypatch.setattr(scan_triton, "_kernel_backward", too_big)
    monkeypatch.setattr(scan_triton, "_warned", set())
    out, state = fused_memory(**inputs, chunk_size=4, grad_clip=0.3, backend="triton")
    with pytest.warns(UserWarning, match="does not fit this GPU"):
        assert_same(out, state, *chunked_memory(**inputs, chunk_size=4, grad_clip=0.3), leaves(inputs))
    assert tiled


def test_auto_picks_the_triton_kernels_for_cuda_tensors_where_they_apply(monkeypatch) -> None:
    """fused_memory's default on CUDA: the Triton kernels when triton imports and the call is covered, else (or
    with fused.TRITON_ON_CUDA off) the tensor-op scan; on CPU the C++ op or its fallback, never the kernels."""
    from types import SimpleNamespace

    from titans.memory import fused
    from titans.memory.scan_torch import ScanSettings

    network = make_inputs(4, 2)["network"]
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    cpu = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    anchored = ScanSettings((4,), 4, "gelu", 0.0, 1)
    exact = anchored._replace(exact_last=True)
    assert fused._kernels("auto", cuda, network, anchored) is scan_triton
    assert fused._kernels("auto", cuda, network, exact) is scan_triton  # its forward; backward: tensor ops
    assert fused._kernels("auto", cuda, make_inputs(4, 3)["network"], anchored) is scan_torch  # depth 3
    assert fused._kernels("auto", cpu, network, anchored) is not scan_triton
    monkeypatch.setattr(fused, "TRITON_ON_CUDA", False)
    assert fused._kernels("auto", cuda, network, anchored) is scan_torch
    monkeypatch.setattr(scan_triton, "triton", None)
    monkeypatch.setattr(fused, "TRITON_ON_CUDA", True)
    assert fused._kernels("auto", cuda, network, anchored) is scan_torch  # no triton: no error, tensor ops
