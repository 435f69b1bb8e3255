"""Why LMM learns MQAR slower than a delta rule: one default changed at a time, several seeds, one table.

    python scripts/mqar_diagnosis.py                                  # vocabulary 256, 800 steps, seeds 0-2
    python scripts/mqar_diagnosis.py --vocab 1024 --steps 1500 --seeds 0 --rows lmm,delta,lmm-theta0.25
    python scripts/mqar_diagnosis.py --rows delta --seeds 0,1,2,3 --jobs 2
    python scripts/mqar_diagnosis.py --steps 6000 --rows lmm-defaults --seeds 0 --lengths 64,128,192,254 --plot a.png
    python scripts/mqar_diagnosis.py --seq-len 128 --pairs 8 --steps 6000 --rows lmm-defaults --seeds 0

Every row trains an LMM (the `mac-` rows a MAC, the others as named) with `titans train` on MQAR as
`titans.tasks.mqar` defines it (T 64 and 4 key-value pairs, or `--seq-len` and `--pairs`; fresh examples, batch 32),
d_model 64, 4 heads, 2 layers, AdamW lr 2e-3 (`--lr`) with 50 warm-up steps and the project's cosine schedule, one
CPU thread per run, `--jobs` runs at a time, and reads the held-out accuracy from the run's metrics.jsonl at four
evenly spaced steps, with the last evaluation's share of answers that name one of the example's context values
(`mqar_in_context`). The control, `delta`, is the memory at depth 1 with no momentum, no forgetting, chunk 1 and no
inner-gradient clip: exactly the delta rule with beta = 2 theta. Prints one line per run, a table of the median over
seeds, then one JSON line.
`--lengths` also evaluates each finished run at those lengths (`titans long-eval`, 256 fresh examples each: the same
keys and values, farther apart), and `--plot` draws those accuracies against the length, one line per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from titans.long_eval import plot_length_sweep

# The memory defaults the diagnosis tables in docs/results.md were made with (theta_init 0.05, every gradient of a
# chunk at its start; the LMM's defaults before session 14), pinned under every row but the UNPINNED ones so that a
# change of the defaults leaves each row's meaning as it is. `lmm-defaults` and `mac-defaults` take whatever the
# variant's defaults are; the other unpinned rows change one of them.
PINNED = ["model.memory.theta_init=0.05", "model.memory.exact_last_layer=false"]
UNPINNED = (
    "lmm-defaults", "lmm-s14", "lmm-s14-eta0.1", "mac-defaults", "mac-attention", "mac-nomomentum", "mac-theta0.25",
    "mac-lmm", "mac-residual", "mac-residual-nomomentum", "mac-residual-seg32",
    "baseline-full", "baseline-swa", "mag-defaults", "mal-defaults", "mag-lmm", "mal-lmm",
    "mac-residual-exactlast", "mag-exactlast", "mal-exactlast",
)  # fmt: skip
DELTA_RULE = [
    "model.memory_layers=1",
    "model.memory.momentum=false",
    "model.memory.forgetting=false",
    "model.memory.chunk_size=1",
    "model.memory.inner_grad_clip=null",
    "model.memory.theta_init=0.25",
]
LMM_MEMORY = ["model.memory.theta_init=0.25", "model.memory.exact_last_layer=true", "model.memory.momentum=false"]
MAC = ["model.variant=MAC", "model.segment_len=16"]
DEFAULT_LR = 2e-3  # the peak learning rate of every table made with this script before --lr existed
DEPTH2_CLIP = ["model.memory_layers=2", "model.memory.inner_grad_clip=1.0"]
ROWS = {
    # the LMM as it is configured by default now (theta_init 0.25, the exact last layer, no momentum)
    "lmm-defaults": [],
    # the LMM's defaults of session 14 (momentum on, eta_init 0.5), and with eta_init 0.1: at budgets long enough for
    # recall (binding keys to values, not only naming a context value) momentum is what held the LMM back
    "lmm-s14": ["model.memory.momentum=true"],
    "lmm-s14-eta0.1": ["model.memory.momentum=true", "model.memory.eta_init=0.1"],
    # MAC with segments of 16 (four per sequence: a key in an earlier segment reaches its query only through the
    # memory), with its defaults
    "mac-defaults": MAC,
    # the memory writing the attention output y (Eq. 24 as written; MAC's default up to session 16), with MAC's memory
    # defaults, without momentum, with the LMM's stronger write (theta_init 0.25, momentum on, anchored), and with all
    # three of the LMM's memory defaults (theta_init 0.25, the exact last layer, no momentum)
    "mac-attention": [*MAC, "model.mac_memory_input=attention"],
    "mac-nomomentum": [*MAC, "model.mac_memory_input=attention", "model.memory.momentum=false"],
    "mac-theta0.25": [*MAC, "model.mac_memory_input=attention", "model.memory.theta_init=0.25"],
    "mac-lmm": [*MAC, "model.mac_memory_input=attention", *LMM_MEMORY],
    # the memory writing the residual stream after attention, the block's normed input plus y
    "mac-residual": [*MAC, "model.mac_memory_input=residual"],
    # with segments of 32: at T 128 four segments per sequence, as segments of 16 are at T 64
    "mac-residual-seg32": [*MAC, "model.mac_memory_input=residual", "model.segment_len=32"],
    # and without surprise momentum (a cheaper scan: no S state to carry, read or write)
    "mac-residual-nomomentum": [*MAC, "model.mac_memory_input=residual", "model.memory.momentum=false"],
    # the other rows of the recall table (docs/results.md): full attention, and the sliding window of 16 that MAG and
    # MAL attend with (two layers reach 30 tokens back, so a key more than that before its query is out of sight)
    "baseline-full": ["model.variant=baseline", "model.baseline_attention=full"],
    "baseline-swa": ["model.variant=baseline", "model.baseline_attention=sliding", "model.window=16"],
    "mag-defaults": ["model.variant=MAG", "model.window=16"],
    "mal-defaults": ["model.variant=MAL", "model.window=16"],
    # MAG and MAL with the LMM's memory defaults (theta_init 0.25, the exact last layer, no momentum)
    "mag-lmm": ["model.variant=MAG", "model.window=16", *LMM_MEMORY],
    "mal-lmm": ["model.variant=MAL", "model.window=16", *LMM_MEMORY],
    # MAC (as mac-residual), MAG and MAL with the exact last layer, the write that stays stable where training takes
    # their gates and keys (docs/results.md, "Why MAC's gradient norms exploded on S-NIAH")
    "mac-residual-exactlast": [*MAC, "model.mac_memory_input=residual", "model.memory.exact_last_layer=true"],
    "mag-exactlast": ["model.variant=MAG", "model.window=16", "model.memory.exact_last_layer=true"],
    "mal-exactlast": ["model.variant=MAL", "model.window=16", "model.memory.exact_last_layer=true"],
    "lmm": [],  # the LMM's defaults before session 14 (PINNED)
    "delta": DELTA_RULE,
    "lmm-noclip": ["model.memory.inner_grad_clip=null"],
    "lmm-theta0.25": ["model.memory.theta_init=0.25"],
    "lmm-theta0.25-noclip": ["model.memory.theta_init=0.25", "model.memory.inner_grad_clip=null"],
    "lmm-theta0.25-depth1": ["model.memory.theta_init=0.25", "model.memory_layers=1"],
    "lmm-theta0.25-chunk4": ["model.memory.theta_init=0.25", "model.memory.chunk_size=4"],
    "lmm-chunk1": ["model.memory.chunk_size=1"],
    "lmm-chunk2": ["model.memory.chunk_size=2"],
    "lmm-theta0.25-nomomentum": ["model.memory.theta_init=0.25", "model.memory.momentum=false"],
    "lmm-theta0.25-noforgetting": ["model.memory.theta_init=0.25", "model.memory.forgetting=false"],
    "delta-chunk16": [*DELTA_RULE, "model.memory.chunk_size=16"],
    "lmm-theta0.5": ["model.memory.theta_init=0.5"],
    # one LMM default added to the control at a time: the control learns on every seed, so a row that stops
    # learning names the default that holds the memory back
    "delta+depth2": [*DELTA_RULE, "model.memory_layers=2"],
    "delta+momentum": [*DELTA_RULE, "model.memory.momentum=true"],
    "delta+forgetting": [*DELTA_RULE, "model.memory.forgetting=true"],
    "delta+clip": [*DELTA_RULE, "model.memory.inner_grad_clip=1.0"],
    "delta+theta0.05": [*DELTA_RULE, "model.memory.theta_init=0.05"],
    # the LMM defaults rebuilt from the control one at a time, at theta_init 0.25 (the last step is lmm-theta0.25)
    "delta+depth2+clip": [*DELTA_RULE, *DEPTH2_CLIP],
    "delta+depth2+clip+momentum": [*DELTA_RULE, *DEPTH2_CLIP, "model.memory.momentum=true"],
    "delta+depth2+clip+momentum+forgetting": [
        *DELTA_RULE,
        *DEPTH2_CLIP,
        "model.memory.momentum=true",
        "model.memory.forgetting=true",
    ],
    # the same, one default at a time, with chunks of 16: which of them the chunk-start anchor costs most
    "delta16+depth2+clip": [*DELTA_RULE, *DEPTH2_CLIP, "model.memory.chunk_size=16"],
    "delta16+momentum": [*DELTA_RULE, "model.memory.momentum=true", "model.memory.chunk_size=16"],
    "delta16+forgetting": [*DELTA_RULE, "model.memory.forgetting=true", "model.memory.chunk_size=16"],
    # momentum is the one that stops it: is it the doubled step (sum of eta^j = 2 at eta 0.5) or the replay itself?
    "delta16+theta0.5": [*DELTA_RULE, "model.memory.chunk_size=16", "model.memory.theta_init=0.5"],
    "delta16+momentum+eta0.1": [
        *DELTA_RULE,
        "model.memory.momentum=true",
        "model.memory.chunk_size=16",
        "model.memory.eta_init=0.1",
    ],
    "lmm-theta0.25-eta0.1": ["model.memory.theta_init=0.25", "model.memory.eta_init=0.1"],
    # within a chunk the writes interfere through their keys' overlaps, larger the smaller the head: one memory head
    # of width 64 instead of four of 16
    "delta16-heads1": [*DELTA_RULE, "model.memory.chunk_size=16", "model.memory.heads=1"],
    "lmm-theta0.25-heads1": ["model.memory.theta_init=0.25", "model.memory.heads=1"],
    # the last layer's inner gradient at the current weights, the first's at the chunk start (exact_last_layer):
    # the token-to-token correction kept where the delta rule has it, chunks of 16; "-naive" runs the per-token
    # reference, the others the chunk-parallel form
    "lmm-theta0.25-exactlast-naive": [
        "model.memory.theta_init=0.25",
        "model.memory.exact_last_layer=true",
        "model.memory.impl=naive",
    ],
    "lmm-theta0.25-exactlast": ["model.memory.theta_init=0.25", "model.memory.exact_last_layer=true"],
    "lmm-exactlast": ["model.memory.exact_last_layer=true"],
    "lmm-theta0.1-exactlast": ["model.memory.theta_init=0.1", "model.memory.exact_last_layer=true"],
}


def overrides(
    row: str, vocab: int, steps: int, seed: int, out: Path, lr: float = DEFAULT_LR, seq_len: int = 64, pairs: int = 4
) -> list[str]:
    return [
        "model.variant=LMM", "model.d_model=64", "model.n_heads=4", "model.n_layers=2",
        "data.dataset=mqar", f"data.seq_len={seq_len}", f"data.vocab_size={vocab}", f"data.mqar_num_kv_pairs={pairs}",
        "data.fresh_samples=true", "data.num_samples=512", "training.batch_size=32",
        f"training.learning_rate={lr}", "training.warmup_steps=50", f"training.max_steps={steps}",
        f"training.eval_every={max(steps // 4, 1)}", "training.checkpoint_every=1000000", "training.device=cpu",
        "training.threads=1", "training.progress=false", "training.nan_policy=skip", f"seed={seed}",
        *([] if row in UNPINNED else PINNED), *ROWS[row],
        f"training.out_dir={out}", f"training.run_name={row}-seed{seed}",
    ]  # fmt: skip


def run(
    row: str,
    vocab: int,
    steps: int,
    seed: int,
    out: Path,
    lengths: str | None = None,
    lr: float = DEFAULT_LR,
    seq_len: int = 64,
    pairs: int = 4,
) -> dict:
    """Train one row with one seed; its accuracy (%) at each evaluation and the last 50 steps' mean loss, and with
    `lengths` the trained model's `titans long-eval` results at those lengths."""
    name = f"{row}-seed{seed}"
    done = subprocess.run(
        [sys.executable, "-m", "titans", "train", *overrides(row, vocab, steps, seed, out, lr, seq_len, pairs)],
        capture_output=True,
        text=True,
    )
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"row": row, "seed": seed, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "mqar_accuracy" in r]
    accuracy = {r["step"]: round(100 * r["mqar_accuracy"], 1) for r in evals}
    # the last evaluation's share of answers that name a context value: ~100 % with accuracy near 1/4 is the bag of
    # values (the model knows where answers come from, not which key binds which), not recall
    in_context = round(100 * evals[-1]["mqar_in_context"], 1) if evals and "mqar_in_context" in evals[-1] else None
    losses = [r["loss"] for r in records if "loss" in r][-50:]
    result = {
        "row": row,
        "seed": seed,
        "accuracy": accuracy,
        "in_context": in_context,
        "final_loss": sum(losses) / max(len(losses), 1),
    }
    if lengths:
        result["lengths"] = length_sweep(out / name, lengths)
    return result


