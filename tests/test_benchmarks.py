"""The benchmark scripts: their FLOP count, memory watchdog, crossover maths, correctness gate and --quick runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_memory  # noqa: E402
import bench_models  # noqa: E402

from titans.memory import NeuralMemory  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize(
    "dim, heads, chunk, length",
    [(32, 1, 8, 64), (32, 2, 4, 40), (48, 4, 16, 48)],
    ids=["d32-h1-C8", "d32-h2-C4", "d48-h4-C16"],
)
def test_analytic_flops_equal_torch_flop_counter(dim, heads, chunk, length):
    # every term but the elementwise state update and conv is a matmul that FlopCounterMode sees
    case = bench_memory.MemoryCase(dim, heads, 2, length, chunk, "fwd")
    # the chunked form's products, which FlopCounterMode sees (the fused op runs the same ones inside one op)
    module = bench_memory.build_memory(case, impl="chunked")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.randn(2, length, dim))
    flops = bench_memory.memory_flops(case)
    counted = counter.get_total_flops() / case.tokens
    assert counted == pytest.approx(flops["forward"] - flops["state_update"] - flops["conv"], rel=1e-12)


def test_flops_of_backward_add_the_recomputed_forward_only_when_the_scan_is_checkpointed():
    short = bench_memory.MemoryCase(64, 1, 1, 64, 16, "fwd+bwd", checkpoint_every=16)  # 4 chunks: no checkpoint
    long = bench_memory.MemoryCase(64, 1, 1, 1024, 16, "fwd+bwd", checkpoint_every=16)
    forward = bench_memory.memory_flops(short)["forward"]
    assert bench_memory.memory_flops(short)["total"] == 3 * forward
    assert bench_memory.memory_flops(long)["total"] == 4 * forward


def test_gate_passes_on_the_library_and_catches_a_wrong_memory(monkeypatch):
    assert bench_memory.equivalence_error(16, 2, 4) < 1e-10
    import titans.memory.module as module

    for name in ("fused_memory", "chunked_memory"):  # either fast path, wrong, fails the gate
        real = getattr(module, name)

        def shifted(*args, real=real, **kwargs):
            y, state = real(*args, **kwargs)
            return y + 1e-4, state  # a scale would be undone by the RMSNorm after the memory

        with monkeypatch.context() as patch:
            patch.setattr(module, name, shifted)
            with pytest.raises(AssertionError):
                bench_memory.equivalence_error(16, 2, 4)


def test_a_failed_gate_refuses_to_report(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise AssertionError("mismatch")

    monkeypatch.setattr(bench_memory, "equivalence_error", broken)
    assert bench_memory.main(["--quick", "--no-peer"]) == 1  # main() sets threads; the fixture restores them
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == {"benchmark": "memory", "gate": "failed", "config": "dim32-h2-C16"}


def test_watchdog_kills_a_worker_over_the_memory_cap():
    hog = [sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(30)"]
    result = bench_memory.run_isolated(hog, timeout_s=20, mem_cap_gb=0.1)
    assert "GB cap" in result["error"]
    assert result["rss_seen_mb"] > 100


def test_peak_rss_counts_from_the_reset_not_from_process_start():
    # VmHWM after a reset: a 100 MB allocation shows as ~100 MB, whatever the process held at its peak before
    held_before = bytearray(200 * 2**20)
    del held_before
    base = bench_memory.reset_peak_rss()
    block = bytearray(100 * 2**20)  # zero-filled by calloc, so its pages are resident
    assert 90 < bench_memory.peak_rss_mb() - base < 130
    del block


def test_crossover_interpolates_where_the_variant_overtakes_the_baseline():
    def row(variant, length, tps):
        return {"variant": variant, "kind": "train", "seq_len": length, "tokens_per_s": tps, "malloc": "glibc"}

    rows = [row("baseline-full", 1000, 400.0), row("baseline-full", 4000, 100.0)]
    rows += [row("MAC", 1000, 100.0), row("MAC", 4000, 400.0)]
    # log-log straight lines meet halfway in log T: sqrt(1000 * 4000) = 2000
    assert bench_models.crossover(rows, "MAC", "tokens_per_s", higher_is_better=True) == 2000
    rows[3]["tokens_per_s"] = 90.0
    assert bench_models.crossover(rows, "MAC", "tokens_per_s", higher_is_better=True) is None


def test_extrapolated_crossover_solves_the_fitted_quadratic_baseline_against_a_flat_variant():
    def row(variant, length, seconds_per_token):
        return {
            "variant": variant,
            "kind": "train",
            "seq_len": length,
            "tokens_per_s": 1 / seconds_per_token,
            "malloc": "glibc",
        }

    # baseline cost per token 1e-4 + 1e-8 T; the variant's is a flat 2e-4: they meet at T = 1e4
    rows = [row("baseline-full", t, 1e-4 + 1e-8 * t) for t in (256, 1024, 4096)]
    rows += [row("LMM", t, 2e-4) for t in (256, 1024)]
    assert bench_models.extrapolated_crossover(rows, "LMM") == 10000
    rows += [row("MAG", 1024, 5e-5)]  # already cheaper than the fitted intercept: no positive crossing
    assert bench_models.extrapolated_crossover(rows, "MAG") is None


def _last_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_memory_quick_runs_gated_and_ends_with_json():
    out = _last_json([sys.executable, str(BENCH / "bench_memory.py"), "--quick", "--no-peer", "--repeats", "1"])
    assert out["gate"] == "passed" and max(out["gate_max_abs_diff"].values()) < 1e-10
    assert [r["mode"] for r in out["results"]] == ["fwd", "fwd+bwd"]
    assert all(r["tokens_per_s"] > 0 and r["peak_delta_mb"] >= 0 for r in out["results"])
    assert out["matmul_gflops"] > 0 and out["peer"]["source"].startswith("quoted")


def test_bench_models_quick_runs_gated_and_ends_with_json():
    # --no-compile: the compiled rows' code is tested in test_compile.py; here it would only add a C++ build
    command = [sys.executable, str(BENCH / "bench_models.py"), "--quick", "--no-peer", "--repeats", "1", "--no-compile"]
    out = _last_json([*command, "--variants", "MAC", "--seq-lens", "32"])
    assert out["gate"] == "passed" and out["gate_max_abs_diff"]["MAC"] < 1e-10
    assert [(r["variant"], r["seq_len"]) for r in out["results"]] == [("MAC", 32)]
    assert out["results"][0]["tokens_per_s"] > 0
    assert [t["target"].split(" >=")[0] for t in out["targets"]] == ["MAC cached generation"]
    assert out["peer"][0]["ours"] > 0 and out["peer"][0]["peer_source"].startswith("quoted")


def test_vs_transformer_reports_the_median_ratio_over_workers_with_its_range(monkeypatch):
    """--vs-transformer --workers 4, one of which fails: each variant's ratio is the median of the workers' own
    ratios (baseline seconds over the variant's, within one worker), printed with their range; tok/s comes from the
    median step time; the worker that fails is left out. The workers' timings are given (run_isolated replaced), so
    the arithmetic is exact."""
    base_seconds = iter([1.0, 2.0, None, 1.0])  # the third worker fails
    variant_seconds = {"LMM": 2.0, "MAC": 4.0, "MAG": 3.0, "MAL": 2.5}

    def worker(command, timeout, mem_cap_gb, env):
        base = next(base_seconds)
        if base is None:
            return {"error": "killed"}
        # the second worker's machine is twice as slow for the baseline but not for the variants: ratios differ
        return {"baseline-sliding": {"seconds": base}} | {v: {"seconds": s} for v, s in variant_seconds.items()}

    monkeypatch.setattr(bench_models, "run_isolated", worker)
    monkeypatch.setattr(bench_models, "flops_per_token", lambda case: 1.0)
    args = bench_models.parse_args(["--vs-transformer", "--quick", "--workers", "4"])
    rows, targets = bench_models.vs_transformer(args)
    by_variant = {r["variant"]: r for r in rows}
    assert list(by_variant) == list(bench_models.VS_VARIANTS) and not targets
    mac = by_variant["MAC"]  # ratios 1/4, 2/4, 1/4 over the three workers that answered
    assert mac["workers"] == 3 and mac["ratio"] == 0.25 and mac["ratio_range"] == "0.250-0.500"
    assert mac["seconds"] == 4.0 and mac["tokens_per_s"] == pytest.approx(2 * 64 / 4.0)
    assert by_variant["baseline-sliding"]["ratio"] == 1.0 and by_variant["baseline-sliding"]["seconds"] == 1.0
    with pytest.raises(SystemExit):
        bench_models.parse_args(["--vs-transformer", "--workers", "0"])


def test_vs_transformer_exact_last_layer_reaches_every_memory_and_only_them(monkeypatch):
    """--exact-last-layer: the workers get the memory variants' cases with exact_last_layer set (the baseline's
    untouched), and those cases build models whose memories write their last layer token by token."""
    sent = []

    def worker(command, timeout, mem_cap_gb, env):
        sent.extend(json.loads(command[-1])["side_by_side"])
        return {v: {"seconds": 1.0} for v in bench_models.VS_VARIANTS}

    monkeypatch.setattr(bench_models, "run_isolated", worker)
    monkeypatch.setattr(bench_models, "flops_per_token", lambda case: 1.0)
    bench_models.vs_transformer(bench_models.parse_args(["--vs-transformer", "--quick", "--exact-last-layer"]))
    exact = {case["variant"]: case["exact_last_layer"] for case in sent}
    assert exact == {"baseline-sliding": None, "LMM": True, "MAC": True, "MAG": True, "MAL": True}
    mag = bench_models.build(bench_models.ModelCase(**sent[-2]))
    memories = [m for m in mag.modules() if isinstance(m, NeuralMemory)]
    assert sent[-2]["variant"] == "MAG" and memories and all(m.exact_last_layer for m in memories)
    with pytest.raises(SystemExit):
        bench_models.parse_args(["--exact-last-layer"])


def test_bench_update_rules_quick_runs_gated_and_ends_with_json():
    out = _last_json([sys.executable, str(BENCH / "bench_update_rules.py"), "--quick", "--variants", "LMM"])
    assert out["gate"] == "passed" and out["gate_max_abs_diff"]["LMM"] < 1e-10
    assert set(out["results"]["LMM"]) == {"seq_len", "anchored_s", "exact-last_s", "chunk-1_s"}
    assert all(v > 0 for v in out["results"]["LMM"].values())


def test_ddp_training_measurement_splits_the_global_batch_over_processes():
    """bench_models --processes: the global batch of 4 trains as 2 gloo processes of 2 rows (the library's DDP
    wrapping); tokens/s counts the global batch, and a batch the processes cannot split is refused up front."""
    case = bench_models.ModelCase(
        "MAC", 24, batch=4, d_model=16, n_layers=1, n_heads=2, segment_len=8, window=8, chunk_size=4, processes=2
    )
    out = bench_models.measure_ddp(case, threads=1, warmup=1, repeats=2)
    assert out["repeats"] == 2 and out["peak_delta_mb"] >= 0
    assert out["tokens_per_s"] == pytest.approx(4 * 24 / out["seconds"])
    with pytest.raises(ValueError, match="divide the batch"):
        bench_models.ModelCase("MAC", 24, batch=4, processes=3)


@pytest.mark.parametrize(("policy", "expected"), [("passive", "PASSIVE"), ("active", "ACTIVE"), ("unset", "None")])
def test_a_worker_runs_with_the_omp_wait_policy_asked_for(policy, expected, monkeypatch):
    """Including `unset` (libgomp's default, what `titans train` gets), which the worker's import of bench_memory
    must not turn back into PASSIVE; the parent's own setting never leaks into a worker."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "SOMETHING_ELSE")
    env = bench_memory.worker_env(policy)
    probe = "import os, bench_memory; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=BENCH, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
