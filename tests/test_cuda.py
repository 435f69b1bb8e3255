"""The library on CUDA: the same results as on CPU, FlexAttention's gradients, training, compiled kernels.

Skipped without a GPU (CI has none); run on one with `pytest tests/test_cuda.py -m ""` (the compiled-kernel checks
are marked slow). The CPU tests prove each path against its reference in float64; these prove that CUDA runs the same
computation: float64 on CUDA against float64 on CPU for every variant (outputs, gradients, streaming, generation),
then the CUDA-only pieces (FlexAttention's compiled kernel and backward, bf16 autocast, Triton kernels) against the
SDPA / eager paths in float32.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from model_configs import VOCAB, tiny_model_config

from titans.checkpoint import list_checkpoints
from titans.config import load_config
from titans.models import build_model
from titans.models.layers import Attention, reference_attention
from titans.run import read_metrics
from titans.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
# (variant, baseline attention)
MODELS = [
    ("baseline", "full"),
    ("baseline", "sliding"),
    ("LMM", "full"),
    ("MAC", "full"),
    ("MAG", "full"),
    ("MAL", "full"),
]
FLEX_MODELS = [("baseline", "full"), ("baseline", "sliding"), ("MAG", "sliding"), ("MAL", "sliding")]


@pytest.fixture(autouse=True)
def _room_for_recompiles(monkeypatch):
    # These tests feed FlexAttention's compiled kernel more layouts than one run would; past dynamo's recompile
    # limit it would silently fall back to the unfused path and the kernel would go untested.
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(torch._dynamo.config, name, 64)


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("variant", "baseline_attention"), MODELS)
def test_float64_on_cuda_equals_cpu(variant: str, baseline_attention: str) -> None:
    torch.manual_seed(0)
    cpu = build_model(tiny_model_config(variant, baseline_attention=baseline_attention)).double()
    gpu = build_model(tiny_model_config(variant, baseline_attention=baseline_attention)).double().to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    idx = tokens(3, 23)
    targets = torch.roll(idx, -1, dims=1)
    logits_cpu, loss_cpu, _ = cpu(idx, targets)
    logits_gpu, loss_gpu, _ = gpu(idx.to(CUDA), targets.to(CUDA))
    loss_cpu.backward()
    loss_gpu.backward()
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-10, atol=1e-10)
    g_cpu, g_gpu = grads(cpu), grads(gpu)
    for name in g_cpu:
        torch.testing.assert_close(g_gpu[name], g_cpu[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize(("variant", "baseline_attention"), MODELS)
@torch.no_grad()
def test_streaming_and_cached_generation_on_cuda(variant: str, baseline_attention: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_config(variant, baseline_attention=baseline_attention)).double().to(CUDA).eval()
    idx = tokens(2, 19).to(CUDA)
    full, _, _ = model(idx)
    state, pieces, start = None, [], 0
    for n in (1, 5, 1, 12):
        logits, _, state = model(idx[:, start : start + n], state=state)
        pieces.append(logits)
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    cached = model.generate(idx[:, :7], 14, temperature=0.0, use_cache=True)
    uncached = model.generate(idx[:, :7], 14, temperature=0.0, use_cache=False)
    assert cached.device == idx.device and torch.equal(cached, uncached)


# ---- FlexAttention: the compiled CUDA kernel, forward and backward, against SDPA and the dense reference


def flex_config(variant: str, baseline_attention: str, impl: str):
    # head width 16: FlexAttention's CUDA kernel needs at least 16
    cfg = tiny_model_config(variant, baseline_attention=baseline_attention, attention_impl=impl)
    return dataclasses.replace(cfg, d_model=32)


@pytest.mark.parametrize(("window", "n_prefix"), [(None, 0), (100, 0), (100, 4), (1, 3)])
def test_flex_kernel_equals_sdpa_and_reference_with_gradients(window: int | None, n_prefix: int) -> None:
    """T = 700: several 128-position blocks, some skipped entirely by the window, some partly masked."""
    torch.manual_seed(0)
    layers = {impl: Attention(64, 4, 10000.0, window=window, n_prefix=n_prefix, impl=impl) for impl in ("sdpa", "flex")}
    layers["flex"].load_state_dict(layers["sdpa"].state_dict())
    x = torch.randn(2, 700, 64, device=CUDA)
    outputs, gradients = {}, {}
    for impl, layer in layers.items():
        layer.to(CUDA)
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.square().sum().backward()
        outputs[impl] = y.detach()
        gradients[impl] = [xi.grad, *(p.grad for p in layer.parameters())]
    with torch.no_grad():
        q, k, v = layers["sdpa"]._project(x, 0)
        dense = layers["sdpa"]._merge(reference_attention(q, k, v, window, n_prefix))
    torch.testing.assert_close(outputs["flex"], dense, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(outputs["flex"], outputs["sdpa"], rtol=2e-4, atol=2e-5)
    for g_flex, g_sdpa in zip(gradients["flex"], gradients["sdpa"], strict=True):
        torch.testing.assert_close(g_flex, g_sdpa, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(("variant", "baseline_attention"), FLEX_MODELS)
def test_flex_model_equals_sdpa_model_on_cuda(variant: str, baseline_attention: str) -> None:
    models = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        models[impl] = build_model(flex_config(variant, baseline_attention, impl)).to(CUDA)
    idx = tokens(2, 150).to(CUDA)
    targets = torch.roll(idx, -1, dims=1)
    results = {}
    for impl, model in models.items():
        logits, loss, _ = model(idx, targets)
        loss.backward()
        results[impl] = (logits.detach(), grads(model))
        with torch.no_grad():  # streaming continues the stream through the flex path with a cache
            state, pieces = None, []
            for start, stop in ((0, 40), (40, 41), (41, 150)):
                piece, _, state = model(idx[:, start:stop], state=state)
                pieces.append(piece)
        torch.testing.assert_close(torch.cat(pieces, dim=1), logits.detach(), rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], rtol=2e-4, atol=2e-4)
    for name, g in results["sdpa"][1].items():
        torch.testing.assert_close(results["flex"][1][name], g, rtol=2e-3, atol=2e-4, msg=name)


# ---- training on CUDA: the loop, resume, bf16 autocast, flex


def cuda_run(tmp_path: Path, *overrides: str):
    base = [
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_layers=2",
        "model.segment_len=8",
        "model.window=8",
        "data.dataset=copy_task",
        "data.seq_len=24",
        "data.copy_length=5",
        "data.num_samples=100",
        "training.batch_size=8",
        "training.learning_rate=3e-3",
        "training.warmup_steps=3",
        "training.device=cuda",
        "training.progress=false",
        f"training.out_dir={tmp_path}",
    ]
    return load_config(None, [*base, *overrides])


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.variant=MAC"],
        ["model.variant=MAG", "model.attention_impl=flex"],
        ["model.variant=MAL", "training.dtype=bfloat16"],
    ],
    ids=["MAC", "MAG-flex", "MAL-bf16"],
)
def test_training_on_cuda_learns_and_resumes(tmp_path: Path, overrides: list[str]) -> None:
    cfg = cuda_run(tmp_path, *overrides, "training.max_steps=30", "training.checkpoint_every=10")
    cfg.training.run_name = "reference"
    reference = train(cfg)
    assert reference["device"].startswith("cuda")
    curve = losses(reference["run_dir"])
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.1
    # crash after step 25: resume from the step-20 checkpoint repeats steps 21-30 (CUDA kernels may reorder sums,
    # so equal to float32 rounding rather than bit for bit)
    crashed = tmp_path / "crashed"
    shutil.copytree(reference["run_dir"], crashed)
    for step, path in list_checkpoints(crashed):
        if step > 20:
            path.unlink()
    resumed = train(cfg, resume=crashed)
    assert resumed["steps"] == 30
    assert losses(crashed)[20:] == pytest.approx(curve[20:], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    ("overrides", "rel"),
    [(["model.variant=baseline"], 1e-4), (["model.variant=LMM"], 1e-4), (["model.variant=MAC"], 1e-4),
     (["model.variant=MAC", "training.dtype=bfloat16"], 3e-2)],
    ids=["baseline", "LMM", "MAC", "MAC-bf16"],
)  # fmt: skip
def test_cuda_graph_training_equals_eager(tmp_path: Path, overrides: list[str], rel: float) -> None:
    """training.cuda_graph: warm-up steps, the recorded full batch and the recorded short last batch of an epoch
    (batch 12 of 80 rows), replayed between evaluations, give the eager run's losses and evaluations. Under bf16 the
    recording casts each weight where it is used (autocast's cache is off), so it rounds differently: 3e-2."""
    runs = {}
    for graphed in (False, True):
        cfg = cuda_run(
            tmp_path, *overrides, "training.batch_size=12", "training.max_steps=23", "training.eval_every=10",
            f"training.cuda_graph={graphed}", f"training.run_name=graph-{graphed}",
        )  # fmt: skip
        runs[graphed] = train(cfg)
    records = {g: read_metrics(Path(runs[g]["run_dir"]) / "metrics.jsonl", wall_clock=False) for g in runs}
    assert [r["kind"] for r in records[True]] == [r["kind"] for r in records[False]]
    for got, want in zip(records[True], records[False], strict=True):
        for key in ("loss", "test_loss", "copy_accuracy", "grad_norm"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-5), (want["step"], key, got[key])


# ---- Triton kernels: compiled training segments and the compiled decode step (slow: minutes of compilation)


@pytest.mark.slow
def test_compiled_training_on_cuda_equals_eager() -> None:
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(flex_config("MAC", "full", "sdpa")).to(CUDA)
        if compiled:
            model.compile_blocks()
        models.append(model)
    idx = tokens(2, 8 * 6 + 3).to(CUDA)
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for model in models:
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            logits, loss, _ = model(idx, targets)
            loss.backward()
        results.append((logits.detach(), grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["MAC", "MAG"])
@torch.no_grad()
def test_compiled_decode_on_cuda_equals_eager(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(flex_config(variant, "sliding", "sdpa")).to(CUDA).eval()
    prompt = tokens(2, 9).to(CUDA)
    eager = model.generate(prompt, 24, temperature=0.0)
    model.compile_decode()
    compiled = model.generate(prompt, 24, temperature=0.0)
    again = model.generate(prompt, 24, temperature=0.0)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    model.graph_decode()  # the compiled step, recorded as a CUDA graph
    assert torch.equal(model.generate(prompt, 24, temperature=0.0), eager)


@pytest.mark.parametrize(("variant", "attention"), MODELS)
@torch.no_grad()
def test_graphed_decode_on_cuda_equals_eager(variant: str, attention: str) -> None:
    """graph_decode: the fixed-shape step recorded once per generate and replayed per token gives the eager step's
    tokens, greedy and sampled, across segment, chunk and window boundaries, in two generations in a row."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(variant, baseline_attention=attention)).to(CUDA).eval()
    prompt = tokens(2, 9).to(CUDA)

    def sampled() -> torch.Tensor:
        generator = torch.Generator(CUDA).manual_seed(2)
        return model.generate(prompt, 24, temperature=1.3, generator=generator)

    eager, eager_sampled = model.generate(prompt, 24, temperature=0.0), sampled()
    model.graph_decode()
    for _ in range(2):
        assert torch.equal(model.generate(prompt, 24, temperature=0.0), eager)
    assert torch.equal(sampled(), eager_sampled)


@pytest.mark.parametrize("option", ["defaults", "no-momentum", "neither"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [16, 64])
def test_triton_scan_kernels_on_cuda_equal_the_cpu_reference(
    option: str, depth: int, dtype: torch.dtype, width: int
) -> None:
    """The memory scan's Triton kernels, compiled (memory.impl=triton), against chunked_memory on CPU in float64:
    outputs, final state and every input's gradient; a partial last chunk, widths padded to the kernels' tiles; at
    width 64 (hidden 128) a depth-2 memory runs the kernels tiled over the hidden width."""
    pytest.importorskip("triton")
    from test_fused import OPTIONS, _loss
    from test_memory import leaves, make_inputs

    from titans.memory import MemoryState, chunked_memory
    from titans.memory.fused import fused_memory

    inputs = make_inputs(37, depth, D=width, seed=depth, **OPTIONS[option])
    named = leaves(inputs)
    ref, ref_state = chunked_memory(**inputs, chunk_size=16, grad_clip=0.3)
    ref_grads = torch.autograd.grad(_loss(ref, ref_state), list(named.values()))
    network = copy.deepcopy(inputs["network"]).to(CUDA, dtype)
    on_gpu = {n: t.detach().to(CUDA, dtype).requires_grad_() for n, t in named.items() if not n.startswith("M0")}
    gpu_inputs = {**inputs, **on_gpu, "network": network}
    out, state = fused_memory(**gpu_inputs, chunk_size=16, grad_clip=0.3, backend="triton")
    on_gpu.update({f"M0_{i}": p for i, p in enumerate(network.initial_weights)})  # leaves()'s order

    def back(ts):  # onto the CPU in float64, differentiably
        return tuple(t.double().cpu() for t in ts)

    state = MemoryState(back(state.weights), back(state.momentum), back(state.anchor), state.position)
    gpu_grads = torch.autograd.grad(_loss(out.double().cpu(), state), list(on_gpu.values()))
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out.double().cpu(), ref.detach(), **tol)
    for name, a, b in zip(named, gpu_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double().cpu(), b, msg=lambda m, n=name: f"d{n}: {m}", **tol)
