"""Robustness (issue 7): bad input fails early and clearly, divergence is caught, interruption loses nothing,
nothing leaks, and long streams run in bounded memory.

Covered elsewhere and not repeated here:
    tests/test_config.py      every config key's type/range error, and the hypothesis properties (random YAML text,
                              random YAML documents, random overrides: a RunConfig or a ConfigError, nothing else);
                              extended below: file and overrides agree, and loaded configs round-trip
    tests/test_checkpoint.py  SIGKILL in the middle of a save leaves every checkpoint loadable; corrupt files skipped
    tests/test_train.py       NaN loss stops with the knobs and keeps the last good checkpoint, or skips the step;
                              SIGINT/SIGTERM (raised in-process) checkpoint and resume exactly; crash-resume exactness
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from titans.checkpoint import checkpoint_path, find_latest_checkpoint, list_checkpoints, load_checkpoint
from titans.config import ConfigError, MemoryConfig, ModelConfig, _all_keys, load_config, save_config
from titans.memory import NeuralMemory
from titans.models import TitansLM, build_model
from titans.tasks.base import IGNORE_INDEX
from titans.train import TrainingDivergedError, read_metrics, train

REPO = Path(__file__).resolve().parent.parent
V = 12
VARIANTS = ["baseline", "LMM", "MAC", "MAG", "MAL"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and train(training.threads=1) sets the global count: restore
    it, so the tests that run after these see torch's setting unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_impossible_configs_name_the_key_and_the_fix():
    # heads not dividing d_model, odd head widths, memory heads, window < 1 ...: tests/test_config.py
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.memory.forgetting=false", "model.memory.channelwise_forget=true"])
    assert "model.memory.channelwise_forget = true needs model.memory.forgetting = true" in str(error.value)
    assert "set model.memory.forgetting=true or model.memory.channelwise_forget=false" in str(error.value)
    with pytest.raises(ConfigError, match="model.d_model = 30 is not divisible by model.n_heads = 4"):
        load_config(None, ["model.d_model=30"])
    # A vocabulary of billions is refused by the config, not by an out-of-memory kill in the task or the embedding.
    with pytest.raises(ConfigError, match="data.vocab_size = 4617739213 exceeds the 1,048,576 ids"):
        load_config(None, ["data.vocab_size=4617739213.0"])
    with pytest.raises(ConfigError, match="model.vocab_size = 2000000 exceeds the 1,048,576 ids"):
        load_config(None, ["model.vocab_size=2000000"])
    # bfloat16 autocast is no longer refused on the CPU (it is tested below).
    assert load_config(None, ["training.dtype=bfloat16", "training.device=cpu"]).training.dtype == "bfloat16"


# Extends tests/test_config.py's properties (each path alone: a RunConfig or a ConfigError) with agreement: the same
# values given as a YAML file or as key=value overrides load to the same config or fail with the same message, and a
# config that loads survives save_config/load_config unchanged.

_SECTIONS = {"model", "data", "training", "model.memory"}
_LEAVES = [key for key in _all_keys() if key not in _SECTIONS]
_PLAUSIBLE = st.one_of(
    st.integers(min_value=-2, max_value=130),
    st.floats(min_value=-1, max_value=2, allow_nan=False),
    st.booleans(),
    st.none(),
    st.sampled_from(["MAC", "mag", "LMM", "copy_task", "needle_haystack", "bfloat16", "cpu", "gelu", "3e-4", "x"]),
    st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=2),
)


def _load_or_error(path, overrides):
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        return f"ConfigError: {error}"


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(st.sampled_from(_LEAVES), _PLAUSIBLE, max_size=4))
def test_yaml_file_and_overrides_agree_and_loaded_configs_round_trip(tmp_path_factory, values):
    folder = tmp_path_factory.mktemp("agree")
    tree: dict = {}
    for dotted, value in values.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    # In the overrides' order, so that both paths meet the same first bad value.
    (folder / "c.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    from_file = _load_or_error(folder / "c.yaml", [])
    from_overrides = _load_or_error(None, [f"{key}={yaml.safe_dump(value)}" for key, value in values.items()])
    assert from_file == from_overrides
    if not isinstance(from_file, str):
        save_config(from_file, folder / "saved.yaml")
        assert load_config(folder / "saved.yaml") == from_file


# ---------------------------------------------------------------------------------------------------------------------
# Numerical safety: bf16 autocast, bounded inner step size, NaN/Inf in the loss or the gradient.


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


TINY_RUN = [
    "model.variant=LMM",
    "model.d_model=16",
    "model.n_heads=2",
    "model.n_layers=1",
    "model.memory.chunk_size=4",
    "data.dataset=copy_task",
    "data.seq_len=16",
    "data.copy_length=3",
    "data.num_samples=60",
    "training.batch_size=8",
    "training.learning_rate=3e-3",
    "training.warmup_steps=2",
    "training.device=cpu",
    "training.progress=false",
    "training.threads=1",
]


def test_read_metrics_skips_a_line_cut_short_and_can_drop_wall_clock_fields(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "step": 1, "loss": 2.5, "step_s": 0.01}, {"kind": "eval", "step": 1, "loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "st')
    assert read_metrics(path) == records
    assert read_metrics(path, wall_clock=False) == [{"kind": "train", "step": 1, "loss": 2.5}, records[1]]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def deterministic_metrics(path: Path) -> list[dict]:
    """metrics.jsonl without wall-clock fields: what a resumed run must reproduce bit for bit."""
    return read_metrics(path, wall_clock=False)


def tiny_run(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY_RUN, f"training.out_dir={tmp_path}", *overrides])


class Probe(torch.nn.Module):
    """Wraps the model train() builds. At training forward call `nan_grad_call` (1-based) the loss stays finite but
    its gradient becomes NaN; every call records what state it was given ("fresh", "detached" or "attached": the
    probe must not keep the state itself) and, at the calls in `count_at`, the number of live tensors (a leak shows
    up as a count that grows with the step)."""

    def __init__(self, model: torch.nn.Module, nan_grad_call: int = 0, count_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model, self.nan_grad_call, self.count_at = model, nan_grad_call, count_at
        self.calls, self.states, self.live_tensors = 0, [], {}
        # Tensors that already existed (earlier tests' objects, some freed lazily, e.g. by torch.compile's caches)
        # are left out of the counts, so that only what this run creates and keeps is compared.
        gc.collect()
        self.preexisting = {id(o): weakref.ref(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    def _preexisting(self, tensor: torch.Tensor) -> bool:
        ref = self.preexisting.get(id(tensor))
        return ref is not None and ref() is tensor

    def forward(self, idx, targets=None, state=None):
        if self.model.training:
            self.calls += 1
            if state is None:
                self.states.append("fresh")
            else:
                graph = any(t.requires_grad or t.grad_fn is not None for t in _tensors(state))
                self.states.append("attached" if graph else "detached")
            if self.calls in self.count_at:
                gc.collect()
                self.live_tensors[self.calls] = sum(
                    isinstance(o, torch.Tensor) and not self._preexisting(o) for o in gc.get_objects()
                )
        logits, loss, state = self.model(idx, targets, state)
        if self.model.training and self.calls == self.nan_grad_call:
            loss.register_hook(lambda grad: grad * float("nan"))
        return logits, loss, state


def test_nan_gradient_stops_with_the_knobs_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("titans.train.build_model", lambda cfg: Probe(build_model(cfg), nan_grad_call=4))
    cfg = tiny_run(tmp_path, "training.max_steps=8", "training.checkpoint_every=3", "training.run_name=nan")
    with pytest.raises(TrainingDivergedError) as error:
        train(cfg)
    message = str(error.value)
    assert "the gradient norm is NaN/Inf at step 4; the update was not applied" in message
    knobs = ("training.learning_rate", "training.gradient_clip", "model.memory.max_lr", "model.memory.inner_grad_clip")
    for knob in (*knobs, "training.nan_policy"):
        assert knob in message
    good = checkpoint_path(tmp_path / "nan", 3)
    assert f"last good checkpoint: {good} (continue with --resume)" in message
    assert find_latest_checkpoint(tmp_path / "nan") == good
    assert all(torch.isfinite(t).all() for t in load_checkpoint(good)["model"].values())
    # the step that diverged left no record behind
    assert [r["step"] for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


def test_nan_gradient_skip_says_so_and_the_run_finishes_finite(tmp_path, monkeypatch, capsys):
    probe = {}

    def build(cfg):
        probe["model"] = Probe(build_model(cfg), nan_grad_call=2)
        return probe["model"]

    monkeypatch.setattr("titans.train.build_model", build)
    result = train(tiny_run(tmp_path, "training.max_steps=4", "training.nan_policy=skip", "training.run_name=skip"))
    assert (result["steps"], result["skipped_steps"]) == (4, 1)
    assert "step 2: gradient norm is NaN/Inf, update skipped (training.nan_policy=skip" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in probe["model"].parameters())


def test_bf16_training_on_cpu_runs_and_learns(tmp_path):
    result = train(tiny_run(tmp_path, "training.max_steps=12", "training.dtype=bfloat16", "training.run_name=bf16"))
    losses = [r["loss"] for r in read_metrics(Path(result["run_dir"]) / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert math.isfinite(result["test_loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Interruption: a real SIGTERM to `python main.py`, then --resume, equals an uninterrupted run; a corrupt newest
# checkpoint falls back to the previous one.

# MAC: the checkpoint must carry the memory's parameters; one thread so both processes compute bit-identically.
SUBPROCESS_RUN = {
    "model": {"variant": "MAC", "d_model": 16, "n_heads": 2, "n_layers": 1, "segment_len": 8, "window": 8},
    "data": {"dataset": "copy_task", "seq_len": 24, "copy_length": 5, "num_samples": 100},
    "training": {
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_steps": 3,
        "max_steps": 30,
        "eval_every": 10,
        "checkpoint_every": 12,
        "device": "cpu",
        "progress": False,
        "threads": 1,
    },
}


def start_main(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "--config", str(config), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_sigterm_to_main_py_then_resume_equals_an_uninterrupted_run(tmp_path):
    configs = {}
    for name in ("whole", "cut"):
        raw = json.loads(json.dumps(SUBPROCESS_RUN))
        raw["training"].update(out_dir=str(tmp_path), run_name=name)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    whole = start_main(configs["whole"])  # the reference runs alongside the interrupted one
    cut = start_main(configs["cut"])
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert cut.poll() is None and time.time() < deadline, "the run ended or stalled before 3 steps"
        time.sleep(0.005)
    cut.send_signal(signal.SIGTERM)
    stopped = finish(cut)

    assert stopped["interrupted"] and 3 <= stopped["steps"] < 30
    assert load_checkpoint(stopped["checkpoint"])["step"] == stopped["steps"]
    resumed = finish(start_main(configs["cut"], "--resume"))
    reference = finish(whole)

    assert not resumed["interrupted"] and resumed["steps"] == reference["steps"] == 30
    # Every step's loss, learning rate and gradient norm and every evaluation, bit for bit.
    assert deterministic_metrics(metrics) == deterministic_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert resumed["copy_accuracy"] == reference["copy_accuracy"]


def test_resume_skips_a_corrupt_newest_checkpoint_and_a_partial_save(tmp_path):
    cfg = tiny_run(tmp_path, "training.max_steps=6", "training.checkpoint_every=2", "training.run_name=ref")
    reference = train(cfg)
    run = tmp_path / "crashed"
    shutil.copytree(reference["run_dir"], run)
    newest = checkpoint_path(run, 6)
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as by a full disk
    (run / "ckpt_00000008.pt.tmp-4242").write_bytes(b"half a save")  # what a kill -9 mid-save leaves

    resumed = train(cfg, resume=run)

    assert [step for step, _ in list_checkpoints(run)] == [6, 4, 2]
    assert not any(".tmp-" in p.name for p in run.iterdir())
    # It resumed from step 4 and rewrote steps 5 and 6 exactly as the reference did.
    reference_metrics = deterministic_metrics(Path(reference["run_dir"]) / "metrics.jsonl")
    assert deterministic_metrics(run / "metrics.jsonl") == reference_metrics
    assert resumed["steps"] == 6 and load_checkpoint(newest)["step"] == 6


# ---------------------------------------------------------------------------------------------------------------------
# No leaks, bounded streams.


@pytest.mark.parametrize("mode", ["fresh-batches", "text-tbptt"])
def test_training_carries_no_graph_between_batches_and_leaks_no_tensors(tmp_path, monkeypatch, mode):
    probe = {}

    def build(cfg):
        probe["model"] = Probe(build_model(cfg), count_at=(6, 24))
        return probe["model"]

    monkeypatch.setattr("titans.train.build_model", build)
    if mode == "text-tbptt":
        # Byte-level text with data.text_carry_state: each step continues the previous step's streams.
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
        extra = ["data.dataset=text", f"data.path={corpus}", "data.vocab_size=256", "data.num_samples=40"]
    else:
        extra = ["data.fresh_samples=true"]
    train(tiny_run(tmp_path, "training.max_steps=24", "training.batch_size=4", "training.run_name=leak", *extra))

    states = probe["model"].states
    if mode == "text-tbptt":
        # Step 1 starts the streams; every later step continues them with a state cut from the autograd graph.
        assert states == ["fresh"] + ["detached"] * 23
    else:
        assert states == ["fresh"] * 24  # every batch starts a fresh memory
    # Nothing accumulates: as many live tensors after 6 steps (optimizer state made) as after 24.
    assert probe["model"].live_tensors[24] == probe["model"].live_tensors[6]


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
