"""How the training gradient's norm grows with the sequence length: is backpropagation through the memory stable?

    python scripts/gradient_growth.py --variants MAC,MAG,MAL,LMM                 # fresh models, the default gates
    python scripts/gradient_growth.py --variants MAC --theta 0.05,0.1,0.2 --eta 0.5,0.9
    python scripts/gradient_growth.py --variants MAC --theta 0.3 model.memory.exact_last_layer=true
    python scripts/gradient_growth.py --run runs/mqar-diagnosis/.../mac-residual-seed0 --lengths 128,256
    python scripts/gradient_growth.py --run RUN --lengths 512,2048 model.memory.exact_last_layer=true

The memory's write is a recurrence over chunks, M_c = M_{c-1} - theta * (the chunk's gradients, all taken at
M_{c-1}: Eq. 16) with momentum eta and forgetting alpha, and the outer loop backpropagates through every step of it.
Each chunk's Jacobian grows with theta, with the chunk's summed key curvature and with momentum (an effective step
theta / (1 - eta)); where its norm exceeds 1 the gradient of a length-T sequence grows exponentially in T, while the
forward stays bounded by the inner-gradient clip. theta and eta are learned gates, so a model can train its way
there. This script measures it: the global gradient norm of one training step's loss for each sequence length, on
random tokens from the vocabulary (fresh models, gates started at `--theta` / `--eta` through `memory.theta_init` /
`memory.eta_init`, d_model 64, 4 heads, 2 layers, window and segment 64 unless overridden) or on a trained run's own
task at those lengths (`--run`, the gates as trained); with them the theta and eta the memories used (mean / max over
tokens, heads and layers) and the largest eigenvalue of each chunk's key Gram matrix (mean and 90th percentile over
chunks: 1 for orthogonal unit keys, the chunk size for identical ones; the summed key curvature above). "growth" is
the norm at the longest length over the norm at the shortest: about 1 or below is stable (a longer sequence's mean
loss spreads the same gradient over more tokens), orders of magnitude is not. Prints one line per model, then one
JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable

import torch

from titans.config import load_config
from titans.errors import ConfigError
from titans.models import TitansLM, build_model
from titans.run import load_trained
from titans.tasks import make_task

SHAPE = ["model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.window=64", "model.segment_len=64"]


def record_memory_inputs(model: TitansLM) -> dict[str, list[float]]:
    """Wrap every memory's gate and memory functions (instance attributes: the model's class is untouched) so that
    each call appends to the returned lists: theta's and eta's mean and max, and per whole chunk the largest
    eigenvalue of its keys' Gram matrix K K^T (unit keys: between 1, all orthogonal, and the chunk size, all alike;
    the chunk's summed curvature that Eq. 16's chunk-start gradient steps across at once)."""
    seen: dict[str, list[float]] = {"theta_mean": [], "theta_max": [], "eta_mean": [], "eta_max": [], "key_gram": []}
    for block in model.blocks:
        memory = getattr(block, "memory", None)
        if memory is None:
            continue

        def gates(*args, _gates: Callable = memory._gates, **kwargs):
            theta, eta, alpha = _gates(*args, **kwargs)
            for name, value in (("theta", theta), ("eta", eta)):
                if value is not None:
                    seen[f"{name}_mean"].append(float(value.detach().float().mean()))
                    seen[f"{name}_max"].append(float(value.detach().float().amax()))
            return theta, eta, alpha

        def memory_function(_function: Callable = memory._memory_function, _chunk: int = memory.chunk_size):
            run, extra = _function()

            def spied(q, k, *args, **kwargs):
                whole = k.shape[2] // _chunk * _chunk  # k [B, H, T, d]
                chunks = k.detach()[:, :, :whole].double().unflatten(2, (-1, _chunk))
                if chunks.numel():
                    gram = chunks @ chunks.transpose(-1, -2)
                    seen["key_gram"].extend(torch.linalg.eigvalsh(gram)[..., -1].flatten().tolist())
                return run(q, k, *args, **kwargs)

            return spied, extra

        memory._gates = gates
        memory._memory_function = memory_function
    return seen


def gradient_norm(model: TitansLM, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The global L2 norm of every parameter's gradient of the mean next-token loss."""
    model.zero_grad(set_to_none=True)
    _, loss, _ = model(inputs, targets)
    loss.backward()
    squares = [p.grad.double().square().sum() for p in model.parameters() if p.grad is not None]
    return math.sqrt(float(torch.stack(squares).sum()))


