"""What a trained S-NIAH model copies from the needle: its loss on the bytes that only the needle can tell.

    python scripts/niah_copy_probe.py RUN [RUN ...] [--samples 32] [--length BYTES]

RULER's `niah_single_1` text names the needle's key three times: in the needle ("... numbers for KEY is: VALUE."),
in the question and in the answer prefix; the value appears once, in the needle, and then as the answer. For each
trained S-NIAH run (a run directory or a checkpoint) on `--samples` fresh examples (the same for every run), this
prints the mean loss in nats per byte, teacher-forced, of
* the needle's key, where nothing before it tells the key (what the key list alone gives: its floor without copying);
* the question's key, which only the needle tells (a loss below the needle key's: the model copies it from far back);
* each of the answer's 7 digits, which only the needle tells (ln 10 = 2.30 is a uniform guess among the digits).
Each key's first byte is left out (it starts the key, and the key list, not the context, decides how guessable it is).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from titans.run import load_trained
from titans.tasks.niah import ANSWER_BYTES, SNIAH

NEEDLE_KEY_PREFIX = b"special magic numbers for "
QUESTION_KEY_PREFIX = b"What is the special magic number for "


def key_span(text: bytes, prefix: bytes) -> tuple[int, int]:
    """(start, end) byte offsets of the key that follows the first `prefix` in `text` (it ends at a space)."""
    start = text.index(prefix) + len(prefix)
    return start, text.index(b" ", start)


def copy_losses(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, object]:
    """Mean loss (nats per byte) of the needle's key, the question's key and each answer digit.

    logits [B, T, 256], inputs and targets [B, T] of SNIAH(train_on="text") (targets: every next byte). The target at
    position p is byte p + 1, so a span [start, end) of bytes is predicted at positions start - 1 .. end - 2; keys are
    scored from their second byte.
    """
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # [B, T]
    spans: dict[str, list[float]] = {"needle_key": [], "question_key": []}
    for row in range(inputs.shape[0]):
        text = bytes(inputs[row].tolist())
        for name, prefix in (("needle_key", NEEDLE_KEY_PREFIX), ("question_key", QUESTION_KEY_PREFIX)):
            start, end = key_span(text, prefix)
            spans[name].append(nll[row, start : end - 1].mean().item())
    return {
        **{name: round(sum(v) / len(v), 4) for name, v in spans.items()},
        "answer_digits": [round(x, 3) for x in nll[:, -ANSWER_BYTES:].mean(dim=0).tolist()],
    }


def probe(run: str, samples: int, length: int | None, seed: int) -> dict[str, object]:
    """One run's copy losses on `samples` examples of `length` bytes (default: its trained length)."""
    cfg, task, model, _ = load_trained(run, [])
    if not isinstance(task, SNIAH):
        raise SystemExit(f"{run}: trained on {cfg.data.dataset}, not niah")
    text_task = SNIAH(seq_len=length or task.seq_len, haystack=task.haystack.name, train_on="text")
    batch = text_task.sample(samples, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, _, _ = model(batch.inputs.to(next(model.parameters()).device))
    losses = copy_losses(logits.cpu(), batch.inputs, batch.targets)
    return {"run": run, "variant": cfg.model.variant, "length": text_task.seq_len, **losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="S-NIAH run directories or checkpoints")
    p.add_argument("--samples", type=int, default=32, help="fresh examples (default 32)")
    p.add_argument("--length", type=int, help="example length in bytes (default: each run's trained length)")
    p.add_argument("--seed", type=int, default=123, help="seed of the examples (default 123)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    torch.set_num_threads(args.threads)
    results = []
    for run in args.runs:
        r = probe(run, args.samples, args.length, args.seed)
        digits = " ".join(f"{x:.2f}" for x in r["answer_digits"])
        print(
            f"{run}  ({r['variant']}, {r['length']} bytes)  needle key {r['needle_key']:.3f}  question key "
            f"{r['question_key']:.3f}  answer digits {digits}  (ln 10 = {math.log(10):.2f})",
            flush=True,
        )
        results.append(r)
    print(json.dumps({"script": "niah_copy_probe", "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
