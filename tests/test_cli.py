"""The command line: `python main.py` end to end, eval/generate/compare/memory-check wiring, clean config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from titans import cli, compare
from titans.checkpoint import load_checkpoint
from titans.models import TitansLM
from titans.run import read_metrics
from titans.train import TrainingDivergedError, train

REPO = Path(__file__).resolve().parent.parent

# The seed README's config.yaml, shrunk to run in seconds (same keys, smaller values).
SEED_STYLE_YAML = """\
model:
  variant: "baseline"
  d_model: 16
  n_heads: 2
  memory_layers: 2
  persistent_memory_size: 8

data:
  dataset: "copy_task"
  seq_len: 24
  vocab_size: 10
  num_samples: 60

training:
  batch_size: 8
  learning_rate: 0.003
  max_epochs: 200
  gradient_clip: 1.0
"""

TINY_RUN = ["training.max_epochs=1", "training.device=cpu", "training.warmup_steps=2", "model.n_layers=1"]


def run_python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`python main.py --config seed.yaml training.max_epochs=1 ...` run once in a scratch directory."""
    work = tmp_path_factory.mktemp("cli")
    (work / "seed.yaml").write_text(SEED_STYLE_YAML)
    proc = run_python(str(REPO / "main.py"), "--config", "seed.yaml", *TINY_RUN, "training.run_name=seed", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work, proc


def test_main_py_trains_a_seed_style_config_and_ends_with_one_json_line(trained):
    work, proc = trained
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    # 60 samples, test_fraction 0.2 -> 48 train examples in batches of 8: one epoch is 6 steps.
    assert (result["variant"], result["task"], result["steps"], result["epochs"]) == ("baseline", "copy_task", 6, 1.0)
    for key in ("copy_accuracy", "test_loss", "train_loss", "chance", "params", "wall_s", "run_dir"):
        assert key in result
    assert result["chance"] == pytest.approx(0.1)
    # Epochs count from 1 in the evaluation line, as in the JSON: the end of the first epoch is "Epoch 1".
    assert any(line.startswith("Epoch   1 (step      6): Train Loss") for line in lines)
    run_dir = work / result["run_dir"]
    assert run_dir == work / "runs" / "seed"
    # work / path is path itself when path is absolute
    assert load_checkpoint(work / result["checkpoint"])["step"] == 6
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"] == [6]


def test_eval_reproduces_the_training_runs_final_test_metrics(trained, capsys, monkeypatch):
    work, proc = trained
    trained_result = json.loads(proc.stdout.strip().splitlines()[-1])
    monkeypatch.chdir(work)
    assert cli.main(["eval", "runs/seed"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Same checkpoint, same test split, same forward pass: the numbers training printed at its end.
    assert result["test_loss"] == pytest.approx(trained_result["test_loss"], rel=1e-6)
    assert result["copy_accuracy"] == trained_result["copy_accuracy"]
    assert result["samples"] == 12 and result["checkpoint"].endswith("ckpt_00000006.pt")


def test_eval_override_that_reshapes_the_model_is_a_config_error(trained, capsys, monkeypatch):
    work, _ = trained
    monkeypatch.chdir(work)
    assert cli.main(["eval", "runs/seed", "model.d_model=32"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "model.d_model=32" in err and "data.*" in err


def test_generate_greedy_continues_the_prompt(trained, capsys, monkeypatch):
    work, _ = trained
    monkeypatch.chdir(work)
    args = ["generate", "runs/seed", "--prompt", "10 3 1 7", "--max-new-tokens", "5", "--temperature", "0"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["prompt"] == [10, 3, 1, 7] and len(first["generated"]) == 5
    assert all(0 <= token < 14 for token in first["generated"])
    assert cli.main(args) == 0  # greedy decoding is deterministic
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first

    assert cli.main(["generate", "runs/seed", "--prompt", "3 99"]) == 2
    assert "[0, 14)" in capsys.readouterr().err

    # --compile decodes with the compiled step (traced with aot_eager here: inductor's build takes a minute) and
    # generates the same tokens; without a C++ compiler it is a one-line error
    original = TitansLM.compile_decode
    used = []

    def compile_for_tests(self, enabled=True, backend="inductor"):
        used.append(backend)
        original(self, enabled, "aot_eager")

    monkeypatch.setattr(TitansLM, "compile_decode", compile_for_tests)
    assert cli.main([*args, "--compile"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    assert used == ["inductor"]
    monkeypatch.setattr(cli, "cpu_compiler", lambda: None)
    assert cli.main([*args, "--compile"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "C++ compiler" in err
    # --cuda-graph records CUDA graphs: on a CPU model it is a one-line error naming the device
    assert cli.main([*args, "--cuda-graph"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs a CUDA device, but the model is on cpu" in err


def test_config_error_exits_2_with_one_line_and_no_traceback(trained):
    work, _ = trained
    proc = run_python("-m", "titans", "train", "--config", "seed.yaml", "training.learning_rat=0.1", cwd=work)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "training.learning_rat" in proc.stderr and "learning_rate" in proc.stderr


def test_missing_config_file_is_a_config_error(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("titans: config error:") and "absent.yaml" in err


def test_compare_trains_each_variant_and_reports_a_table_plot_and_json(tmp_path, capsys, monkeypatch):
    (tmp_path / "seed.yaml").write_text(SEED_STYLE_YAML)
    trained_variants = []

    def train_or_diverge(cfg, resume=None):
        # MAG stands in for a variant that diverges; the others train for real.
        trained_variants.append((cfg.model.variant, cfg.training.run_name))
        if cfg.model.variant == "MAG":
            raise TrainingDivergedError("the loss is NaN/Inf at step 3")
        return train(cfg, resume)

    monkeypatch.setattr(compare, "train", train_or_diverge)  # `titans compare` lives in titans/compare.py
    overrides = [*TINY_RUN, f"training.out_dir={tmp_path}", "training.run_name=cmp", "training.progress=false"]
    code = cli.main(["compare", "--config", str(tmp_path / "seed.yaml"), "--variants", "baseline,mag", *overrides])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])

    assert code == 1  # one variant failed
    assert trained_variants == [("baseline", "cmp-baseline"), ("MAG", "cmp-MAG")]
    assert summary["task"] == "copy_task" and summary["metric"] == "copy_accuracy"
    baseline, mag = summary["results"]
    assert baseline["run_dir"] == str(tmp_path / "cmp-baseline") and baseline["steps"] == 6
    assert mag == {"variant": "MAG", "error": "the loss is NaN/Inf at step 3"}
    assert Path(summary["plot"]).stat().st_size > 0
    table = out[out.index("variant") :]
    assert "baseline" in table and "MAG" in table and "failed" in table


def test_compare_in_parallel_processes_matches_the_sequential_compare(tmp_path, capsys):
    (tmp_path / "seed.yaml").write_text(SEED_STYLE_YAML)
    common = [*TINY_RUN, f"training.out_dir={tmp_path}", "training.progress=false", "training.threads=1"]
    summaries = {}
    for jobs in (1, 2):
        args = ["compare", "--config", str(tmp_path / "seed.yaml"), "--variants", "baseline,lmm", "--jobs", str(jobs)]
        assert cli.main([*args, *common, f"training.run_name=cmp{jobs}"]) == 0
        out = capsys.readouterr().out
        summaries[jobs] = json.loads(out.strip().splitlines()[-1])
        assert "chance" in out and "attention window 16" in out
    for sequential, parallel in zip(summaries[1]["results"], summaries[2]["results"], strict=True):
        assert parallel["variant"] == sequential["variant"]
        assert parallel["run_dir"].endswith(f"cmp2-{parallel['variant']}")
        # same config, seed and thread count in a child process: the same training, float for float
        assert parallel["test_loss"] == sequential["test_loss"] and parallel["steps"] == sequential["steps"]
    assert (tmp_path / "cmp2-LMM.log").read_text().strip().splitlines()[-1].startswith("{")
    assert summaries[2]["window"] == 16 and Path(summaries[2]["plot"]).stat().st_size > 0


def test_sigterm_to_a_parallel_compare_stops_every_child_with_a_checkpoint(tmp_path):
    (tmp_path / "seed.yaml").write_text(SEED_STYLE_YAML)
    overrides = [*TINY_RUN, f"training.out_dir={tmp_path}", "training.run_name=stop", "training.max_steps=100000"]
    overrides += ["training.max_epochs=100000", "training.checkpoint_every=100000", "training.eval_every=100000"]
    command = ["-m", "titans", "compare", "--config", "seed.yaml", "--variants", "baseline,lmm", "--jobs", "2"]
    parent = subprocess.Popen([sys.executable, *command, *overrides], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    metrics = [tmp_path / f"stop-{v}" / "metrics.jsonl" for v in ("baseline", "LMM")]
    deadline = time.time() + 60
    while not all(m.is_file() and m.stat().st_size > 0 for m in metrics):  # both children are training
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=60)
    summary = json.loads(out.strip().splitlines()[-1])
    assert [r["variant"] for r in summary["results"]] == ["baseline", "LMM"]
    for result in summary["results"]:
        # each child finished its step, saved a checkpoint and reported the interruption
        assert result["interrupted"] is True and Path(result["checkpoint"]).is_file()


def test_compare_rejects_zero_jobs(tmp_path, capsys):
    assert cli.main(["compare", "--jobs", "0"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_resume_flag_followed_by_an_override_is_a_bare_resume(monkeypatch, tmp_path):
    calls = {}

    def fake_train(cfg, resume=None):
        calls["cfg"], calls["resume"] = cfg, resume
        return {"steps": 0}

    monkeypatch.setattr(cli, "train", fake_train)
    assert cli.main(["train", "--resume", "training.max_steps=7", f"training.out_dir={tmp_path}"]) == 0
    assert calls["resume"] is True and calls["cfg"].training.max_steps == 7


def test_memory_check_command_calls_the_lead_module(monkeypatch, capsys):
    seen = {}

    def fake_memory_check(checkpoint_path, **kw):
        seen["path"] = checkpoint_path
        return {"memory_changes": True, "checkpoint": checkpoint_path}

    monkeypatch.setitem(sys.modules, "titans.memory_check", types.SimpleNamespace(memory_check=fake_memory_check))
    assert cli.main(["memory-check", "runs/x/ckpt_00000001.pt"]) == 0
    assert seen["path"] == "runs/x/ckpt_00000001.pt"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory_changes"] is True


def test_bench_runs_each_benchmark_script_with_the_given_arguments(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(cli, "BENCH_DIR", tmp_path)
    assert cli.main(["bench"]) == 2
    assert "no benchmark scripts" in capfd.readouterr().err

    (tmp_path / "bench_memory.py").write_text("import sys; print('memory', sys.argv[1:])")
    (tmp_path / "bench_models.py").write_text("import sys; print('models', sys.argv[1:]); sys.exit(3)")
    assert cli.main(["bench", "--seq-lens", "64", "-h"]) == 3  # the worst exit status of the scripts
    out = capfd.readouterr().out
    assert "memory ['--seq-lens', '64', '-h']" in out and "models ['--seq-lens', '64', '-h']" in out
    # a script's name picks that script alone, so its own flags reach only it
    assert cli.main(["bench", "memory", "--dims", "64"]) == 0
    out = capfd.readouterr().out
    assert "memory ['--dims', '64']" in out and "models" not in out
    assert cli.main(["bench", "cuda"]) == 2  # not in this directory
    assert "no benchmark scripts (bench_cuda.py)" in capfd.readouterr().err
