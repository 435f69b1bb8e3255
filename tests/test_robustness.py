"""Robustness of the model and its inputs: bad input fails early and clearly, the inner loop stays finite, and long
streams run in bounded memory.

Covered elsewhere and not repeated here:
    tests/test_training_robustness.py  training: divergence is caught, interruption loses nothing, nothing leaks
    tests/test_config.py      every config key's type/range error, impossible combinations, and the hypothesis
                              properties (random YAML text, random YAML documents, random overrides: a RunConfig or
                              a ConfigError, nothing else; file and overrides agree; loaded configs round-trip)
    tests/test_checkpoint.py  SIGKILL in the middle of a save leaves every checkpoint loadable; corrupt files skipped
    tests/test_train.py       NaN loss stops with the knobs and keeps the last good checkpoint, or skips the step;
                              SIGINT/SIGTERM (raised in-process) checkpoint and resume exactly; crash-resume exactness
"""

from __future__ import annotations

import pytest
import torch

from titans.config import ConfigError, MemoryConfig, ModelConfig
from titans.memory import NeuralMemory
from titans.models import TitansLM, build_model
from titans.tasks.base import IGNORE_INDEX

V = 12
VARIANTS = ["baseline", "LMM", "MAC", "MAG", "MAL"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(variant: str = "LMM", dtype: torch.dtype = torch.float32, **overrides) -> TitansLM:
    fields = dict(
        variant=variant,
        d_model=16,
        n_heads=2,
        n_layers=2,
        vocab_size=V,
        window=6,
        segment_len=6,
        persistent_memory_size=2,
        memory=MemoryConfig(chunk_size=4),
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return build_model(ModelConfig(**fields)).to(dtype)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def count_embedding_calls(model: TitansLM) -> list[int]:
    """A counter that grows each time the model starts computing (its embedding runs first)."""
    calls = [0]
    model.embed.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# Input validation: each bad input is a ValueError/TypeError naming the value and the fix, raised before any compute.


@pytest.mark.parametrize(
    "make_idx, error, expected",
    [
        (lambda: torch.tensor([[1, 2, V]]), ValueError, f"token id {V}, outside the vocabulary [0, {V})"),
        (lambda: torch.tensor([[1, -1, 2]]), ValueError, "token id -1, outside the vocabulary"),
        (lambda: tokens(2, 5).float(), ValueError, "dtype torch.float32; convert with idx.long()"),
        (lambda: tokens(2, 5).int(), ValueError, "dtype torch.int32; convert with idx.long()"),
        (lambda: tokens(1, 5)[0], ValueError, "got shape (5,); add a batch dimension with idx.unsqueeze(0)"),
        (lambda: tokens(2, 5)[..., None], ValueError, "got shape (2, 5, 1)"),
        (lambda: tokens(2, 0), ValueError, "B >= 1 and T >= 1, got shape (2, 0)"),
        (lambda: tokens(0, 5), ValueError, "B >= 1 and T >= 1, got shape (0, 5)"),
        (lambda: [[1, 2, 3]], TypeError, "idx must be a torch.Tensor of token ids, got list"),
    ],
    ids=["id-too-big", "id-negative", "float", "int32", "rank-1", "rank-3", "empty-T", "empty-B", "list"],
)
def test_bad_token_input_fails_before_any_compute(make_idx, error, expected):
    model = tiny_model("MAG")
    calls = count_embedding_calls(model)
    with pytest.raises(error) as raised:
        model(make_idx())
    assert expected in str(raised.value)
    with pytest.raises(error) as raised:
        model.generate(make_idx(), max_new_tokens=2)
    assert expected in str(raised.value)
    assert calls[0] == 0


@pytest.mark.parametrize(
    "make_targets, error, expected",
    [
        (lambda: tokens(2, 5).clamp(max=V - 2) + 1, None, None),  # valid: shifted ids stay in range
        (lambda: torch.full((2, 5), IGNORE_INDEX), None, None),  # valid: nothing scored
        (lambda: torch.full((2, 5), V), ValueError, f"targets hold id {V}, outside the vocabulary [0, {V})"),
        (lambda: torch.full((2, 5), -3), ValueError, "unscored positions must be IGNORE_INDEX (-100)"),
        (lambda: tokens(2, 5).float(), ValueError, "targets must be a long (int64) tensor, got dtype torch.float32"),
        (lambda: tokens(2, 6), ValueError, "targets shape (2, 6) must equal idx shape (2, 5)"),
        (lambda: [1, 2], TypeError, "targets must be a torch.Tensor or None, got list"),
    ],
    ids=["ok", "all-ignored", "too-big", "negative", "float", "shape", "list"],
)
def test_bad_targets_fail_before_any_compute(make_targets, error, expected):
    model = tiny_model("baseline")
    calls = count_embedding_calls(model)
    if error is None:
        _, loss, _ = model(tokens(2, 5), make_targets())
        assert torch.isfinite(loss) and calls[0] == 1
        return
    with pytest.raises(error) as raised:
        model(tokens(2, 5), make_targets())
    assert expected in str(raised.value)
    assert calls[0] == 0


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0, got -1"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int >= 0, got True"),
        ({"max_new_tokens": 2, "temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"max_new_tokens": 2, "temperature": -1.0}, "(0 = greedy), got -1.0"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k must be an int >= 1 or None (no truncation), got 0"),
        ({"max_new_tokens": 2, "top_k": 2.5}, "got 2.5"),
    ],
)
def test_bad_generate_arguments_fail_before_any_compute(kwargs, expected):
    model = tiny_model("LMM")
    calls = count_embedding_calls(model)
    with pytest.raises(ValueError) as raised:
        model.generate(tokens(1, 3), **kwargs)
    assert expected in str(raised.value)
    assert calls[0] == 0


