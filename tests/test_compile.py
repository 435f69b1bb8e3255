"""torch.compile'd code computes exactly what the eager reference computes: MAC segments and memory chunks
(training.compile) and generate's fixed-shape decode step (compile_decode).

The compiled function is the eager `_segment_at_start` traced by torch.compile, fed every segment at stream position
0; these tests hold its logits, loss, every gradient and the carried state equal to eager in float64, and check that
the compiled path really ran (whole segments) while partial segments, streams and eval stayed eager. The default run
traces with the aot_eager backend (seconds); inductor's generated code is checked in the slow run (a cold compile
takes minutes on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from model_configs import VOCAB, tiny_model_config

from titans.config import ConfigError, ModelConfig, RunConfig, TrainingConfig
from titans.memory import NeuralMemoryState
from titans.models import build_model
from titans.system import cpu_compiler

DT = torch.float64

needs_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="torch.compile on CPU needs a C++ compiler")


def tiny_config(variant: str, **memory) -> ModelConfig:
    # MAC segment 8 = two memory chunks of 4; both layers share one compilation
    return tiny_model_config(variant, segment_len=8, baseline_attention="full", **memory)


def tiny_mac(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_config("MAC")).to(DT)


def count_compiled_calls(model) -> dict[str, list[int]]:
    """Wrap the compiled MAC functions with call counters; returns the live counts, per block, of the segments it ran
    in a segment-major call of the model ("major") and through its own compiled segment function ("block")."""
    counts = {"major": [0] * len(model.blocks), "block": [0] * len(model.blocks)}
    index = {id(block): i for i, block in enumerate(model.blocks)}
    major = model._compiled_layers

    def counted_major(blocks, *args):
        for block in blocks:
            counts["major"][index[id(block)]] += 1
        return major(blocks, *args)

    model._compiled_layers = counted_major
    for i, block in enumerate(model.blocks):
        compiled = block._compiled_segment

        def counted(*args, _compiled=compiled, _i=i):
            counts["block"][_i] += 1
            return _compiled(*args)

        block._compiled_segment = counted
    return counts


@pytest.mark.parametrize(
    "backend",
    [
        # traced by dynamo and AOTAutograd, run as traced: the position remapping, guards and state plumbing
        "aot_eager",
        # inductor's generated C++: minutes of compilation with a cold cache, hence slow
        pytest.param("inductor", marks=[pytest.mark.slow, needs_compiler]),
    ],
)
def test_compiled_segments_equal_eager_outputs_gradients_and_state(backend: str) -> None:
    eager, compiled = tiny_mac(), tiny_mac()
    compiled.compile_blocks(backend=backend)
    counts = count_compiled_calls(compiled)
    idx = torch.randint(0, VOCAB, (2, 8 * 3 + 5), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)

    results = []
    for model in (eager, compiled):
        for _ in range(2):  # twice: the second call runs the cached compilation
            model.zero_grad(set_to_none=True)
            logits, loss, state = model(idx, targets)
            loss.backward()
        results.append((logits, loss, state, {n: p.grad for n, p in model.named_parameters()}))
    (l0, loss0, s0, g0), (l1, loss1, s1, g1) = results
    # 3 whole segments per call and layer went through the compiled function, segment-major; the 5-token tail did not
    assert counts == {"major": [6, 6], "block": [0, 0]}
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)
    for b0, b1 in zip(s0.block_states, s1.block_states, strict=True):
        assert (b0.position, b0.memory.memory.position) == (b1.position, b1.memory.memory.position) == (29, 29)
        assert b1.committed.position == b0.committed.position == 24
        for w0, w1 in zip(b0.memory.memory.weights, b1.memory.memory.weights, strict=True):
            torch.testing.assert_close(w1, w0, rtol=1e-12, atol=1e-12)
        for w0, w1 in zip(b0.committed.weights, b1.committed.weights, strict=True):
            torch.testing.assert_close(w1, w0, rtol=1e-12, atol=1e-12)

    # the compiled model's state continues a stream exactly like the eager one's (eval: eager code, both sides)
    more = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        next0, _, _ = eager(more, state=s0)
        next1, _, _ = compiled(more, state=s1)
    torch.testing.assert_close(next1, next0, rtol=1e-12, atol=1e-12)
    assert counts == {"major": [6, 6], "block": [0, 0]}  # no compiled call with gradients off

    # switched off again: the eager path only
    compiled.compile_blocks(enabled=False)
    assert compiled._compiled_layers is None
    assert all(block._compiled_segment is None for block in compiled.blocks)


def test_segment_major_order_equals_the_block_order_with_a_partial_group_and_carried_states() -> None:
    """MACLM's compiled path runs whole segments segment-major, two blocks per call: with 3 layers (a group of 2 and
    a group of 1) over three calls of one stream (aligned, aligned with a tail, then starting mid-segment, which
    falls back to the block-by-block order and each block's own compiled segment), the logits, the loss summed over
    the calls, every gradient and the final state equal the eager model's in float64. This tests the order and the
    state plumbing: the "compiled" functions here are the traced functions themselves (tracing is the test above)."""
    from titans.models.mac_fast import _segment_through

    cfg = tiny_config("MAC")
    cfg.n_layers = 3
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg).to(DT))
    eager, compiled = models
    compiled.compile_blocks(backend="aot_eager")
    compiled._compiled_layers = _segment_through
    for block in compiled.blocks:
        block._compiled_segment = block._segment_at_start
    counts = count_compiled_calls(compiled)
    idx = torch.randint(0, VOCAB, (2, 16 + 11 + 13), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for model in (eager, compiled):
        state, logits, total = None, [], 0.0
        for lo, hi in ((0, 16), (16, 27), (27, 40)):  # positions 0 and 16 are segment boundaries, 27 is not
            out, loss, state = model(idx[:, lo:hi], targets[:, lo:hi], state)
            logits.append(out)
            total = total + loss
        total.backward()
        results.append((torch.cat(logits, 1), state, {n: p.grad for n, p in model.named_parameters()}))
    (l0, s0, g0), (l1, s1, g1) = results
    # segment-major: 2 + 1 whole segments per block; then the unaligned call's one whole segment, block by block
    assert counts == {"major": [3, 3, 3], "block": [1, 1, 1]}
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)
    for b0, b1 in zip(s0.block_states, s1.block_states, strict=True):
        assert (b1.position, b1.committed.position) == (b0.position, b0.committed.position) == (40, 40)
        for w0, w1 in zip(b0.memory.memory.weights, b1.memory.memory.weights, strict=True):
            torch.testing.assert_close(w1, w0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, needs_compiler])])
@pytest.mark.parametrize("variant", ["LMM", pytest.param("MAG", marks=pytest.mark.slow), "MAL"])
def test_compiled_memory_chunks_equal_eager(variant: str, backend: str, monkeypatch) -> None:
    """LMM, MAG and MAL compile the memory's per-chunk step: same logits, loss, gradients and state, with the
    scan's gradient checkpoints on (5 chunks, groups of 2) and a partial last chunk (eager)."""
    import titans.memory.chunked as chunked

    calls = [0]
    real = chunked.compiled_chunk

    def counting(backend: str = "inductor", device_type: str = "cpu"):
        compiled = real(backend, device_type)

        def counted(*args):
            calls[0] += 1
            return compiled(*args)

        return counted

    monkeypatch.setattr(chunked, "compiled_chunk", counting)
    cfg = tiny_config(variant, checkpoint_every=2, impl="chunked")  # compiled chunks serve the chunked scan
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg).to(DT))
    eager, compiled = models
    compiled.compile_blocks(backend=backend)
    idx = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (eager, compiled):
        logits, loss, state = model(idx, torch.roll(idx, -1, dims=1))
        loss.backward()
        results.append((logits, loss, state, {n: p.grad for n, p in model.named_parameters()}))
    (l0, loss0, s0, g0), (l1, loss1, s1, g1) = results
    # (19 + 2 persistent tokens) // 4 = 5 whole chunks per layer, forward and checkpoint recomputation
    # (LMM's and MAL's memory runs first; MAG's beside the attention: every variant has 2 memory layers)
    assert calls[0] >= 2 * 5
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)
    for b0, b1 in zip(s0.block_states, s1.block_states, strict=True):
        m0 = b0 if isinstance(b0, NeuralMemoryState) else b0.memory
        m1 = b1 if isinstance(b1, NeuralMemoryState) else b1.memory
        for w0, w1 in zip(m0.memory.weights, m1.memory.weights, strict=True):
            torch.testing.assert_close(w1, w0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, needs_compiler])])
