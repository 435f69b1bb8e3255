"""The training loop: loss falls, resume is exact (after a crash or a signal), NaN policies, schedule, evaluation."""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titans.checkpoint import list_checkpoints, load_checkpoint
from titans.config import ConfigError, load_config
from titans.evaluate import evaluate
from titans.models import build_model
from titans.run import read_metrics
from titans.tasks import make_task
from titans.train import TrainingDivergedError, lr_multiplier, optimizer_groups, train

# 100 samples: 80 train / 20 test examples, 10 optimizer steps per epoch of 8.
TINY = [
    "model.variant=baseline",
    "model.d_model=16",
    "model.n_heads=2",
    "model.n_layers=1",
    "data.dataset=copy_task",
    "data.seq_len=24",
    "data.copy_length=5",
    "data.num_samples=100",
    "training.batch_size=8",
    "training.learning_rate=3e-3",
    "training.warmup_steps=3",
    "training.device=cpu",
    "training.progress=false",
]


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"training.out_dir={tmp_path}", *overrides])


def train_records(run_dir: str | Path, kind: str = "train") -> list[dict]:
    """The run's records of one kind, without wall-clock fields (the rest is deterministic)."""
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl", wall_clock=False) if r["kind"] == kind]


def test_smoke_run_learns_and_writes_its_outputs(tmp_path):
    cfg = tiny_config(tmp_path, "training.max_steps=40", "training.eval_every=20", "training.run_name=smoke")
    result = train(cfg)

    losses = [r["loss"] for r in train_records(result["run_dir"])]
    assert [r["step"] for r in train_records(result["run_dir"])] == list(range(1, 41))
    # Chance-level cross-entropy over 14 ids is ln 14 = 2.64; the model must get clearly below where it started.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    evals = train_records(result["run_dir"], "eval")
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["test_loss"] < evals[0]["test_loss"]
    # The result reports the last evaluation and the window of train losses since the one before.
    assert result["test_loss"] == evals[-1]["test_loss"]
    assert result["copy_accuracy"] == evals[-1]["copy_accuracy"]
    assert result["train_loss"] == pytest.approx(sum(losses[20:]) / 20)
    assert (result["steps"], result["skipped_steps"], result["interrupted"]) == (40, 0, False)
    assert result["gradient_spikes"] == 0

    run_dir = Path(result["run_dir"])
    assert run_dir == tmp_path / "smoke"
    saved_cfg = load_config(run_dir / "config.yaml")
    assert saved_cfg.model.vocab_size == make_task(cfg.data).vocab_size  # resolved from the task
    assert saved_cfg.training == cfg.training
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "copy_accuracy.png").stat().st_size > 0
    state = load_checkpoint(result["checkpoint"])
    assert state["step"] == 40


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted 8-step runs to compare resumes against: fixed data; fresh samples with gradient accumulation;
    MAC, whose neural memory adds its own parameters and inner-loop state to what must be restored.

    40 train examples in batches of 8 make 5 steps per epoch, so a resume from step 3 crosses an epoch boundary
    (a reshuffle drawn from the restored generator); checkpoints at 3, 6, 8; evaluations at 4 and 8."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for name, extra in {
        "fixed": [],
        "fresh": ["data.fresh_samples=true", "training.grad_accum_steps=2", "training.batch_size=4"],
        "MAC": ["model.variant=MAC", "model.segment_len=8", "model.window=8"],
        # fresh rows at 12, then 18 tokens for 3 steps each, then seq_len: the resume from step 3 starts a new stage
        "curriculum": ["data.fresh_samples=true", "data.curriculum_lengths=[12,18]", "data.curriculum_steps=3"],
    }.items():
        schedule = ["training.max_steps=8", "training.eval_every=4", "training.checkpoint_every=3"]
        cfg = tiny_config(root, "data.num_samples=50", *schedule, *extra)
        cfg.training.run_name = name
        runs[name] = (cfg, train(cfg))
    return runs


@pytest.mark.parametrize("mode", ["fixed", "fresh", "MAC", "curriculum"])
def test_resume_after_crash_repeats_the_uninterrupted_losses(reference_runs, tmp_path, mode):
    cfg, reference = reference_runs[mode]
    # A crash after step 5: the newest checkpoint is step 3, and metrics.jsonl already holds steps 4 and 5 and the
    # evaluation at 4; the resumed run must drop those records and write them again, identically.
    crashed = tmp_path / "crashed"
    shutil.copytree(reference["run_dir"], crashed)
    for step, path in list_checkpoints(crashed):
        if step > 3:
            path.unlink()
    kept = [r for r in read_metrics(crashed / "metrics.jsonl") if r["step"] <= 5]
    (crashed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    resumed = train(cfg, resume=crashed)

    assert resumed["run_dir"] == str(crashed)
    # Bit-for-bit: every step's loss, learning rate and gradient norm, and every evaluation.
    assert train_records(crashed) == train_records(reference["run_dir"])
    assert train_records(crashed, "eval") == train_records(reference["run_dir"], "eval")
    final, expected = load_checkpoint(resumed["checkpoint"]), load_checkpoint(reference["checkpoint"])
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(reference_runs, tmp_path, sig):
    reference_cfg, reference = reference_runs["fixed"]
    cfg = copy.deepcopy(reference_cfg)
    cfg.training.out_dir, cfg.training.run_name = str(tmp_path), "sig"
    metrics = tmp_path / "sig" / "metrics.jsonl"

    def send_signal_after_two_steps():
        deadline = time.time() + 30
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2:
                break
            time.sleep(0.001)
        signal.raise_signal(sig)

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background (nohup, CI)
    sender = threading.Thread(target=send_signal_after_two_steps)
    sender.start()
    stopped = train(cfg)
    sender.join()

    assert stopped["interrupted"] and 2 <= stopped["steps"] < 8
    assert load_checkpoint(stopped["checkpoint"])["step"] == stopped["steps"]
    # The handler is removed again: whatever handled SIGINT before the run handles it after.
    assert signal.getsignal(signal.SIGINT) is handler_before

    resumed = train(cfg, resume=True)
    assert not resumed["interrupted"] and resumed["steps"] == 8
    assert train_records(resumed["run_dir"]) == train_records(reference["run_dir"])


class NaNAtCall(torch.nn.Module):
    """Wraps a model; the loss of forward call number `bad_call` (1-based) is NaN."""

    def __init__(self, model: torch.nn.Module, bad_call: int) -> None:
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, idx, targets=None, state=None):
        logits, loss, state = self.model(idx, targets, state)
        if targets is not None:
            self.calls += 1
            if self.calls == self.bad_call:
                loss = loss * float("nan")
        return logits, loss, state


