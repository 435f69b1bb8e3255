"""Robustness of training: divergence is caught, interruption loses nothing, and nothing leaks between steps.

The model-level checks (bad input, numerical safety, bounded streams) are in tests/test_robustness.py, which also lists
what other test files cover.
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

from titans.checkpoint import checkpoint_path, find_latest_checkpoint, list_checkpoints, load_checkpoint
from titans.config import load_config
from titans.models import build_model
from titans.run import read_metrics
from titans.train import TrainingDivergedError, train

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------------------------------------------------
# Divergence: NaN/Inf in the gradient, bf16 training.


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
# No leaks.


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


def _tensors(state: object) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, list | tuple):
        return [t for s in state for t in _tensors(s)]
    if hasattr(state, "__dict__"):
        return [t for v in vars(state).values() for t in _tensors(v)]
    return []
