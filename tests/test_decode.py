"""The one-token decode path equals the general path: memory step, NeuralMemory, attention, every variant, caches."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_configs import tiny_model_config

from titans.memory import MemoryMLP, NeuralMemory, chunked_memory
from titans.memory.step import decode_linear, step_memory
from titans.models import build_model
from titans.models.layers import Attention

DT = torch.float64
OPTIONS = {
    "default": {},
    "no-momentum": {"momentum": False},
    "no-forgetting": {"forgetting": False},
    "neither": {"momentum": False, "forgetting": False},
    "channelwise": {"channelwise_forget": True},
    "residual-norm": {"residual_norm": True},
    "grad-clip": {"grad_clip": 0.05},
    "silu": {"activation": "silu"},
    "shared-gates": {"per_layer_gates": False},
    "conv-1": {"conv_kernel": 1},
}


def _slice_gate(gate, t: int):
    if gate is None:
        return None
    if isinstance(gate, list):
        return [g[:, :, t : t + 1] for g in gate]
    return gate[:, :, t : t + 1]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 3, 16])
@pytest.mark.parametrize("option", ["default", "no-momentum", "no-forgetting", "channelwise", "residual", "clip"])
def test_step_memory_equals_chunked_memory_token_by_token(depth: int, chunk: int, option: str) -> None:
    torch.manual_seed(depth * 100 + chunk)
    B, H, T, D = 2, 2, 21, 4
    net = MemoryMLP(D, depth, H, 2, "gelu", option == "residual").to(DT)
    q, k, v = torch.randn(3, B, H, T, D, dtype=DT).unbind(0)
    k = torch.nn.functional.normalize(k, dim=-1)
    # gates in a stable range (large steps with full momentum can diverge to inf, where nothing compares)
    theta = torch.rand(B, H, T, depth, dtype=DT) * 0.1
    eta = None if option == "no-momentum" else torch.rand(B, H, T, depth, dtype=DT) * 0.9
    if option == "channelwise":
        alpha = [torch.rand(B, H, T, d_out, dtype=DT) * 0.1 for d_out, _ in net.shapes]
    else:
        alpha = None if option == "no-forgetting" else torch.rand(B, H, T, dtype=DT) * 0.1
    clip = 0.05 if option == "clip" else None
    reference_stats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        y, final = chunked_memory(q, k, v, theta, eta, alpha, net, None, chunk, reference_stats, clip)
        state, ys, stats = None, [], []
        for t in range(T):
            step_stats: dict[str, torch.Tensor] = {}
            piece = (q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
            gates = (_slice_gate(theta, t), _slice_gate(eta, t), _slice_gate(alpha, t))
            y_t, state = step_memory(*piece, *gates, net, state, chunk, step_stats, clip)
            ys.append(y_t)
            stats.append(step_stats)
    torch.testing.assert_close(torch.cat(ys, dim=2), y)
    for field in ("weights", "momentum", "anchor"):
        for got, want in zip(getattr(state, field), getattr(final, field), strict=True):
            torch.testing.assert_close(got, want)
    assert state.position == final.position == T
    for key in ("surprise", "update_norm"):
        torch.testing.assert_close(torch.cat([s[key] for s in stats], dim=-1), reference_stats[key])


def test_step_memory_is_forward_only_and_takes_one_token() -> None:
    net = MemoryMLP(4, 2, 1, 2).to(DT)
    q = torch.randn(1, 1, 1, 4, dtype=DT)
    theta = torch.full((1, 1, 1), 0.1, dtype=DT)
    with pytest.raises(RuntimeError, match="forward-only"):
        step_memory(q, q, q, theta, None, None, net)
    with torch.no_grad(), pytest.raises(ValueError, match="exactly one token"):
        step_memory(q.expand(1, 1, 2, 4), q.expand(1, 1, 2, 4), q.expand(1, 1, 2, 4), theta, None, None, net)


def _memory(depth: int, chunk: int, **options) -> NeuralMemory:
    torch.manual_seed(0)
    return NeuralMemory(16, heads=2, depth=depth, expansion=2, chunk_size=chunk, **options).to(DT)


def _count_decode_steps(mem: NeuralMemory) -> list[int]:
    calls = [0]
    original = mem.decode_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    mem.decode_step = counted  # instance attribute: forward's self.decode_step finds it
    return calls


@pytest.mark.parametrize(("depth", "chunk", "option"), list(itertools.product([1, 2, 3], [1, 3, 16], OPTIONS)))
def test_neural_memory_token_by_token_equals_one_call(depth: int, chunk: int, option: str) -> None:
    mem = _memory(depth, chunk, **OPTIONS[option])
    calls = _count_decode_steps(mem)
    x = torch.randn(2, 37, 16, dtype=DT)
    with torch.no_grad():
        full, full_state = mem(x)
        assert calls[0] == 0
        # a 5-token prefill (general path) then single tokens (fast path) across several chunk boundaries
        y, state = mem(x[:, :5])
        outs = [y]
        for t in range(5, 37):
            y, state = mem(x[:, t : t + 1], state)
            outs.append(y)
    assert calls[0] == 32
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    torch.testing.assert_close(state.conv, full_state.conv)
    for field in ("weights", "momentum", "anchor"):
        for got, want in zip(getattr(state.memory, field), getattr(full_state.memory, field), strict=True):
            torch.testing.assert_close(got, want)
    assert state.memory.position == full_state.memory.position == 37


def test_neural_memory_stats_match_on_the_fast_path() -> None:
    mem = _memory(2, 4)
    x = torch.randn(2, 9, 16, dtype=DT)
    with torch.no_grad():
        reference: dict[str, torch.Tensor] = {}
        mem(x, stats=reference)
        state, pieces = None, []
        for t in range(9):
            stats: dict[str, torch.Tensor] = {}
            _, state = mem(x[:, t : t + 1], state, stats=stats)
            pieces.append(stats)
    for key in ("surprise", "update_norm"):
        torch.testing.assert_close(torch.cat([p[key] for p in pieces], dim=-1), reference[key])


def test_with_gradients_single_tokens_take_the_general_path_and_train() -> None:
    mem = _memory(2, 3)
    calls = _count_decode_steps(mem)
    x = torch.randn(2, 7, 16, dtype=DT)
    full, _ = mem(x)
    state, outs = None, []
    for t in range(7):
        y, state = mem(x[:, t : t + 1], state)
        outs.append(y)
    assert calls[0] == 0  # the fast path is forward-only: training never reaches it
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    torch.cat(outs, dim=1).square().sum().backward()
    assert mem.network.initial_weights[0].grad is not None
    with torch.no_grad():
        mem.update_memory = False  # the read-only ablation is left to the general path as well
        mem(x[:, :1])
    assert calls[0] == 0


@pytest.mark.parametrize(("window", "n_prefix"), [(None, 0), (4, 0), (4, 3), (6, 2)])
def test_attention_one_token_at_a_time_equals_the_dense_reference(window: int | None, n_prefix: int) -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2, 10000.0, window=window, n_prefix=n_prefix).to(DT)
    x = torch.randn(2, 15, 16, dtype=DT)
    reference = attn.reference_forward(x)
    with torch.no_grad():
        cache, outs = None, []
        for t in range(15):
            y, cache = attn(x[:, t : t + 1], cache)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), reference)


def variant_config(variant: str):
    """tiny_model_config of a variant name with an option after a dash: baseline-full, MAC-attention."""
    name, _, option = variant.partition("-")
    attention = "full" if option == "full" else "sliding"
    memory_input = "attention" if option == "attention" else "residual"
    return tiny_model_config(name, baseline_attention=attention, mac_memory_input=memory_input)


@pytest.mark.parametrize("variant", ["baseline", "LMM", "MAC", "MAC-attention", "MAG", "MAL"])
def test_decoding_token_by_token_equals_one_forward(variant: str) -> None:
    torch.manual_seed(0)
    model = build_model(variant_config(variant)).to(DT)
    idx = torch.randint(0, 11, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, _ = model(idx)
        logits, _, state = model(idx[:, :3])
        pieces = [logits]
        for t in range(3, 23):  # crosses segment (6), chunk (4) and window (5) boundaries
            logits, _, state = model(idx[:, t : t + 1], state=state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_decode_caches_follow_parameter_changes() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_config("MAC")).to(DT).eval()
    idx = torch.randint(0, 11, (1, 9), generator=torch.Generator().manual_seed(2))

    def decoded() -> torch.Tensor:
        with torch.no_grad():
            logits, _, state = model(idx[:, :1])
            pieces = [logits]
            for t in range(1, 9):
                logits, _, state = model(idx[:, t : t + 1], state=state)
                pieces.append(logits)
        return torch.cat(pieces, dim=1)

    before = decoded()
    with torch.no_grad():  # an optimizer-like in-place update of weights the decode path caches
        for block in model.blocks:
            block.persistent.add_(0.5)
            block.qkv.weight.mul_(1.5)
            block.memory.to_qkv.weight.mul_(0.5)
            block.mlp.up.weight.add_(0.1)
        model.head.weight.mul_(2.0)
    after = decoded()
    reference, _, _ = model(idx)  # gradients on: the general path
    torch.testing.assert_close(after, reference.detach())
    assert not torch.allclose(after, before)


def test_decode_caches_follow_a_fused_optimizer() -> None:
    """torch's fused AdamW updates weights without bumping their version counters: evaluation and generation after
    such a step must still read the new weights (TitansLM drops its weight copies on train/eval and generate)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("MAC")).to(DT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    idx = torch.randint(0, 11, (2, 13), generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            logits, _, _ = model(idx)
            generated = model.generate(idx[:, :5], 6, temperature=0)
        with torch.enable_grad():
            reference, _, _ = model(idx)  # gradients on: no cached weights
        torch.testing.assert_close(logits, reference.detach())
        torch.testing.assert_close(generated, model.generate(idx[:, :5], 6, temperature=0, use_cache=False))
        model.train()
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_decode_linear_equals_the_layers_side_by_side() -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 5, bias=False).to(DT), torch.nn.Linear(8, 3).to(DT)]
    x = torch.randn(4, 8, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(decode_linear(x, *layers), torch.cat([layer(x) for layer in layers], dim=1))
        layers[1].bias.add_(1.0)
        torch.testing.assert_close(decode_linear(x, *layers), torch.cat([layer(x) for layer in layers], dim=1))


@pytest.mark.parametrize(("depth", "chunk", "option"), list(itertools.product([1, 2], [1, 3, 16], OPTIONS)))
def test_neural_memory_fixed_step_equals_one_call(depth: int, chunk: int, option: str) -> None:
    """decode_fixed (generate's compiled step: position as a tensor, chunk anchors chosen by selects) equals forward."""
    mem = _memory(depth, chunk, **OPTIONS[option])
    x = torch.randn(2, 29, 16, dtype=DT)
    with torch.no_grad():
        full, full_state = mem(x)
        y, state = mem(x[:, :5])
        fixed, outs = mem.fixed_state(state), [y]
        for t in range(5, 29):
            y, fixed = mem.decode_fixed(x[:, t], fixed)
            outs.append(y.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outs, dim=1), full)
    state = mem.state_from_fixed(fixed)
    torch.testing.assert_close(state.conv, full_state.conv)
    for field in ("weights", "momentum", "anchor"):
        for got, want in zip(getattr(state.memory, field), getattr(full_state.memory, field), strict=True):
            torch.testing.assert_close(got, want)
    assert state.memory.position == full_state.memory.position == 29