def length_sweep(run_dir: Path, lengths: str) -> list[dict] | str:
    """`titans long-eval` of a finished run at `lengths` (one thread): its per-length results, or the error line."""
    evaluate = [sys.executable, "-m", "titans", "long-eval", str(run_dir), "--lengths", lengths]
    done = subprocess.run(
        [*evaluate, "--samples", "256", "--batch-size", "64", "--threads", "1"], capture_output=True, text=True
    )
    (run_dir / "long-eval.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])["results"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=256, help="MQAR vocabulary (default 256)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per run (default 800)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from: {', '.join(ROWS)}")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak AdamW learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--seq-len", type=int, default=64, help="training length T (default 64)")
    p.add_argument("--pairs", type=int, default=4, help="key-value pairs per example (default 4)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--out", default="runs/mqar-diagnosis", help="where the runs go")
    p.add_argument(
        "--lengths",
        help="also evaluate every finished run at these lengths, e.g. 64,128,192,254 (each below the vocabulary)",
    )
    p.add_argument("--plot", help="with --lengths: a PNG of accuracy against length, one line per run")
    args = p.parse_args(argv)
    if args.plot and not args.lengths:
        p.error("--plot draws the --lengths evaluations: give --lengths too")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown --rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    # runs at another learning rate or layout go to their own folder, so that a sweep never mixes them up
    layout = "" if (args.seq_len, args.pairs) == (64, 4) else f"-T{args.seq_len}-pairs{args.pairs}"
    out = Path(args.out) / (
        f"vocab{args.vocab}{layout}-steps{args.steps}" + ("" if args.lr == DEFAULT_LR else f"-lr{args.lr:g}")
    )
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(row, seed) for row in rows for seed in seeds]
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for result in pool.map(
            lambda job: run(
                job[0], args.vocab, args.steps, job[1], out, args.lengths, args.lr, args.seq_len, args.pairs
            ),
            jobs,
        ):
            print(json.dumps(result), flush=True)
            results.append(result)
    print(
        f"\nMQAR accuracy (%), T {args.seq_len}, {args.pairs} pairs, vocabulary {args.vocab}, {args.steps} steps, "
        f"lr {args.lr:g}, median over seeds {seeds}:"
    )
    for row in rows:
        runs = [r for r in results if r["row"] == row and "accuracy" in r]
        if not runs:
            print(f"{row:28s} failed")
            continue
        steps = sorted(runs[0]["accuracy"])
        median = [statistics.median(r["accuracy"][s] for r in runs) for s in steps]
        final = " / ".join(f"{r['accuracy'][steps[-1]]:.1f}" for r in runs)
        named = " / ".join("-" if r.get("in_context") is None else f"{r['in_context']:.0f}" for r in runs)
        print(
            f"{row:28s} "
            + "  ".join(f"{s}: {m:5.1f}" for s, m in zip(steps, median, strict=True))
            + f"   final per seed {final}   in context {named}"
        )
    swept = {f"{r['row']} seed {r['seed']}": r["lengths"] for r in results if isinstance(r.get("lengths"), list)}
    for label, sweep in swept.items():
        print(f"{label:28s} at length " + "  ".join(f"{x['length']}: {100 * x['mqar_accuracy']:5.1f}" for x in sweep))
    if args.plot and swept:
        title = f"MQAR recall, T {args.seq_len}, {args.pairs} pairs, vocabulary {args.vocab}, {args.steps} steps"
        print(f"plot: {plot_length_sweep(swept, 'mqar_accuracy', args.plot, title, trained_length=args.seq_len)}")
    summary = {"script": "mqar_diagnosis", "vocab": args.vocab, "steps": args.steps, "lr": args.lr}
    summary |= {"seq_len": args.seq_len, "pairs": args.pairs}
    print(json.dumps({**summary, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
