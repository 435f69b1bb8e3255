"""training.cuda_graph: the whole training step replayed per batch shape (titans/train_graph.py).

Without a GPU nothing can be recorded; `eager_capture` keeps everything else (the warm-up steps per shape, the
static inputs, the gradients zeroed in place and kept as the same tensors, the clip and AdamW's update with the rate
and the skip flag in device tensors, the loss and norm copied out, the trainer skipping its zero_grad and update) and
runs the recorded function eagerly at each replay. These tests hold such a run to the eager
trainer bit for bit; tests/test_cuda.py holds the recorded graphs to eager training on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from host_sync import HostSyncs
from model_configs import tiny_model_config
from test_decode import variant_config
from test_train import tiny_config, train_records

from titans import train as train_module
from titans import train_graph
from titans.checkpoint import find_latest_checkpoint
from titans.config import ConfigError
from titans.models import build_model
from titans.train import TrainingDivergedError, train

# 80 train rows in batches of 12: 7 steps per epoch, the last of 8 rows, so a second batch shape recurs every epoch
GRAPHED = ["training.batch_size=12", "training.device=auto", "training.max_steps=23", "training.eval_every=10"]


@pytest.fixture
def recordings(monkeypatch) -> list[tuple[int, ...]]:
    """Record with `eager_capture`; returns the shapes recorded, in order."""
    shapes: list[tuple[int, ...]] = []
    original = train_graph.GraphedStep._record

    def counted(self, inputs, targets):
        shapes.append(tuple(inputs.shape))
        return original(self, inputs, targets)

    monkeypatch.setattr(train_graph.GraphedStep, "_record", counted)
    monkeypatch.setattr(train_module, "capture_for", lambda device: train_graph.eager_capture)
    return shapes


@pytest.mark.parametrize("variant", ["baseline", "MAC"])
def test_replayed_steps_equal_eager_training_bit_for_bit(tmp_path, recordings, variant):
    """Losses, gradient norms, evaluations and final weights of a graphed run equal the eager run's: across the
    warm-up steps, the recording of each shape (the full batch at step 3, the short last batch of an epoch at its
    third occurrence, step 21) and the replays between evaluations."""
    runs = {}
    for graphed in (False, True):
        cfg = tiny_config(
            tmp_path, *GRAPHED, f"model.variant={variant}", f"training.cuda_graph={graphed}",
            f"training.run_name={variant}-{graphed}",
        )  # fmt: skip
        runs[graphed] = train(cfg)
    assert recordings == [(12, 24), (8, 24)]
    eager, replayed = (train_records(runs[g]["run_dir"]) for g in (False, True))
    assert [r["step"] for r in replayed] == list(range(1, 24))
    assert replayed == eager
    assert train_records(runs[True]["run_dir"], "eval") == train_records(runs[False]["run_dir"], "eval")
    weights = [torch.load(runs[g]["checkpoint"], weights_only=True)["model"] for g in (False, True)]
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name


def _lm_and_adamw(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model(variant_config("LMM")).double()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)


def test_a_graphed_step_equals_the_eager_step_and_keeps_its_tensors():
    """Each step (zero, forward, backward, clip, AdamW at the schedule's current rate) equals the eager step bit for
    bit: loss, pre-clip norm, gradients and weights; after the warm-up the gradients and AdamW's moments are the same
    tensors every step (recorded by address), holding new values."""
    (model, optimizer), (reference, reference_optimizer) = _lm_and_adamw(0), _lm_and_adamw(0)
    step = train_graph.GraphedStep(model, None, train_graph.eager_capture, optimizer, max_norm=0.5)
    batches = [torch.randint(0, 11, (2, 2, 9), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    held = None
    for index, (inputs, targets) in enumerate(batches):
        for opt in (optimizer, reference_optimizer):
            opt.param_groups[0]["lr"] = 2.0**-8 * (index + 1)  # a changing schedule, read afresh by each replay
        loss, norm = step(inputs, targets)
        reference_optimizer.zero_grad()
        _, expected_loss, _ = reference(inputs, targets)
        expected_loss.backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        reference_optimizer.step()
        assert (loss, norm) == (expected_loss, expected_norm)
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(got, want) and torch.equal(got.grad, want.grad)
        tensors = [p.grad for p in model.parameters()] + [optimizer.state[p]["exp_avg"] for p in model.parameters()]
        if index >= train_graph.WARM_UP_STEPS:
            held = held or tensors
            assert all(a is b for a, b in zip(tensors, held, strict=True))
    assert list(step.graphs) == [((2, 9), (2, 9), torch.device("cpu"))]
    assert optimizer.param_groups[0]["lr"] == 2.0**-8 * 6  # the group holds the schedule's float between steps


def test_replacing_the_optimizer_state_after_recording_is_refused():
    """A checkpoint loaded into the optimizer after recording would leave the graph updating stale moments."""
    model, optimizer = _lm_and_adamw(0)
    step = train_graph.GraphedStep(model, None, train_graph.eager_capture, optimizer, max_norm=float("inf"))
    inputs = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    for _ in range(train_graph.WARM_UP_STEPS + 1):
        step(inputs, inputs)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: new tensors
    with pytest.raises(RuntimeError, match="optimizer's state was replaced"):
        step(inputs, inputs)


def test_an_optimizer_that_cannot_hold_back_a_step_on_the_device_is_refused():
    model = build_model(variant_config("LMM"))
    with pytest.raises(ValueError, match="needs torch's fused AdamW"):
        train_graph.GraphedStep(model, None, train_graph.eager_capture, torch.optim.AdamW(model.parameters()), 1.0)


class PoisonedLoss(torch.nn.Module):
    """Wraps a model; its loss is Inf (and so its gradients NaN/Inf) while the buffer `poison` is 1. A buffer, not a
    Python counter: a recorded graph reads it at every replay."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("poison", torch.zeros(()), persistent=False)

    def forward(self, idx, targets=None, state=None):
        logits, loss, state = self.model(idx, targets, state)
        if targets is not None:
            loss = loss / (1 - self.poison)  # exact when 0
        return logits, loss, state


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_non_finite_step_is_held_back_inside_the_graph(tmp_path, monkeypatch, recordings, policy):
    """nan_policy with the update recorded: a poisoned step in the warm-up (step 2) and one replayed (step 5) are
    held back on the device, so `skip` gives the eager run's records and weights bit for bit, and `stop` stops at
    the same step with the same last good checkpoint."""
    poisoned = {2, 5}
    models = []

    def build(model_cfg):
        models.append(PoisonedLoss(build_model(model_cfg)))
        return models[-1]

    def poisoned_step(model, data, step, *args, **kwargs):
        models[-1].poison.fill_(float(step + 1 in poisoned))
        try:
            return original_step(model, data, step, *args, **kwargs)
        finally:
            models[-1].poison.fill_(0.0)

    original_step = train_module.train_step
    monkeypatch.setattr(train_module, "build_model", build)
    monkeypatch.setattr(train_module, "train_step", poisoned_step)
    if policy == "stop":
        poisoned.discard(2)
    runs = {}
    for graphed in (False, True):
        cfg = tiny_config(
            tmp_path, *GRAPHED, "training.max_steps=8", "training.checkpoint_every=4", f"training.nan_policy={policy}",
            f"training.cuda_graph={graphed}", f"training.run_name={policy}-{graphed}",
        )  # fmt: skip
        if policy == "stop":
            with pytest.raises(TrainingDivergedError, match="at step 5"):
                train(cfg)
            runs[graphed] = {"run_dir": tmp_path / f"{policy}-{graphed}"}
        else:
            runs[graphed] = train(cfg)
            assert runs[graphed]["skipped_steps"] == 2
    eager, replayed = (train_records(runs[g]["run_dir"]) for g in (False, True))
    assert replayed == eager and len(replayed) == (8 if policy == "skip" else 4)
    assert recordings == [(12, 24)]
    last = {g: find_latest_checkpoint(runs[g]["run_dir"]) for g in (False, True)}
    weights = [torch.load(last[g], weights_only=True)["model"] for g in (False, True)]
    for name, value in weights[0].items():
        assert torch.isfinite(value).all() and torch.equal(weights[1][name], value), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.device=cpu"], "training.device is cpu"),
        (["training.grad_accum_steps=2"], "grad_accum_steps is 2"),
        (["training.compile=true"], "use one of them"),
        (["data.dataset=text", "data.text_source=sample", "model.variant=LMM"], "data.text_carry_state=true"),
    ],
)
def test_settings_a_graphed_step_cannot_run_are_refused_up_front(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, "training.cuda_graph=true", "training.device=auto", *overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")
def test_a_cuda_graph_run_without_a_gpu_stops_before_training(tmp_path):
    cfg = tiny_config(tmp_path, "training.cuda_graph=true", "training.device=auto", "training.max_steps=2")
    with pytest.raises(ConfigError, match="records CUDA graphs, but the model is on cpu; train on a GPU"):
        train(cfg)


def _checked_capture(record, pool):
    """A capture that runs the recorded work once under `HostSyncs` and fails on anything a CUDA graph cannot hold."""
    with HostSyncs() as found:
        record()
    assert not found.hits, f"the recorded step reads values on the host: {dict(found.hits)}"
    return record, pool


# Every variant with the fused CPU op (the model code around the scan), the Triton scan (interpreted, ~10 s a case)
# once per kind of memory in the default run and for every variant in `make test-slow`, bf16 through both
MEMORY_VARIANTS = ["LMM", "MAC", "MAG", "MAL"]
RECORDED = [
    ("baseline", None, None),
    *[(variant, "fused", None) for variant in MEMORY_VARIANTS],
    ("MAC", "triton", None),
    ("LMM", "fused", torch.bfloat16),
    ("MAC", "fused", torch.bfloat16),
    *[pytest.param(v, "triton", None, marks=pytest.mark.slow) for v in ("LMM", "MAG", "MAL")],
    pytest.param("MAC", "triton", torch.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("variant", "impl", "dtype"), RECORDED)
def test_the_recorded_step_could_be_a_cuda_graph(variant, impl, dtype, monkeypatch):
    """What GraphedStep records (gradients zeroed, forward under autocast, backward, clip, AdamW) reads no value on
    the host and builds no tensor from host data: the memory scan's Triton kernels (the CUDA default, interpreted
    here) and the fused CPU op, every variant; the input checks run outside the recording."""
    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    memory = {} if impl is None else {"impl": impl}
    model = build_model(tiny_model_config(variant, **memory))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = train_graph.GraphedStep(model, dtype, _checked_capture, optimizer, max_norm=1.0)
    inputs = torch.randint(0, 11, (2, 14), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(train_graph, "WARM_UP_STEPS", 1)  # one warm-up builds every cached table (interpreted: slow)
    for _ in range(2):  # the second records and replays
        step(inputs, inputs)
    assert len(step.graphs) == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):  # checked before each replay
        step(torch.full_like(inputs, 11), inputs)
