"""The memory defaults chosen by variant: what null resolves to, that explicit values win, and that a run saves them
as values (so its config and checkpoints keep their meaning if the defaults change)."""

from __future__ import annotations

import pytest
import yaml

from titans.config import MemoryConfig, ModelConfig, load_config
from titans.config.model import memory_defaults, resolved_memory
from titans.memory import NeuralMemory
from titans.run import config_from_checkpoint
from titans.train import train


@pytest.mark.parametrize(
    ("variant", "theta", "exact", "momentum"),
    [("LMM", 0.25, True, False), ("MAC", 0.05, False, True), ("MAG", 0.05, False, True), ("MAL", 0.05, False, True)],
)
def test_null_resolves_to_the_variants_defaults_in_the_built_memory(variant, theta, exact, momentum) -> None:
    cfg = ModelConfig(variant=variant, d_model=16, n_heads=2, vocab_size=8)
    assert (cfg.memory.theta_init, cfg.memory.exact_last_layer, cfg.memory.momentum) == (None, None, None)
    assert memory_defaults(variant, cfg.memory) == (theta, exact, momentum)
    memory = NeuralMemory.from_config(cfg)
    assert (memory.theta_init, memory.exact_last_layer, memory.momentum) == (theta, exact, momentum)
    assert (memory.to_eta is not None) == momentum  # no eta gate to train where there is no momentum


def test_explicit_values_win_and_the_defaults_respect_max_lr_and_the_layernorm_memory() -> None:
    explicit = MemoryConfig(theta_init=0.1, exact_last_layer=False, momentum=True)
    assert memory_defaults("LMM", explicit) == (0.1, False, True)
    explicit = MemoryConfig(theta_init=0.3, exact_last_layer=True, momentum=False)
    assert memory_defaults("MAC", explicit) == (0.3, True, False)
    assert memory_defaults("LMM", MemoryConfig(max_lr=0.2)) == (0.1, True, False)  # min(0.25, max_lr / 2)
    # a residual + LayerNorm memory has no chunk-parallel exact form: its null stays anchored
    assert memory_defaults("LMM", MemoryConfig(residual_norm=True)) == (0.25, False, False)
    resolved = resolved_memory(ModelConfig(variant="LMM", memory=MemoryConfig(chunk_size=8)))
    assert (resolved.theta_init, resolved.exact_last_layer, resolved.momentum, resolved.chunk_size) == (
        0.25,
        True,
        False,
        8,
    )


@pytest.mark.parametrize(
    ("variant", "theta", "exact", "momentum"), [("LMM", 0.25, True, False), ("MAC", 0.05, False, True)]
)
def test_a_run_saves_the_resolved_values(tmp_path, variant, theta, exact, momentum) -> None:
    overrides = [
        f"model.variant={variant}", "model.d_model=16", "model.n_heads=2", "model.segment_len=8",
        "data.dataset=copy_task", "data.seq_len=24", "data.copy_length=4", "data.num_samples=32",
        "training.batch_size=4", "training.max_steps=1", "training.eval_every=0", "training.warmup_steps=1",
        "training.progress=false", f"training.out_dir={tmp_path}", "training.run_name=run",
    ]  # fmt: skip
    train(load_config(None, overrides))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["memory"]
    assert (saved["theta_init"], saved["exact_last_layer"], saved["momentum"]) == (theta, exact, momentum)


def test_a_checkpoint_from_before_the_options_keeps_eq_16_and_momentum() -> None:
    """Checkpoints written before `exact_last_layer` existed computed every gradient at the chunk start, and before
    momentum's null existed an LMM had momentum; loading one must not turn its missing keys into the new defaults."""
    stored = {"model": {"variant": "LMM", "memory": {"chunk_size": 16}}}
    cfg = config_from_checkpoint({"config": stored}, [])
    assert (cfg.model.memory.exact_last_layer, cfg.model.memory.momentum) == (False, True)
    assert memory_defaults("LMM", cfg.model.memory)[1:] == (False, True)


def test_a_mac_checkpoint_from_before_the_option_keeps_writing_the_attention_output() -> None:
    """MAC's memory wrote the attention output alone before `model.mac_memory_input` existed (now residual by
    default); a checkpoint without the key must load as it trained, and an explicit override still wins."""
    stored = {"model": {"variant": "MAC"}}
    assert config_from_checkpoint({"config": stored}, []).model.mac_memory_input == "attention"
    override = ["model.mac_memory_input=residual"]
    assert config_from_checkpoint({"config": stored}, override).model.mac_memory_input == "residual"
    assert ModelConfig().mac_memory_input == "residual"
