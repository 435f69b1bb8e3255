"""Every variant: causal, streamable, cached generation == uncached, naive == chunked, fully trainable, learns."""

from __future__ import annotations

import copy

import pytest
import torch
from model_configs import VOCAB, tiny_model_config

from titans.models import build_model

DT = torch.float64
VARIANTS = ["baseline", "LMM", "MAC", "MAG", "MAL"]


def small_model(variant: str, seed: int = 0, **memory):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(variant, **memory)).to(DT)


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_across_segment_and_chunk_boundaries(variant: str) -> None:
    model = small_model(variant)
    idx = tokens(2, 19)
    logits, _, _ = model(idx)
    for t in (0, 3, 4, 5, 6, 7, 11, 12, 15):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(19 - t - 1)) % VOCAB
        new_logits, _, _ = model(changed)
        torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(new_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [[1] * 14, [3, 4, 7], [6, 6, 2], [13, 1]], ids=str)
def test_streaming_pieces_equal_one_forward(variant: str, split: list[int]) -> None:
    model = small_model(variant)
    idx = tokens(2, sum(split))
    full, _, _ = model(idx)
    state, pieces, start = None, [], 0
    for n in split:
        logits, _, state = model(idx[:, start : start + n], state=state)
        pieces.append(logits)
        start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_generation_equals_uncached(variant: str) -> None:
    model = small_model(variant)
    prompt = tokens(2, 7)
    cached = model.generate(prompt, 12, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], prompt)


@pytest.mark.parametrize("variant", ["baseline", "MAC", "MAG", "MAL"])
@torch.no_grad()
def test_sdpa_outputs_in_a_heads_last_layout_change_nothing(variant: str, monkeypatch) -> None:
    """CUDA's fused SDPA kernels return results with heads-last strides; a .view on them fails there (it did, on
    the first CUDA run). Handing back CPU results in that layout makes the CPU tests catch such code."""
    model = small_model(variant)
    idx = tokens(2, 17)
    expected_logits, _, _ = model(idx)
    expected_tokens = model.generate(idx[:, :5], 9, temperature=0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def heads_last_layout(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(-3, -2).contiguous().transpose(-3, -2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", heads_last_layout)
    logits, _, _ = model(idx)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(model.generate(idx[:, :5], 9, temperature=0.0), expected_tokens)


@pytest.mark.parametrize("variant", ["LMM", "MAC", "MAG", "MAL"])
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_memory_implementations_give_the_reference_logits_and_gradients(variant: str, impl: str) -> None:
    """The fused scan (the default) and chunked_memory against the per-token reference, on a sequence that crosses
    chunk and segment boundaries and ends inside a chunk: logits and every parameter's gradient."""
    model = small_model(variant, impl=impl)
    naive = small_model(variant, impl="naive")
    naive.load_state_dict(model.state_dict())
    idx = tokens(2, 15)
    a, loss_a, _ = model(idx, idx)
    b, loss_b, _ = naive(idx, idx)
    torch.testing.assert_close(a, b)
    grads_a = torch.autograd.grad(loss_a, list(model.parameters()))
    grads_b = torch.autograd.grad(loss_b, list(naive.parameters()))
    for (name, _), ga, gb in zip(model.named_parameters(), grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant: str) -> None:
    model = small_model(variant)
    idx = tokens(2, 16)
    _, loss, _ = model(idx, idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters with no gradient: {missing}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_a_small_fixed_batch(variant: str) -> None:
    model = small_model(variant).float()
    idx = tokens(4, 16, seed=7)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(120):
        _, loss, _ = model(idx, targets)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


@pytest.mark.parametrize("variant", ["MAC", "MAG", "MAL", "LMM"])
def test_state_is_not_shared_across_the_batch(variant: str) -> None:
    model = small_model(variant)
    idx = tokens(3, 13)
    logits, _, _ = model(idx)
    for b in range(3):
        single, _, _ = model(idx[b : b + 1])
        torch.testing.assert_close(single[0], logits[b])


def test_memory_state_does_not_touch_parameters() -> None:
    """Test-time learning lives in the returned state: parameters are identical after a forward pass."""
    model = small_model("MAC")
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(tokens(2, 30))
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_mac_reuses_persistent_keys_only_until_a_parameter_changes() -> None:
    """Without gradients MAC caches the persistent tokens' keys and values; an in-place parameter update (an
    optimizer step) must invalidate them, so decoding after training never reads stale keys."""
    model = small_model("MAC")
    idx = tokens(2, 9)
    with torch.no_grad():
        model(idx)  # fills the cache
        for block in model.blocks:
            block.persistent.mul_(3.0)
            block.qkv.weight.add_(0.1)
        cached, _, _ = model(idx)
    fresh, _, _ = model(idx)  # with gradients on: nothing is cached
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-12)


def test_mac_memory_on_the_residual_stream_writes_the_normed_input_plus_the_attention_output() -> None:
    """`model.mac_memory_input=residual` (the default) hands the memory h + y (the block's normed input plus the
    attention output) where Eq. 24 read literally (`attention`) hands it y; within the first segment both read the
    same initial memory, so y agrees and the two inputs differ by exactly h. The model stays causal."""
    attention = small_model("MAC", mac_memory_input="attention")
    residual = small_model("MAC")  # the default
    residual.load_state_dict(attention.state_dict())
    seen: dict[str, list[torch.Tensor]] = {"attention": [], "residual": [], "h": []}
    for name, model in (("attention", attention), ("residual", residual)):
        block = model.blocks[0]
        block.memory.register_forward_pre_hook(lambda _, args, name=name: seen[name].append(args[0]))
    attention.blocks[0].register_forward_pre_hook(lambda block, args: seen["h"].append(block.norm(args[0])))
    idx = tokens(2, 6)  # one segment
    with torch.no_grad():
        attention(idx)
        residual(idx)
    torch.testing.assert_close(seen["residual"][0], seen["attention"][0] + seen["h"][0])
    assert not torch.allclose(seen["residual"][0], seen["attention"][0])

    idx = tokens(2, 19)
    logits, _, _ = residual(idx)
    for t in (3, 5, 6, 11):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
        torch.testing.assert_close(residual(changed)[0][:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)