def test_nan_stop_raises_with_the_knobs_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("titans.train.build_model", lambda model_cfg: NaNAtCall(build_model(model_cfg), bad_call=5))
    cfg = tiny_config(tmp_path, "training.max_steps=10", "training.checkpoint_every=2", "training.run_name=nan")
    with pytest.raises(TrainingDivergedError, match="step 5") as error:
        train(cfg)
    for knob in ("training.learning_rate", "training.gradient_clip", "training.warmup_steps", "training.nan_policy"):
        assert knob in str(error.value)
    assert str(tmp_path / "nan" / "ckpt_00000004.pt") in str(error.value)
    assert [step for step, _ in list_checkpoints(tmp_path / "nan")] == [4, 2]
    assert all(
        torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "nan" / "ckpt_00000004.pt")["model"].values()
    )


def test_nan_skip_skips_only_that_update(tmp_path, monkeypatch):
    wrapped = {}

    def build(model_cfg):
        wrapped["model"] = NaNAtCall(build_model(model_cfg), bad_call=3)
        return wrapped["model"]

    monkeypatch.setattr("titans.train.build_model", build)
    cfg = tiny_config(tmp_path, "training.max_steps=6", "training.nan_policy=skip", "training.run_name=skip")
    result = train(cfg)

    assert result["skipped_steps"] == 1 and result["steps"] == 6
    records = train_records(result["run_dir"])
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False, False]
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    assert all(torch.isfinite(p).all() for p in wrapped["model"].parameters())


class LossScaledFrom(torch.nn.Module):
    """Wraps a model; from training call number `first_call` (1-based, counting on from `calls_before`) the loss and
    so every gradient is 1e5 times larger: a gradient explosion whose update the clip bounds."""

    def __init__(self, model: torch.nn.Module, first_call: int, calls_before: int = 0) -> None:
        super().__init__()
        self.model, self.first_call, self.calls = model, first_call, calls_before

    def forward(self, idx, targets=None, state=None):
        logits, loss, state = self.model(idx, targets, state)
        if targets is not None and self.training:
            self.calls += 1
            if self.calls >= self.first_call:
                loss = loss * 1e5
        return logits, loss, state


def test_gradient_spikes_are_said_counted_and_recounted_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("titans.train.build_model", lambda model_cfg: LossScaledFrom(build_model(model_cfg), 26))
    cfg = tiny_config(tmp_path, "training.max_steps=30", "training.checkpoint_every=28", "training.run_name=spiky")
    result = train(cfg)
    said = capsys.readouterr()
    assert result["gradient_spikes"] == 5 and result["skipped_steps"] == 0
    assert "step 26: gradient norm" in said.out + said.err and "1 such step so far" in said.out + said.err

    # A crash after step 29: the resumed run replays the log's norms up to its checkpoint (28), so it counts the
    # spikes at 26-28 again without having seen them, and the new one at 29-30.
    for step, path in list_checkpoints(tmp_path / "spiky"):
        if step > 28:
            path.unlink()
    monkeypatch.setattr("titans.train.build_model", lambda model_cfg: LossScaledFrom(build_model(model_cfg), 26, 28))
    resumed = train(cfg, resume=tmp_path / "spiky")
    assert resumed["gradient_spikes"] == 5 and resumed["steps"] == 30


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    values = [lr_multiplier(step, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for step in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert values[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:-1], values[5:], strict=True))


def test_weight_decay_applies_to_linear_weights_only(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model.vocab_size = 14
    model = build_model(cfg.model)
    decayed, plain = optimizer_groups(model, 0.1)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == linear_weights
    assert id(model.embed.weight) in {id(p) for p in plain["params"]}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("variant", ["baseline", "LMM"])
def test_evaluate_is_exact_and_independent_of_batch_size(tmp_path, variant):
    # LMM's memory learns inside each forward pass; every sequence must still start from the same M_0.
    cfg = tiny_config(tmp_path, f"model.variant={variant}")
    task = make_task(cfg.data)
    cfg.model.vocab_size = task.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    batch = task.sample(10, torch.Generator().manual_seed(1))
    model.train()

    small, whole = evaluate(model, task, batch, batch_size=3), evaluate(model, task, batch, batch_size=10)

    assert model.training  # mode restored
    with torch.no_grad():
        logits, _, _ = model.eval()(batch.inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100).item()
    assert small["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert small["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert small["copy_accuracy"] == whole["copy_accuracy"] == task.score(logits, batch)["copy_accuracy"]


def test_missing_tensorboard_is_a_config_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = tiny_config(tmp_path, "training.tensorboard=true", "training.run_name=tb")
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(cfg)
    assert not (tmp_path / "tb").exists()
