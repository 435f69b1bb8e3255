"""docs/paper_alignment.md states facts of the code; these tests pin them, so the document cannot go stale again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from titans.config import MemoryConfig, ModelConfig
from titans.memory import NeuralMemory
from titans.models.layers import Attention

ALIGNMENT = (Path(__file__).resolve().parents[1] / "docs" / "paper_alignment.md").read_text()


def row(component: str) -> str:
    """The table row of docs/paper_alignment.md whose first cell starts with `component`."""
    rows = [line for line in ALIGNMENT.splitlines() if line.startswith(f"| {component}")]
    assert len(rows) == 1, f"expected one row for {component!r} in docs/paper_alignment.md, found {len(rows)}"
    return rows[0]


def test_the_initial_gates_the_document_states_are_the_codes() -> None:
    memory = NeuralMemory.from_config(ModelConfig())
    theta = memory.max_lr * torch.sigmoid(memory.to_theta.bias).mean().item()
    eta, alpha = (torch.sigmoid(layer.bias).mean().item() for layer in (memory.to_eta, memory.to_alpha))
    # The input weights are small at initialisation, so the biases set where the gates start.
    assert f"θ = {theta:.2f}, η = {eta:.1f}, α = {alpha:.2f} in MAC" in row("Gate parameterisation")
    lmm = NeuralMemory.from_config(ModelConfig(variant="LMM"))  # the LMM's own theta (memory_defaults)
    lmm_theta = lmm.max_lr * torch.sigmoid(lmm.to_theta.bias).mean().item()
    assert f"θ = {lmm_theta:.2f} for the LMM" in row("Gate parameterisation")


def test_the_lmm_without_momentum_is_recorded_as_a_deviation() -> None:
    built = {v: NeuralMemory.from_config(ModelConfig(variant=v)).momentum for v in ("LMM", "MAC", "MAG", "MAL")}
    assert built == {"LMM": False, "MAC": True, "MAG": True, "MAL": True}
    text = row("Momentum S_t")
    assert "faithful in MAC, MAG, MAL; deviates (the LMM's default: off)" in text and "**off for the LMM**" in text


def test_the_inner_gradient_clip_is_on_by_default_and_recorded_as_a_deviation() -> None:
    clip = MemoryConfig().inner_grad_clip
    assert clip is not None  # the default deviates from Eq. 14 ...
    text = row("Per-token inner-gradient clip")
    assert "| deviates |" in text and f"`memory.inner_grad_clip` = {clip}" in text  # ... and says so


def test_mals_attention_keeps_the_persistent_prefix_visible_as_recorded() -> None:
    cfg = ModelConfig(variant="MAL", d_model=32, n_heads=4, window=4, persistent_memory_size=2)
    attention = Attention.persistent_window(cfg).double()
    x = torch.randn(1, 14, 32, dtype=torch.float64)
    base, _ = attention(x)

    def last_output_after_changing(position: int) -> torch.Tensor:
        changed = x.clone()
        changed[:, position] += 1.0
        return attention(changed)[0][:, -1]

    # The last query (position 13, window 4) sees positions 10..13 and the two prefix positions, nothing else.
    assert not torch.allclose(last_output_after_changing(0), base[:, -1])  # a persistent position: visible
    assert torch.allclose(last_output_after_changing(5), base[:, -1])  # outside the window: not
    assert "| deviates |" in row("The persistent prefix in MAL's attention")


def test_the_conv_carry_across_mac_segments_matches_the_kernel() -> None:
    kernel = MemoryConfig().conv_kernel
    text = row("The causal convs across a segment boundary")
    assert f"`memory.conv_kernel` = {kernel}" in text and f"the last {kernel - 1} tokens" in text


def first_tokens_influence_on_last(memory: NeuralMemory, length: int) -> float:
    """|d sum(y[T-16:]) / d x[:16]|: how far the memory's recurrence carries a perturbation of the first chunk."""
    torch.manual_seed(0)
    x = torch.randn(1, length, memory.dim, dtype=torch.float64, requires_grad=True)
    y, _ = memory(x)
    y[:, -16:].sum().backward()
    return x.grad[:, :16].norm().item()


@pytest.mark.parametrize(("alpha_init", "explodes"), [(None, False), (0.01, True)])
def test_decay_under_the_layernorm_explodes_the_outer_gradient_unless_alpha_starts_small(alpha_init, explodes) -> None:
    torch.manual_seed(0)
    # at theta_init 0.05, where the row's numbers were measured (at 0.25, the LMM's default, 0.01 stays bounded too)
    options = dict(heads=4, residual_norm=True, channelwise_forget=True, grad_clip=1.0, alpha_init=alpha_init)
    memory = NeuralMemory(64, theta_init=0.05, **options).double()
    growth = first_tokens_influence_on_last(memory, 1024) / first_tokens_influence_on_last(memory, 256)
    # The row states both numbers; the plain memory keeps 0.01 (test above), the residual + LN memory starts at 1e-4.
    assert (growth > 1e3) if explodes else (growth < 2), growth
    assert memory.alpha_init == (alpha_init or 1e-4)
    assert "α = 0.01" in row("Residual + LayerNorm") and "initial value** is 1e-4" in row("Residual + LayerNorm")
