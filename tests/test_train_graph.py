"""training.cuda_graph: the training step's forward and backward replayed per batch shape (titans/train_graph.py).

Without a GPU nothing can be recorded; `eager_capture` keeps everything else (the warm-up steps per shape, the
static inputs, the gradients zeroed in place and kept as the same tensors, the loss copied out, the trainer skipping
its zero_grad) and runs the recorded function eagerly at each replay. These tests hold such a run to the eager
trainer bit for bit; tests/test_cuda.py holds the recorded graphs to eager training on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncs
from model_configs import tiny_model_config
from test_decode import variant_config
from test_train import tiny_config, train_records

from titans import train as train_module
from titans import train_graph
from titans.config import ConfigError
from titans.models import build_model
from titans.train import train

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


def test_gradients_stay_the_same_tensors_and_are_replaced_each_step(recordings):
    """After the warm-up the gradients are recorded by address: every later step leaves new values in the same
    tensors, equal to a fresh eager backward of that batch (not added to the previous step's)."""
    torch.manual_seed(0)
    model = build_model(variant_config("LMM")).double()
    step = train_graph.GraphedStep(model, None, train_graph.eager_capture)
    batches = [torch.randint(0, 11, (2, 2, 9), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    held = None
    for index, (inputs, targets) in enumerate(batches):
        loss = step(inputs, targets)
        grads = [p.grad for p in model.parameters()]
        if index >= train_graph.WARM_UP_STEPS:
            held = held or grads
            assert all(a is b for a, b in zip(grads, held, strict=True))
        reference = build_model(variant_config("LMM")).double()
        reference.load_state_dict(model.state_dict())
        _, expected_loss, _ = reference(inputs, targets)
        expected_loss.backward()
        assert loss.double() == expected_loss.double()
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(got.grad, want.grad)
    assert list(step.graphs) == [((2, 9), (2, 9), torch.device("cpu"))]


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
def test_the_recorded_step_could_be_a_cuda_graph(variant, impl, dtype):
    """What GraphedStep records (gradients zeroed, forward under autocast, backward, loss copied) reads no value on
    the host and builds no tensor from host data: the memory scan's Triton kernels (the CUDA default, interpreted
    here) and the fused CPU op, every variant; the input checks run outside the recording."""
    if impl == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    memory = {} if impl is None else {"impl": impl}
    model = build_model(tiny_model_config(variant, **memory))
    step = train_graph.GraphedStep(model, dtype, _checked_capture)
    inputs = torch.randint(0, 11, (2, 14), generator=torch.Generator().manual_seed(1))
    for _ in range(train_graph.WARM_UP_STEPS + 1):  # the last records and replays
        step(inputs, inputs)
    assert len(step.graphs) == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):  # checked before each replay
        step(torch.full_like(inputs, 11), inputs)