@pytest.mark.parametrize(("window", "n_prefix"), [(None, 0), (4, 0), (4, 3), (6, 2), (3, 5)])
@pytest.mark.parametrize("prefill", [1, 4, 8])
def test_attention_fixed_cache_equals_the_dense_reference(window: int | None, n_prefix: int, prefill: int) -> None:
    """decode_fixed's slot layout (prefix slots, a ring of window or capacity slots, masks) equals dense attention,
    including prefills shorter than the prefix and windows the prefix outlasts."""
    torch.manual_seed(0)
    attn = Attention(16, 2, 10000.0, window=window, n_prefix=n_prefix).to(DT)
    x = torch.randn(2, 17, 16, dtype=DT)
    reference = attn.reference_forward(x)
    with torch.no_grad():
        y, cache = attn(x[:, :prefill])
        fixed, outs = attn.fixed_cache(cache, capacity=17), [y]
        for t in range(prefill, 17):
            y, fixed = attn.decode_fixed(x[:, t], fixed)
            outs.append(y.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outs, dim=1), reference)
    assert int(fixed.position) == 17


@pytest.mark.parametrize("variant", ["baseline", "baseline-full", "LMM", "MAC", "MAC-attention", "MAG", "MAL"])
@pytest.mark.parametrize("prefill", [1, 5, 9])
def test_fixed_decode_step_equals_one_forward(variant: str, prefill: int) -> None:
    """generate's step on fixed-shape states (what compile_decode compiles) gives the logits of one forward."""
    torch.manual_seed(0)
    model = build_model(variant_config(variant)).to(DT)
    idx = torch.randint(0, 11, (2, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, full_state = model(idx)
        logits, _, state = model(idx[:, :prefill])
        fixed, pieces = model._fixed_states(state, capacity=26), [logits]
        for t in range(prefill, 26):  # crosses segment (6), chunk (4) and window (5) boundaries
            logits, fixed = model._fixed_step(idx[:, t : t + 1], fixed)
            pieces.append(logits.unsqueeze(1))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    if variant.startswith("MAC"):  # the fixed state converts back to the stream state of one forward
        for block, fixed_block, want in zip(model.blocks, fixed, full_state.block_states, strict=True):
            got = block.state_from_fixed(fixed_block)
            assert got.position == want.position == 26
            for a, b in zip(got.committed.weights, want.committed.weights, strict=True):
                torch.testing.assert_close(a, b)
            for name in ("h_keys", "h_values", "x_keys", "x_values", "retrieve_conv"):
                torch.testing.assert_close(getattr(got, name), getattr(want, name))
            for a, b in zip(got.memory.memory.weights, want.memory.memory.weights, strict=True):
                torch.testing.assert_close(a, b)


def test_generate_falls_back_to_the_stream_step_when_the_memory_is_probed() -> None:
    """A stats probe or the read-only ablation is not implemented by the fixed step: generate takes forward."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("LMM")).to(DT)
    prompt = torch.randint(0, 11, (1, 4), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, 6, temperature=0, use_cache=False)
    for block in model.blocks:
        block.memory.stats_sink = []
    calls = [0]
    model._fixed_step = lambda *a: calls.__setitem__(0, calls[0] + 1)  # must not be reached
    assert torch.equal(model.generate(prompt, 6, temperature=0), expected)
    assert calls[0] == 0
    assert all(len(block.memory.stats_sink) > 0 for block in model.blocks)
