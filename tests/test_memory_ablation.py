"""memory-check's update-rule ablations: each means what it says, on the fast path as on the naive reference."""

from __future__ import annotations

import pytest
import torch

from titans.memory import NeuralMemory
from titans.memory.ablation import MemoryAblation
from titans.memory_ablations import critique_verdict

DT = torch.float64

ABLATIONS = {
    "theta x 0.5": MemoryAblation(theta_scale=0.5),
    "ascent": MemoryAblation(theta_scale=-1.0),
    "momentum off": MemoryAblation(momentum=False),
    "forgetting off": MemoryAblation(forgetting=False),
    "last layer only": MemoryAblation(layers=(1,)),
    "first layer only, ascent": MemoryAblation(theta_scale=-1.0, layers=(0,)),
    "reset at 7": MemoryAblation(reset_at=7),
}


def make_memory(**kw) -> NeuralMemory:
    torch.manual_seed(0)
    options = dict(dim=16, heads=2, depth=2, expansion=2, chunk_size=4)
    options.update(kw)
    mem = NeuralMemory(**options).to(DT)
    with torch.no_grad():  # gates that differ per token and per layer, so a wrong mask or sign shows
        for proj in (mem.to_theta, mem.to_eta, mem.to_alpha):
            if proj is not None:
                proj.weight.normal_(0.0, 0.5)
    return mem


def run(mem: NeuralMemory, x: torch.Tensor, ablation: MemoryAblation | None, state=None):
    mem.ablation = ablation
    try:
        return mem(x, state)
    finally:
        mem.ablation = None


def assert_same(a, b) -> None:
    (ya, sa), (yb, sb) = a, b
    torch.testing.assert_close(ya, yb)
    for wa, wb in zip(sa.memory.weights + sa.memory.momentum, sb.memory.weights + sb.memory.momentum, strict=True):
        torch.testing.assert_close(wa, wb)


@pytest.mark.parametrize("name", ABLATIONS)
@pytest.mark.parametrize("gates", ["per-layer", "shared", "channel-wise"])
def test_fused_equals_naive_under_every_ablation(name: str, gates: str) -> None:
    options = {"per_layer_gates": gates != "shared", "channelwise_forget": gates == "channel-wise"}
    fused, naive = make_memory(**options), make_memory(impl="naive", **options)
    x = torch.randn(2, 19, 16, dtype=DT)
    assert_same(run(fused, x, ABLATIONS[name]), run(naive, x, ABLATIONS[name]))
    # and the ablation changes something
    assert not torch.allclose(run(fused, x, ABLATIONS[name])[0], fused(x)[0])


def test_no_change_is_the_plain_layer() -> None:
    mem = make_memory()
    x = torch.randn(2, 19, 16, dtype=DT)
    assert_same(run(mem, x, MemoryAblation()), mem(x))


@pytest.mark.parametrize("switch", ["momentum", "forgetting"])
def test_a_gate_switched_off_equals_a_layer_built_without_it(switch: str) -> None:
    mem = make_memory()
    without = make_memory(**{switch: False})
    without.load_state_dict(mem.state_dict(), strict=False)  # the same weights, less the switched-off gate
    x = torch.randn(2, 19, 16, dtype=DT)
    assert_same(run(mem, x, MemoryAblation(**{switch: False})), without(x))


def test_no_writes_and_no_forgetting_keep_m0() -> None:
    mem = make_memory()
    _, state = run(mem, torch.randn(2, 19, 16, dtype=DT), MemoryAblation(theta_scale=0.0, forgetting=False))
    for w, w0 in zip(state.memory.weights, mem.network.initial_weights, strict=True):
        torch.testing.assert_close(w, w0.expand_as(w))


@pytest.mark.parametrize("per_layer_gates", [True, False])
@pytest.mark.parametrize("written", [0, 1])
def test_only_the_named_layer_is_written(per_layer_gates: bool, written: int) -> None:
    mem = make_memory(per_layer_gates=per_layer_gates)
    _, state = run(mem, torch.randn(2, 19, 16, dtype=DT), MemoryAblation(layers=(written,)))
    for i, (w, w0) in enumerate(zip(state.memory.weights, mem.network.initial_weights, strict=True)):
        assert torch.equal(w, w0.expand_as(w)) == (i != written)


