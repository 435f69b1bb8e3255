"""The `titans` command line: a thin argparse layer over train / evaluate / generate / memory_check.

    titans train [--config FILE] [--resume [PATH]] [key=value ...]
    titans eval CHECKPOINT [key=value ...]                      # e.g. data.seq_len=512 to test longer inputs
    titans compare [--config FILE] [--variants baseline,MAC] [--jobs 2] [key=value ...]
    titans generate CHECKPOINT --prompt "3 1 7 2" --max-new-tokens 8
    titans memory-check CHECKPOINT
    titans long-eval CHECKPOINT [--lengths 1x,2x,4x,8x] [--samples N] [--plot FILE]   # titans/long_eval.py
    titans bench [memory|models|cuda|rules] [ARGS ...]          # benchmarks/bench_*.py (default: memory, models)

`python -m titans ...` is the same; `python main.py [--config FILE] [key=value ...]` is `titans train`.
Overrides are dotted `key=value` pairs (`training.learning_rate=3e-4 model.memory.chunk_size=8`). train, eval,
compare and memory-check end by printing one JSON line of results. A bad config prints one line and exits 2.
Every command but bench takes `--allocator system|jemalloc|tcmalloc` (the process's malloc; titans/system.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from titans.checkpoint import CheckpointError, resolve_resume_path
from titans.cli_args import ArgumentParser, length_list, non_negative_float, non_negative_int, positive_int
from titans.compare import compare
from titans.config import VARIANTS, ConfigError, load_config
from titans.data import make_datasets
from titans.evaluate import evaluate
from titans.models import num_parameters
from titans.run import load_trained
from titans.system import ALLOCATORS, AllocatorError, cpu_compiler, pin_malloc_mmap_threshold, switch_allocator
from titans.tasks import Task
from titans.train import TrainingDivergedError, train

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
# `titans bench NAME ...` runs one script with ARGS; plain `titans bench ...` runs the CPU pair with the same ARGS
BENCHMARKS = {
    "memory": "bench_memory.py", "models": "bench_models.py", "cuda": "bench_cuda.py", "rules": "bench_update_rules.py"
}  # fmt: skip
DEFAULT_BENCHMARKS = ("memory", "models")


def print_json(result: dict[str, Any]) -> None:
    """One JSON line; NaN/Inf (not valid JSON) become null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    print(json.dumps(clean(result)), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    resume, overrides = args.resume, list(args.overrides)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        # argparse hands `--resume key=value` the override as PATH; it was meant as a bare --resume.
        resume, overrides = True, [resume, *overrides]
    config = args.config
    if config is None and isinstance(resume, str):
        # `titans train --resume runs/x` without --config continues with the run's own resolved config.
        run_config = resolve_resume_path(resume).parent / "config.yaml"
        config = run_config if run_config.is_file() else None
    if config is None:
        config = args.default_config
    cfg = load_config(config, overrides)
    result = train(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one JSON line for the run, from rank 0
        print_json(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg, task, model, path = load_trained(args.checkpoint, args.overrides)
    _, test_set = make_datasets(cfg, task)
    if cfg.training.eval_samples:
        test_set = test_set[: cfg.training.eval_samples]
    start = time.time()
    metrics = evaluate(model, task, test_set, cfg.training.batch_size)
    print(f"{path}: Test Loss {metrics['test_loss']:.4f}, {task.metric}: {metrics[task.metric]:.4f}")
    result = {"variant": cfg.model.variant, "task": task.name, **metrics, "chance": task.chance}
    result.update({"params": num_parameters(model), "samples": len(test_set), "wall_s": round(time.time() - start, 2)})
    result["checkpoint"] = str(path)
    print_json(result)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    summary, code = compare(args)
    print_json(summary)
    return code


def parse_prompt(text: str, task: Task) -> torch.Tensor | None:
    """Token ids from `--prompt`: ids, the task's special-token names (`task.token_names`, e.g. BOS, SEP, FILL) and
    `X*N` for N copies of X, separated by spaces or commas; None if a word is neither."""
    names = getattr(task, "token_names", {})
    ids: list[int] = []
    for word in text.replace(",", " ").split():
        token, _, times = word.partition("*")
        if token.upper() in names:
            value = names[token.upper()]
        elif token.lstrip("-").isdigit():
            value = int(token)
        else:
            return None
        if times and not times.isdigit():
            return None
        ids.extend([value] * (int(times) if times else 1))
    return torch.tensor(ids, dtype=torch.long)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg, task, model, _ = load_trained(args.checkpoint, args.overrides)
    if hasattr(task, "iter_segments"):
        # Byte-level text tasks: the prompt is text, the output is decoded text.
        from titans.tasks.text import decode, encode

        prompt = encode(args.prompt).long()
    else:
        prompt = parse_prompt(args.prompt, task)
        decode = None
    names = getattr(task, "token_names", {})
    if prompt is None or prompt.numel() == 0 or prompt.min() < 0 or prompt.max() >= task.vocab_size:
        named = f", the names {', '.join(names)} and NAME*N for N copies" if names else ""
        print(
            f"titans generate: --prompt must be token ids in [0, {task.vocab_size}){named}, separated by spaces, "
            f"e.g. '3 1 7 2'; got {args.prompt!r}",
            file=sys.stderr,
        )
        return 2
    device = next(model.parameters()).device
    if args.compile:
        if device.type == "cpu" and cpu_compiler() is None:
            print(
                "titans generate: --compile on CPU needs a C++ compiler (torch.compile's inductor builds C++); "
                "install g++ (apt install g++) or drop --compile",
                file=sys.stderr,
            )
            return 2
        model.compile_decode()
    if args.cuda_graph:
        if device.type != "cuda":
            print(
                f"titans generate: --cuda-graph needs a CUDA device, but the model is on {device.type}; pass "
                "training.device=cuda or drop --cuda-graph",
                file=sys.stderr,
            )
            return 2
        model.graph_decode()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        prompt[None].to(device), args.max_new_tokens, args.temperature, args.top_k, generator=generator
    )[0].cpu()
    new = out[prompt.numel() :]
    if decode is not None:
        print(decode(out.to(torch.uint8), errors="replace"))
    else:
        id_names = {i: name for name, i in names.items()}
        print(" ".join(id_names.get(tok, str(tok)) for tok in out.tolist()))
    print_json({"variant": cfg.model.variant, "task": task.name, "prompt": prompt.tolist(), "generated": new.tolist()})
    return 0


def cmd_long_eval(args: argparse.Namespace) -> int:
    # Imported lazily: only this command needs the long-context evaluation.
    from titans.long_eval import format_long_eval, long_eval, plot_length_sweep, resolve_lengths

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, task, model, path = load_trained(args.checkpoint, args.overrides)
    is_text = cfg.data.dataset == "text"
    if cfg.data.dataset not in ("mqar", "niah", "text"):
        raise ConfigError(
            f"long-eval covers data.dataset mqar, niah and text; {path} was trained on {cfg.data.dataset}, whose "
            f"difficulty is set by its layout: evaluate it at other settings with `titans eval {args.checkpoint} "
            "data.seq_len=N`"
        )
    lengths = None if is_text or args.lengths is None else resolve_lengths(args.lengths, task.seq_len)
    result = long_eval(
        model,
        task,
        lengths,
        args.samples,
        args.batch_size,
        args.seed,
        args.segment_len,
        args.max_new_tokens,
        progress=cfg.training.progress,
        max_bytes=args.max_bytes,
        # text: score as the model was trained, with the state carried across segments or each segment alone
        carry_state=cfg.data.text_carry_state,
    )
    print(f"{path}: {cfg.model.variant} on {task.name}")
    print(format_long_eval(result))
    result = {"variant": cfg.model.variant, **result, "params": num_parameters(model), "checkpoint": str(path)}
    if args.plot and not is_text:
        result["plot"] = str(
            plot_length_sweep(
                {cfg.model.variant: result["results"]}, task.metric, args.plot, task.name, result["trained_length"]
            )
        )
    print_json(result)
    return 0


def cmd_memory_check(args: argparse.Namespace) -> int:
    # Imported lazily: the check lives in its own module and is only needed by this command.
    from titans.memory_check import memory_check

    print_json(memory_check(args.checkpoint, samples=args.samples, ablations=not args.no_ablations))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    names, rest = (args.args[:1], args.args[1:]) if args.args[:1] and args.args[0] in BENCHMARKS else (None, args.args)
    wanted = [BENCHMARKS[name] for name in (names or DEFAULT_BENCHMARKS)]
    scripts = [BENCH_DIR / name for name in wanted if (BENCH_DIR / name).is_file()]
    if not scripts:
        print(f"titans bench: no benchmark scripts ({', '.join(wanted)}) in {BENCH_DIR}", file=sys.stderr)
        return 2
    status = 0
    for script in scripts:
        print(f"=== {script.name} ===", flush=True)
        status = max(status, subprocess.run([sys.executable, str(script), *rest]).returncode)
    return status


def variant_list(text: str) -> list[str]:
    """`--variants baseline,MAC` -> ["baseline", "MAC"], each matched case-insensitively against VARIANTS."""
    canonical = {name.lower(): name for name in VARIANTS}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name.lower() not in canonical]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(VARIANTS)}, got {text!r}")
    return [canonical[name.lower()] for name in names]