@pytest.mark.parametrize("variant", ["baseline", "LMM", "MAC", "MAG", "MAL"])
def test_compiled_decode_step_equals_eager(variant: str, backend: str) -> None:
    """compile_decode: generate's fixed-shape step traced once serves every position (segment, chunk and window
    boundaries; one compilation, no recompiles) and gives the eager step's logits, greedy and sampled tokens."""
    torch.manual_seed(0)
    model = build_model(tiny_config(variant)).to(DT).eval()
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(1))
    eager_greedy = model.generate(prompt, 21, temperature=0)
    eager_sampled = model.generate(prompt, 21, temperature=0.8, generator=torch.Generator().manual_seed(5))

    model.compile_decode(backend=backend)
    compiled = model._compiled_step
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return compiled(*args)

    model._compiled_step = counted
    assert torch.equal(model.generate(prompt, 21, temperature=0), eager_greedy)  # the first step compiles...
    assert calls[0] == 20
    # generate skips per-step guard checks after its first compiled step, and restores the stance afterwards
    assert not torch._dynamo.eval_frame._stance.skip_guard_eval_unsafe
    with torch.compiler.set_stance("fail_on_recompile"):  # ...and every later step, of any generation, reuses it
        sampled = model.generate(prompt, 21, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(sampled, eager_sampled)

    # logits step by step against the eager step, from one prefill
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        _, _, state = model(prompt)
        eager_states = model._fixed_states(state, capacity=24)
        compiled_states = model._fixed_states(state, capacity=24)
        for t in range(21):
            token = torch.full((2, 1), t % VOCAB)
            want, eager_states = model._fixed_step(token, eager_states)
            got, compiled_states = compiled(token, compiled_states)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    model.compile_decode(enabled=False)
    assert model._compiled_step is None


def test_compile_without_a_compiler_is_a_config_error(monkeypatch, tmp_path) -> None:
    import titans.train as train_module

    monkeypatch.setattr(train_module, "cpu_compiler", lambda: None)
    cfg = RunConfig(training=TrainingConfig(compile=True, max_steps=1, out_dir=str(tmp_path), device="cpu"))
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        train_module.train(cfg)


@pytest.mark.parametrize("variant", ["LMM", "MAG"])
def test_compiling_blocks_keeps_the_fused_memory_scan(variant: str, monkeypatch) -> None:
    """training.compile with the default fused scan: LMM, MAG and MAL keep the fused op (it beats compiled chunks),
    so no chunk is compiled and the results are the eager model's."""
    import titans.memory.chunked as chunked

    def refuse(*args, **kwargs):
        raise AssertionError("compiled chunks used with the fused scan")

    monkeypatch.setattr(chunked, "compiled_chunk", refuse)
    torch.manual_seed(0)
    model = build_model(tiny_config(variant)).to(DT)
    idx = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    expected, _, _ = model(idx)
    model.compile_blocks(backend="aot_eager")
    logits, _, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