def test_ascent_raises_the_surprise_that_descent_lowers() -> None:
    mem = make_memory(heads=1, momentum=False, forgetting=False)
    block = torch.randn(1, 12, 16, dtype=DT)
    x = block.repeat(1, 4, 1)
    for scale, falls in ((1.0, True), (-1.0, False)):
        stats: dict[str, torch.Tensor] = {}
        mem.ablation = MemoryAblation(theta_scale=scale)
        mem(x, stats=stats)
        mem.ablation = None
        per_pass = stats["surprise"][0, 0].view(4, 12).mean(dim=1)
        assert bool(per_pass[-1] < per_pass[0]) == falls, (scale, per_pass)


def test_reset_starts_a_fresh_memory_at_the_named_token() -> None:
    mem = make_memory(conv_kernel=1)  # no conv history, so the second half is exactly a fresh stream
    x = torch.randn(2, 20, 16, dtype=DT)
    y, _ = run(mem, x, MemoryAblation(reset_at=8))  # 8: a chunk boundary, so chunks align with a fresh stream
    torch.testing.assert_close(y[:, :8], mem(x)[0][:, :8])
    torch.testing.assert_close(y[:, 8:], mem(x[:, 8:])[0])


@pytest.mark.parametrize("split", [[3, 4, 13], [7, 13], [8, 12], [20], [2, 9, 9]], ids=str)
def test_reset_streams_like_one_call(split: list[int]) -> None:
    mem = make_memory()
    x = torch.randn(2, 20, 16, dtype=DT)
    ablation = MemoryAblation(reset_at=7)
    full = run(mem, x, ablation)
    state, outs, start = None, [], 0
    for n in split:
        y, state = run(mem, x[:, start : start + n], ablation, state)
        outs.append(y)
        start += n
    assert_same((torch.cat(outs, dim=1), state), full)


def test_bad_ablations_are_refused() -> None:
    with pytest.raises(ValueError, match="reset_at"):
        MemoryAblation(reset_at=0)
    mem = make_memory()
    with pytest.raises(ValueError, match="beyond the memory's depth"):
        run(mem, torch.randn(1, 4, 16, dtype=DT), MemoryAblation(layers=(2,)))


def _table(
    trained: tuple[float, float], frozen: tuple[float, float], doubled: tuple[float, float], ascent: tuple[float, float]
):
    """The rows the verdict reads, from (test loss, inner loss) each."""
    names = ("as trained", "frozen at M_0", "theta x 2", "ascent (theta x -1)")
    return {
        n: {"test_loss": t, "inner_loss": i}
        for n, (t, i) in zip(names, (trained, frozen, doubled, ascent), strict=True)
    }


def test_the_critique_verdict_reads_the_table() -> None:
    # the default copy run of docs/results.md: neither observation holds
    copy = _table(trained=(0.015, 1.51), frozen=(8.586, 2.44), doubled=(1.874, 2.70), ascent=(7.229, 21.9))
    assert critique_verdict(copy) == {
        "larger_step_lowers_inner_loss_but_hurts_task": False,
        "ascent_about_as_good_as_descent": False,
    }
    # a memory where both hold: doubling the step lowers the inner loss and raises the test loss, ascent nearly
    # matches descent
    both = _table(trained=(2.0, 1.0), frozen=(6.0, 1.5), doubled=(3.0, 0.8), ascent=(2.3, 5.0))
    assert critique_verdict(both) == {
        "larger_step_lowers_inner_loss_but_hurts_task": True,
        "ascent_about_as_good_as_descent": True,
    }
    # a diverged ascent (NaN test loss) does not count as working
    both["ascent (theta x -1)"]["test_loss"] = float("nan")
    assert not critique_verdict(both)["ascent_about_as_good_as_descent"]