def _add_memory_check(commands: Any, process: argparse.ArgumentParser) -> None:
    p = commands.add_parser("memory-check", help="check that the neural memory changes at test time", parents=[process])
    p.add_argument("checkpoint", help="ckpt_*.pt file or run directory")
    p.add_argument(
        "--samples", type=positive_int, default=256, help="held-out examples each measurement evaluates (default 256)"
    )
    p.add_argument(
        "--no-ablations", action="store_true", help="skip the update-rule ablations (theta scaled, ascent, ...)"
    )
    p.set_defaults(func=cmd_memory_check)


def _add_generate(commands: Any, process: argparse.ArgumentParser, overrides: dict[str, Any]) -> None:
    p = commands.add_parser("generate", help="sample a continuation from a checkpoint", parents=[process])
    p.add_argument("checkpoint", help="ckpt_*.pt file or run directory")
    p.add_argument("--prompt", required=True, help="token ids ('3 1 7 2'), or text for byte-level text tasks")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=16)
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest tokens (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a torch.compile'd step (model.compile_decode): several times the eager tokens/s, after "
        "a one-time compilation (timings in benchmarks/README.md)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay the one-token step as a CUDA graph (model.graph_decode): one launch per token; GPU only",
    )
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="titans", description="Titans: train, evaluate and compare memory models.")
    commands = parser.add_subparsers(dest="command", required=True)
    overrides = {"nargs": "*", "metavar": "key=value", "help": "dotted config overrides, e.g. training.max_steps=100"}
    # options of the process itself, shared by every command that runs a model
    process = ArgumentParser(add_help=False)
    process.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="system",
        help="malloc for the whole process, preloaded by re-executing the command (default: the C library's). "
        "jemalloc trained the compiled MAC faster on CPU (measured in benchmarks/README.md); children of "
        "compare and torchrun's workers inherit it",
    )

    p = commands.add_parser("train", help="train one model", parents=[process])
    p.add_argument("--config", help="YAML run config (default: all defaults)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="continue from a ckpt_*.pt file or run directory (no PATH: this config's own run directory)",
    )
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="evaluate a checkpoint on its run's test split", parents=[process])
    p.add_argument("checkpoint", help="ckpt_*.pt file or run directory (newest valid checkpoint)")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser(
        "compare", help="train several variants with the same budget and compare them", parents=[process]
    )
    p.add_argument("--config", help="YAML run config shared by every variant")
    p.add_argument(
        "--variants",
        type=variant_list,
        default=list(VARIANTS),
        metavar="V1,V2",
        help=f"comma-separated variants to train (default: all of {','.join(VARIANTS)})",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="variants trained at once, each in its own process with cpu_count/jobs threads (default 1)",
    )
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_compare)

    _add_generate(commands, process, overrides)

    _add_memory_check(commands, process)

    p = commands.add_parser(
        "long-eval", help="length extrapolation (mqar, niah) or streamed bits per byte (text)", parents=[process]
    )
    p.add_argument("checkpoint", help="ckpt_*.pt file or run directory")
    lengths_help = "mqar/niah: '1x,2x,4x,8x' (default: multiples of the trained length) or '1024,4096'"
    p.add_argument("--lengths", type=length_list, help=lengths_help)
    count = {"type": positive_int, "default": None}
    p.add_argument("--samples", **count, help="examples per length (default 256 mqar, 50 niah)")
    p.add_argument("--batch-size", **count, help="examples per forward (text: parallel rows, default 16)")
    p.add_argument("--segment-len", type=positive_int, default=1024, help="tokens per forward call on long inputs")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="niah: bytes generated after the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", **count, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-bytes", **count, help="text: score only the first N bytes of each split")
    p.add_argument("--plot", help="write accuracy vs length to this PNG (mqar, niah)")
    p.add_argument("overrides", **overrides)
    p.set_defaults(func=cmd_long_eval)

    # Listed for `titans --help`; main() hands everything after `bench` to the scripts without parsing it.
    commands.add_parser(
        "bench",
        help="run a benchmark: `bench memory|models|cuda|rules [ARGS]` runs that script with ARGS; `bench [ARGS]` runs "
        "bench_memory.py and bench_models.py, each with ARGS",
    )
    return parser