def test_state_from_another_model_or_batch_is_refused_before_any_compute():
    lmm, mag = tiny_model("LMM"), tiny_model("MAG")
    wider = tiny_model("LMM", d_model=32)
    _, _, lmm_state = lmm(tokens(2, 5))
    _, _, mag_state = mag(tokens(2, 5))
    calls = count_embedding_calls(lmm)

    with pytest.raises(ValueError) as error:
        lmm(tokens(2, 3), state=mag_state)  # another variant: same block count, different state types
    assert "state was made by a different model, MAG(d_model=16" in str(error.value)
    assert "but this model is LMM(d_model=16" in str(error.value)
    assert "or None to start a stream" in str(error.value)
    with pytest.raises(ValueError, match=r"made by a different model, LMM\(d_model=16.*this model is LMM\(d_model=32"):
        wider(tokens(2, 3), state=lmm_state)  # same variant, other widths
    with pytest.raises(ValueError) as error:
        lmm(tokens(3, 3), state=lmm_state)
    assert "state holds 2 sequences but idx has batch size 3" in str(error.value)
    assert "pass state=None to start new streams" in str(error.value)
    with pytest.raises(TypeError, match="state must be the LMState a previous call returned, or None.*got tuple"):
        lmm(tokens(2, 3), state=(lmm_state,))
    assert calls[0] == 0


def test_state_passes_between_models_of_the_same_configuration():
    """The stamp identifies a configuration, not an object: a copy of the model (e.g. reloaded from a checkpoint),
    here also with another gradient-checkpointing schedule, continues the stream exactly."""
    model = tiny_model("LMM", dtype=torch.float64)
    twin = tiny_model("LMM", dtype=torch.float64, memory=MemoryConfig(chunk_size=4, checkpoint_every=1))
    twin.load_state_dict(model.state_dict())
    idx = tokens(2, 11)
    whole, _, _ = model(idx)
    first, _, state = model(idx[:, :6])
    assert state.signature == model.signature == twin.signature and state.batch_size == 2
    rest, _, _ = twin(idx[:, 6:], state=state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole)
    # The reference implementation computes the same function, so it shares the signature too.
    assert tiny_model("LMM", memory=MemoryConfig(chunk_size=4, impl="naive")).signature == model.signature
    assert tiny_model("LMM", memory=MemoryConfig(chunk_size=8)).signature != model.signature