def fresh_rows(args: argparse.Namespace) -> list[dict]:
    """One row per (variant, theta start, eta start): a fresh model measured on random tokens at every length."""
    rows = []
    for variant, theta, eta in itertools.product(args.variants, args.theta or [None], args.eta or [None]):
        gates = [f"model.memory.theta_init={theta}"] if theta is not None else []
        gates += [f"model.memory.eta_init={eta}"] if eta is not None else []
        model_keys = [f"model.variant={variant}", f"model.vocab_size={args.vocab}", *SHAPE, *gates, *args.overrides]
        try:
            cfg = load_config(None, model_keys).model  # validated as `titans train` would
        except ConfigError as error:
            raise SystemExit(f"gradient_growth: {error}") from error
        torch.manual_seed(args.seed)
        model = build_model(cfg).train()
        seen = record_memory_inputs(model)
        generator = torch.Generator().manual_seed(args.seed + 1)
        norms = {}
        for length in args.lengths:
            idx = torch.randint(0, args.vocab, (args.batch, length + 1), generator=generator)
            norms[length] = gradient_norm(model, idx[:, :-1], idx[:, 1:])
        label = f"{variant} theta_init {theta if theta is not None else 'default'} eta_init {eta or 'default'}"
        rows.append(summarise(label, norms, seen))
    return rows


def run_rows(args: argparse.Namespace) -> list[dict]:
    """One row per trained run: its weights (under the overrides) measured on its own task at every length."""
    rows = []
    for run in args.run:
        try:
            cfg, _, model, _ = load_trained(run, ["training.device=cpu", *args.overrides])
        except ConfigError as error:
            raise SystemExit(f"gradient_growth: {run}: {error}") from error
        model.train()
        seen = record_memory_inputs(model)
        norms = {}
        for length in args.lengths:
            try:  # the data config checks the length against the task (e.g. S-NIAH's template needs 369 bytes)
                task = make_task(dataclasses.replace(cfg.data, seq_len=length))
            except ConfigError as error:
                raise SystemExit(f"gradient_growth: {run} at --lengths {length}: {error}") from error
            batch = task.sample(args.batch, torch.Generator().manual_seed(args.seed))
            norms[length] = gradient_norm(model, batch.inputs, batch.targets)
        rows.append(summarise(run, norms, seen))
    return rows


def summarise(label: str, norms: dict[int, float], seen: dict[str, list[float]]) -> dict:
    lengths = sorted(norms)
    gates = {k: (max(v) if k.endswith("max") else sum(v) / len(v)) for k, v in seen.items() if v and k != "key_gram"}
    if seen.get("key_gram"):
        gram = torch.tensor(seen["key_gram"])
        gates |= {"key_gram_mean": float(gram.mean()), "key_gram_p90": float(gram.quantile(0.9))}
    growth = norms[lengths[-1]] / norms[lengths[0]] if norms[lengths[0]] > 0 else math.inf
    return {"model": label, "grad_norm": {str(t): norms[t] for t in lengths}, "growth": growth, **gates}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "overrides",
        nargs="*",
        help="model.* key=value overrides: of the fresh models, or of a --run's model where its parameters keep their "
        "shapes (e.g. model.memory.exact_last_layer=true: the trained weights under another write rule)",
    )
    p.add_argument("--variants", type=lambda s: s.split(","), default=["MAC", "MAG", "MAL", "LMM"])
    p.add_argument("--theta", type=lambda s: [float(v) for v in s.split(",")], help="memory.theta_init values")
    p.add_argument("--eta", type=lambda s: [float(v) for v in s.split(",")], help="memory.eta_init values")
    p.add_argument("--run", action="append", default=[], help="a trained run (directory or checkpoint); repeatable")
    p.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=[128, 1024, 4096])
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--vocab", type=int, default=256, help="fresh models' vocabulary (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if len(args.lengths) < 2 or min(args.lengths) < 1 or args.batch < 1:
        p.error(f"need two or more --lengths >= 1 and --batch >= 1, got {args.lengths} and {args.batch}")
    bad = [o for o in args.overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        p.error(f"overrides are model.* key=value pairs, got {bad}")
    if args.run and (args.theta or args.eta):
        p.error("--theta and --eta start fresh models' gates; a --run keeps its trained ones")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run_rows(args) if args.run else fresh_rows(args)
    for row in rows:
        norms = "  ".join(f"T {t}: {n:.3g}" for t, n in row["grad_norm"].items())
        keys = ("theta_mean", "theta_max", "eta_mean", "eta_max", "key_gram_mean", "key_gram_p90")
        gates = "  ".join(f"{k} {row[k]:.3g}" for k in keys if k in row)
        print(f"{row['model']}: {norms}  growth {row['growth']:.3g}  ({gates})", flush=True)
    print(json.dumps({"lengths": args.lengths, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