def main(
    argv: Sequence[str] | None = None, default_config: str | Path | None = None, may_reexec: bool | None = None
) -> int:
    """Entry point of the `titans` script; returns the process exit code.

    default_config: the YAML `train` uses when neither --config nor a --resume path is given (main.py passes the
    repository's config.yaml); None = all defaults. may_reexec: argv is this process's own command line, so
    `--allocator` may re-execute it (default: only when argv is None, i.e. read from sys.argv).
    """
    parser = build_parser()
    parser.set_defaults(default_config=default_config)
    if may_reexec is None:
        may_reexec = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    # RSS should follow live tensors: the memory scan frees many large temporaries (see titans/system.py)
    pin_malloc_mmap_threshold()
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the scripts, options included (argparse would claim --help etc.).
        args = argparse.Namespace(command="bench", func=cmd_bench, args=argv[1:])
    else:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:
            # argparse has printed its one line (or --help); the code is returned, as for every other error
            return exit_.code if isinstance(exit_.code, int) else 2
        try:
            # before any work: switching re-executes the process (see titans/system.py)
            switch_allocator(args.allocator, may_reexec)
        except AllocatorError as error:
            print(f"titans: {error}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except ConfigError as error:
        # One line, no traceback: the message already names the key and the fix.
        print(f"titans: config error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"titans: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        # Not a checkpoint, or a damaged one: the message names the file and what to pass instead.
        print(f"titans: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"titans: training diverged: {error}", file=sys.stderr)
        return 1
