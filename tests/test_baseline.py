"""The baseline LM and the shared backbone: causality, streaming, cached decoding, gradients, learning, registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from titans.config import ModelConfig
from titans.models import MODELS, LMState, TitansLM, build_model, num_parameters
from titans.models.baseline import BaselineBlock
from titans.tasks.base import IGNORE_INDEX

V = 13
KINDS = ["full", "sliding"]


def make_cfg(kind: str = "full", **overrides) -> ModelConfig:
    base = dict(variant="baseline", d_model=16, n_heads=2, n_layers=2, vocab_size=V, window=4, baseline_attention=kind)
    return ModelConfig(**{**base, **overrides})


def make_model(kind: str = "full", seed: int = 0, **overrides) -> TitansLM:
    torch.manual_seed(seed)
    return build_model(make_cfg(kind, **overrides)).double()


def make_prefixed_model(n_prefix: int = 3, seed: int = 0) -> TitansLM:
    """The backbone with persistent tokens over sliding-window blocks that keep the prefix visible."""
    torch.manual_seed(seed)
    cfg = make_cfg("sliding")
    return TitansLM(cfg, lambda c, i: BaselineBlock(c, i, n_prefix=n_prefix), n_prefix=n_prefix).double()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def stream_logits(model: TitansLM, idx: torch.Tensor, splits: list[int]) -> torch.Tensor:
    outs, state, start = [], None, 0
    for n in splits:
        logits, _, state = model(idx[:, start : start + n], state=state)
        outs.append(logits)
        start += n
    assert start == idx.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_causal(kind):
    model = make_model(kind)
    idx = tokens(2, 17)
    logits, _, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % V
        logits2, _, _ = model(changed)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1])
        assert (logits2[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("splits", [[3, 1, 7, 2, 6], [1] * 19, [10, 9]], ids=["random", "tokens", "halves"])
def test_streaming_equals_one_pass(kind, splits):
    model = make_model(kind)
    idx = tokens(2, 19)
    whole, _, _ = model(idx)
    torch.testing.assert_close(stream_logits(model, idx, splits), whole)


def test_streaming_with_persistent_tokens():
    model = make_prefixed_model()
    idx = tokens(2, 19)
    whole, _, state = model(idx)
    assert whole.shape == (2, 19, V) and state.prefix_emitted
    torch.testing.assert_close(stream_logits(model, idx, [1] * 19), whole)
    torch.testing.assert_close(stream_logits(model, idx, [5, 2, 12]), whole)
    # an explicit fresh state (prefix not yet emitted) is the same as state None
    fresh = LMState([None] * len(model.blocks), prefix_emitted=False)
    torch.testing.assert_close(model(idx, state=fresh)[0], whole)


def test_persistent_tokens_stay_visible_beyond_the_window():
    """Receptive field of 2 sliding layers with W=4 is 7 tokens; the prefix still reaches position 18."""
    model = make_prefixed_model()
    idx = tokens(1, 19)
    before, _, _ = model(idx)
    with torch.no_grad():
        model.persistent.add_(torch.randn_like(model.persistent))
    after, _, _ = model(idx)
    assert (after[:, -1] - before[:, -1]).abs().max() > 1e-6


def test_sliding_window_cannot_see_beyond_its_receptive_field():
    """n_layers sliding layers of window W see back n_layers * (W - 1) tokens, and no further."""
    model = make_model("sliding", n_layers=2, window=4)
    reach = 2 * (4 - 1)
    idx = tokens(1, 20)
    t = 19
    logits, _, _ = model(idx)
    beyond, inside = idx.clone(), idx.clone()
    beyond[:, t - reach - 1] = (beyond[:, t - reach - 1] + 1) % V
    inside[:, t - reach] = (inside[:, t - reach] + 1) % V
    torch.testing.assert_close(model(beyond)[0][:, t], logits[:, t])
    assert (model(inside)[0][:, t] - logits[:, t]).abs().max() > 1e-8
    # the full-attention baseline does see the far token
    full = make_model("full", n_layers=2)
    assert (full(beyond)[0][:, t] - full(idx)[0][:, t]).abs().max() > 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generate_equals_uncached(kind):
    model = make_model(kind)
    prompt = tokens(2, 5)
    greedy = model.generate(prompt, 12, temperature=0.0)
    assert torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 12, temperature=0.0, use_cache=False))
    assert torch.equal(greedy, model.generate(prompt, 12, top_k=1))
    # sampling consumes the generator identically on both paths
    sampled = model.generate(prompt, 12, top_k=5, generator=torch.Generator().manual_seed(3))
    uncached = model.generate(prompt, 12, top_k=5, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(sampled, uncached)


def test_cached_generate_with_persistent_tokens():
    model = make_prefixed_model()
    prompt = tokens(2, 3)
    cached = model.generate(prompt, 10, temperature=0.0)
    assert torch.equal(cached, model.generate(prompt, 10, temperature=0.0, use_cache=False))


def test_greedy_generate_picks_the_argmax():
    model = make_model("full")
    prompt = tokens(2, 4)
    out = model.generate(prompt, 1, temperature=0.0)
    assert torch.equal(out[:, -1], model(prompt)[0][:, -1].argmax(-1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model().generate(tokens(1, 3), **kwargs)


@pytest.mark.parametrize("kind", [*KINDS, "prefixed"])
def test_every_parameter_gets_a_gradient(kind):
    model = make_prefixed_model() if kind == "prefixed" else make_model(kind)
    idx = tokens(2, 11)
    _, loss, _ = model(idx, targets=tokens(2, 11, seed=2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_averages_over_scored_targets_only():
    model = make_model()
    idx, targets = tokens(2, 9), tokens(2, 9, seed=2)
    targets[0, :4] = IGNORE_INDEX
    logits, loss, _ = model(idx, targets=targets)
    keep = targets != IGNORE_INDEX
    expected = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)
    _, none_scored, _ = model(idx, targets=torch.full_like(targets, IGNORE_INDEX))
    assert none_scored.item() == 0.0


def test_init_scales_residual_projections():
    model = build_model(make_cfg(d_model=64, n_layers=8))
    std = model.blocks[0].attn.out.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert num_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_overfits_a_small_batch(kind):
    torch.manual_seed(0)
    model = build_model(make_cfg(kind, d_model=32, n_heads=2, n_layers=2, vocab_size=V))
    idx, targets = tokens(4, 12, seed=5), tokens(4, 12, seed=6)
    # distinct first tokens make every prefix unique, so the random targets are learnable to loss ~0
    idx[:, 0] = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        _, loss, _ = model(idx, targets=targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0
    assert loss.item() < 0.01


def test_build_model_errors(monkeypatch):
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(make_cfg(vocab_size=None))
    # ModelConfig validates its own fields; build_model re-checks a config mutated after construction
    cfg = make_cfg()
    cfg.variant = "transformer"
    with pytest.raises(ValueError, match="unknown model variant"):
        build_model(cfg)
    cfg = make_cfg()
    cfg.baseline_attention = "local"
    with pytest.raises(ValueError, match="baseline_attention"):
        build_model(cfg)
    cfg = make_cfg()
    cfg.variant = "BASELINE"
    assert isinstance(build_model(cfg), TitansLM)
    monkeypatch.delitem(MODELS, "baseline")
    with pytest.raises(ValueError, match="not implemented yet"):
        build_model(make_cfg())


def test_forward_rejects_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="long"):
        model(tokens(1, 4).float())
    with pytest.raises(ValueError, match="targets shape"):
        model(tokens(1, 4), targets=tokens(1, 5))
    with pytest.raises(ValueError, match="block states"):
        model(tokens(1, 4), state=LMState([None], prefix_emitted=False))


def test_config_is_not_mutated():
    cfg = make_cfg()
    before = dataclasses.asdict(cfg)
    build_model(cfg)
    assert dataclasses.asdict(cfg) == before