# ---------------------------------------------------------------------------------------------------------------------
# Numerical safety: bf16 autocast, bounded inner step size (NaN/Inf in training: tests/test_training_robustness.py).


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_on_cpu_is_finite_and_close_to_float32(variant):
    model = tiny_model(variant, n_layers=1)
    idx, targets = tokens(2, 14), tokens(2, 14, seed=2)

    def run(autocast: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, loss, state = model(idx, targets)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return logits.float(), loss, grads, state

    logits32, loss32, grads32, _ = run(False)
    logits16, loss16, grads16, state16 = run(True)

    assert torch.isfinite(logits16).all() and torch.isfinite(loss16) and torch.isfinite(grads16).all()
    assert grads16.numel() == grads32.numel()
    # bf16 keeps ~3 significant digits: relative errors of a few 1e-3 are expected, 3e-2 would be a bug.
    assert ((logits16 - logits32).norm() / logits32.norm()).item() < 3e-2
    assert abs(loss16.item() - loss32.item()) < 1e-2
    assert ((grads16 - grads32).norm() / grads32.norm()).item() < 3e-2
    if variant != "baseline":
        # The inner loop runs in float32 even under autocast: the fast weights it carries are float32.
        block_state = state16.block_states[0]
        memory = block_state if variant == "LMM" else block_state.memory
        assert all(w.dtype == torch.float32 for w in memory.memory.weights)


def test_inner_step_size_is_bounded_whatever_the_input_scale():
    memory = NeuralMemory(dim=16, heads=2, chunk_size=4, max_lr=0.3)
    x = 1e4 * torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theta, eta, alpha = memory._gates(x)
    # theta_t = max_lr * sigmoid(.) saturates at max_lr however large the input; eta, alpha stay in [0, 1].
    assert 0 <= theta.min() and theta.max() <= 0.3
    assert theta.max() > 0.29  # the inputs really are saturating
    assert 0 <= eta.min() and eta.max() <= 1 and 0 <= alpha.min() and alpha.max() <= 1


@pytest.mark.parametrize("variant", ["LMM", "MAC", "MAG", "MAL"])
def test_huge_embeddings_cannot_drive_the_inner_loop_unstable(variant):
    """Every block RMS-normalises what reaches its memory, so the scale of the residual stream never reaches the
    inner loop (raw inputs are another matter: next test)."""
    model = tiny_model(variant, n_layers=1)
    with torch.no_grad():
        model.embed.weight.mul_(1e4)
        logits, _, state = model(tokens(2, 24))
    assert torch.isfinite(logits).all()
    memory = state.block_states[0] if variant == "LMM" else state.block_states[0].memory
    assert all(torch.isfinite(w).all() for w in memory.memory.weights)


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_inner_grad_clip_from_the_config_keeps_raw_huge_inputs_finite(scale):
    """theta is bounded, but an MLP memory's effective step also scales with its hidden activations, and raw inputs
    100x unit scale make unclipped fast weights overflow; model.memory.inner_grad_clip bounds every inner update."""
    cfg = ModelConfig(d_model=16, n_heads=2, memory=MemoryConfig(chunk_size=4, inner_grad_clip=1.0))
    torch.manual_seed(0)
    memory = NeuralMemory.from_config(cfg)
    assert memory.grad_clip == 1.0
    x = scale * torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, state = memory(x)
    assert torch.isfinite(y).all() and all(torch.isfinite(w).all() for w in state.memory.weights)
    with pytest.raises(ConfigError, match="model.memory.inner_grad_clip must be > 0 or null"):
        MemoryConfig(inner_grad_clip=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bounded streams.


def state_bytes(state: object) -> int:
    """Bytes of every tensor reachable from a (nested dataclass / list / tuple) state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, list | tuple):
        return sum(state_bytes(s) for s in state)
    if hasattr(state, "__dict__"):
        return sum(state_bytes(v) for v in vars(state).values())
    return 0


@pytest.mark.parametrize("variant", ["LMM", "MAG"])
def test_streaming_state_is_bounded_and_equals_one_pass(variant):
    model = tiny_model(variant, dtype=torch.float64)
    idx = tokens(2, 120)
    with torch.no_grad():
        whole, _, _ = model(idx)
        pieces, sizes, state = [], [], None
        for start in range(0, 120, 20):
            logits, _, state = model(idx[:, start : start + 20], state=state)
            pieces.append(logits)
            sizes.append(state_bytes(state))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole)
    # After the first piece (the window's KV cache is full by then) the carried state never grows.
    assert len(set(sizes)) == 1, sizes
    assert not any(t.requires_grad for t in _tensors(state))


def _tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, list | tuple):
        return [t for s in state for t in _tensors(s)]
    if hasattr(state, "__dict__"):
        return [t for v in vars(state).values() for t in _tensors(v)]
    return []
