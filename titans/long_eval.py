"""Long-context evaluation: length extrapolation on MQAR and S-NIAH, and bits per byte of a whole text split.

    titans long-eval runs/mac-mqar                       # MQAR / S-NIAH: the trained length T and 2T, 4T, 8T
    titans long-eval runs/mac-niah --lengths 1024,2048,4096,8192 --samples 50 --plot niah.png
    titans long-eval runs/mac-ptb                        # text: bits per byte of the valid and test splits

Every model in titans carries an exact streaming state (`model(idx, state=s)`), so long inputs are fed in pieces of
`segment_len` tokens with the state carried: the result equals one forward over the whole input (tested in float64),
while memory stays bounded by one piece (plus the KV cache for full attention). This is how a model trained at
length T is evaluated at 8T or 16K bytes on a CPU.

* MQAR (Zoology): the task at each length is `dataclasses.replace(task, seq_len=L)` — same vocabulary, same number
  of key-value pairs, longer power-law gaps. Metric `mqar_accuracy` (per-example query accuracy, then the mean).
* S-NIAH (RULER): generation, as RULER scores it. Each prompt is RULER's input plus answer prefix, sized so that
  `prompt + " " + answer` is L bytes; the model greedily generates `max_new_tokens` bytes after it and
  `score_answer` (RULER's `string_match_all`) checks that the 7-digit value is in the output. Metric `niah_accuracy`;
  `niah_digit_accuracy` (ours) is the fraction of the 7 digits generated in place, a graded view of partial recall.
* Text: `stream_bits_per_byte` streams a split as `batch_size` contiguous rows (`ByteCorpus.iter_segments`) with the
  memory state carried from one segment to the next, so every byte is predicted from everything before it in its
  row: bits per byte = summed cross-entropy / (scored bytes * ln 2). A model trained without carried state
  (`data.text_carry_state=false`, e.g. full attention, whose KV cache would grow without bound) is scored the same
  way, each segment from an empty state.

Evaluation is forward-only: the neural memory still learns at test time (its inner update is part of the forward
pass, paper §3.1), while the outer parameters never change.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from titans.errors import ConfigError
from titans.progress import Progress
from titans.tasks.base import IGNORE_INDEX
from titans.tasks.mqar import MQAR
from titans.tasks.niah import SNIAH, answer_digit_accuracy, min_length, score_answer
from titans.tasks.text import ByteCorpus, Split, TextTask

DEFAULT_SEGMENT_LEN = 1024  # tokens per forward call when streaming long inputs
DIGIT_METRIC = "niah_digit_accuracy"  # graded S-NIAH companion metric, see answer_digit_accuracy


def _progress(total: int, enabled: bool, desc: str) -> Progress:
    # A bar on an interactive terminal, a heartbeat line every HEARTBEAT_S seconds when the output is redirected.
    return Progress(total, "batch", desc, enabled=enabled)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@torch.no_grad()
def stream_logits(
    model: nn.Module, idx: torch.Tensor, segment_len: int = DEFAULT_SEGMENT_LEN, state: Any = None
) -> tuple[torch.Tensor, Any]:
    """Logits of idx [B, T] computed `segment_len` tokens at a time with the state carried -> ([B, T, V], state).

    Equal to `model(idx, state=state)` for every model in titans (their states make streaming exact); memory is
    bounded by one segment.
    """
    _check_positive("segment_len", segment_len)
    pieces = []
    for start in range(0, idx.shape[1], segment_len):
        logits, _, state = model(idx[:, start : start + segment_len], state=state)
        pieces.append(logits)
    return torch.cat(pieces, dim=1), state


@torch.no_grad()
def stream_bits_per_byte(
    model: nn.Module,
    corpus: ByteCorpus | TextTask,
    split: Split,
    seq_len: int,
    batch_size: int,
    progress: bool = True,
    max_bytes: int | None = None,
    carry_state: bool = True,
) -> dict[str, Any]:
    """Bits per byte of a whole split, streamed as `batch_size` rows of `seq_len`-byte segments with carried state.

    corpus: a ByteCorpus or a TextTask (its corpus). Row r of the split (see `ByteCorpus.iter_segments`) is read
    from its first byte to its last with one unbroken state, so the result equals one forward pass over each row.
    max_bytes: evaluate only the split's first max_bytes bytes (a cheaper estimate; None = the whole split).
    carry_state: False scores every segment from an empty state (the same bytes, each seq_len-byte segment its own
    context): how a model trained with data.text_carry_state=false, e.g. full attention, was trained.
    Returns {"split", "bits_per_byte", "bytes" (scored predictions), "segments", "carried_state", "wall_s"}.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    if isinstance(corpus, TextTask):
        corpus = corpus.corpus
    if not isinstance(corpus, ByteCorpus):
        raise TypeError(f"stream_bits_per_byte expects a ByteCorpus or TextTask, got {type(corpus).__name__}")
    if max_bytes is not None:
        _check_positive("max_bytes", max_bytes)
        cut = corpus.split(split)[:max_bytes]
        corpus = ByteCorpus(corpus.name, *(cut if s == split else corpus.split(s) for s in ("train", "valid", "test")))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start_time = time.time()
    n_segments = corpus.num_segments(split, seq_len, batch_size)
    nats = torch.zeros((), dtype=torch.float64)
    scored, state = 0, None
    bar = _progress(n_segments, progress, f"{corpus.name} {split}")
    try:
        for batch in corpus.iter_segments(split, seq_len, batch_size):
            batch = batch.to(device)
            logits, _, state = model(batch.inputs, state=state if carry_state else None)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            # Summed in float64: a 400 KB split is ~4e5 terms, beyond float32's exact accumulation.
            nats += (
                F.cross_entropy(
                    logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                .double()
                .cpu()
            )
            scored += int((batch.targets != IGNORE_INDEX).sum())
            bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return {
        "split": split,
        "bits_per_byte": nats.item() / (scored * math.log(2)),
        "bytes": scored,
        "segments": n_segments,
        "carried_state": carry_state,
        "wall_s": round(time.time() - start_time, 2),
    }


def _lengths(lengths: Sequence[int]) -> list[int]:
    if not lengths:
        raise ValueError("lengths must name at least one evaluation length, e.g. [1024, 2048]")
    for length in lengths:
        _check_positive("every evaluation length", length)
    return list(lengths)


@torch.no_grad()
def mqar_length_sweep(
    model: nn.Module,
    task: MQAR,
    lengths: Sequence[int],
    samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    segment_len: int = DEFAULT_SEGMENT_LEN,
    progress: bool = True,
) -> list[dict[str, float]]:
    """MQAR accuracy of `model` at each length: `samples` fresh examples of `replace(task, seq_len=L)`.

    Examples at length L come from a generator seeded with `seed + L`, so every model sees the same examples.
    Returns [{"length": L, "mqar_accuracy": mean per-example accuracy, "mqar_in_context": mean share of answers naming
    a context value (MQAR.score), "samples": n}] in the order of `lengths`.
    """
    lengths = _lengths(lengths)
    _check_positive("samples", samples)
    _check_positive("batch_size", batch_size)
    # Built up front, so an impossible length (vocab_size <= L) fails before any compute, as one line naming the fix.
    longest = max(lengths)
    if longest >= task.vocab_size:
        raise ConfigError(
            f"MQAR cannot be evaluated at length {longest}: its vocabulary (data.vocab_size={task.vocab_size}, "
            f"fixed by the trained model) must exceed every length (Zoology's layout); evaluate at lengths below "
            f"{task.vocab_size} (--lengths) or train with data.vocab_size > {longest}"
        )
    tasks = []
    for length in lengths:
        try:
            tasks.append(dataclasses.replace(task, seq_len=length))
        except ValueError as error:
            raise ConfigError(f"MQAR cannot be evaluated at length {length} (--lengths): {error}") from error
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    bar = _progress(len(lengths) * math.ceil(samples / batch_size), progress, "mqar")
    try:
        for length, at_length in zip(lengths, tasks, strict=True):
            generator = torch.Generator().manual_seed(seed + length)
            sums: dict[str, float] = {}
            for start in range(0, samples, batch_size):
                n = min(batch_size, samples - start)
                batch = at_length.sample(n, generator)
                logits, _ = stream_logits(model, batch.inputs.to(device), segment_len)
                # score() averages over the batch; weight by its size for the mean over all samples.
                for name, value in at_length.score(logits.cpu(), batch).items():
                    sums[name] = sums.get(name, 0.0) + value * n
                bar.update()
            results.append(
                {"length": length, **{name: total / samples for name, total in sums.items()}, "samples": samples}
            )
    finally:
        bar.close()
        model.train(was_training)
    return results


@torch.no_grad()
def greedy_continue(
    model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, segment_len: int = DEFAULT_SEGMENT_LEN
) -> torch.Tensor:
    """Greedy continuation of prompt [B, T0] -> new tokens [B, max_new_tokens].

    The prompt is prefilled `segment_len` tokens at a time, then tokens are fed one by one with the carried
    state: the same tokens as `model.generate(prompt, max_new_tokens, temperature=0)`, in bounded memory.
    """
    _check_positive("max_new_tokens", max_new_tokens)
    logits, state = stream_logits(model, prompt, segment_len)
    new = []
    next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
    for step in range(max_new_tokens):
        new.append(next_token)
        if step == max_new_tokens - 1:
            break
        logits, _, state = model(next_token, state=state)
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
    return torch.cat(new, dim=1)


@torch.no_grad()
def niah_length_sweep(
    model: nn.Module,
    task: SNIAH,
    lengths: Sequence[int],
    samples: int = 50,
    batch_size: int = 8,
    seed: int = 0,
    max_new_tokens: int = 16,
    segment_len: int = DEFAULT_SEGMENT_LEN,
    progress: bool = True,
) -> list[dict[str, float]]:
    """RULER S-NIAH accuracy by generation at each length L (bytes of prompt + " " + answer).

    For each L, `samples` prompts from `task.make_prompt(generator, L)` (generator seeded with `seed + L`), greedy
    generation of `max_new_tokens` bytes, scored by `score_answer` (RULER's string_match_all).
    Returns [{"length": L, "niah_accuracy": fraction of samples answered, "niah_digit_accuracy": mean fraction of
    answer digits generated in place (`answer_digit_accuracy`; chance 0.1), "samples": n}].
    """
    lengths = _lengths(lengths)
    _check_positive("samples", samples)
    _check_positive("batch_size", batch_size)
    shortest = min_length(task.haystack)
    if min(lengths) < shortest:
        raise ConfigError(
            f"S-NIAH length {min(lengths)} bytes (--lengths) cannot hold RULER's template, needle and answer; use "
            f">= {shortest}"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    bar = _progress(len(lengths) * math.ceil(samples / batch_size), progress, task.name)
    try:
        for length in lengths:
            generator = torch.Generator().manual_seed(seed + length)
            # Every prompt at one length has the same byte count (answers are always 7 digits), so they batch.
            drawn = [task.make_prompt(generator, length) for _ in range(samples)]
            hits, digits = 0, 0.0
            for start in range(0, samples, batch_size):
                part = drawn[start : start + batch_size]
                prompt = torch.tensor([list(p.encode("utf-8")) for p, _ in part], dtype=torch.long, device=device)
                generated = greedy_continue(model, prompt, max_new_tokens, segment_len).cpu()
                for row, (_, answer) in zip(generated.tolist(), part, strict=True):
                    text = bytes(row).decode("utf-8", errors="replace")
                    hits += score_answer(text, answer)
                    digits += answer_digit_accuracy(text, answer)
                bar.update()
            results.append(
                {"length": length, task.metric: hits / samples, DIGIT_METRIC: digits / samples, "samples": samples}
            )
    finally:
        bar.close()
        model.train(was_training)
    return results


def plot_length_sweep(
    sweeps: dict[str, Sequence[dict[str, float]]],
    metric: str,
    path: str | Path,
    title: str = "",
    trained_length: int | None = None,
) -> Path:
    """Accuracy vs evaluation length, one line per label (e.g. variant) -> the PNG written at `path`."""
    # Imported here: matplotlib costs a second to import and only plotting needs it.
    import matplotlib
    from matplotlib.figure import Figure

    if not sweeps:
        raise ValueError("plot_length_sweep needs at least one sweep to draw")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # past a handful of lines the legend goes beside the axes (inside it would hide them) and the colours come from
    # a 20-colour cycle (the default repeats after 10)
    crowded = len(sweeps) > 6
    figure = Figure(figsize=(9 if crowded else 6, 4))
    axes = figure.add_subplot()
    if crowded:
        axes.set_prop_cycle(color=[matplotlib.colormaps["tab20"](i % 20) for i in range(len(sweeps))])
    for label, rows in sweeps.items():
        axes.plot([r["length"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
    if trained_length is not None:
        axes.axvline(trained_length, color="grey", linestyle=":", label=f"trained length {trained_length}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("evaluation length (tokens)")
    axes.set_ylabel(metric)
    axes.set_ylim(-0.02, 1.02)
    axes.set_title(title, fontsize="medium")
    if crowded:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def resolve_lengths(spec: str, trained_length: int) -> list[int]:
    """ "1x,2x,4x,8x" -> multiples of the trained length; "1024,2048" -> those lengths; both may mix."""
    lengths = []
    for item in (part.strip() for part in spec.split(",")):
        try:
            length = round(float(item[:-1]) * trained_length) if item.endswith("x") else int(item)
        except ValueError:
            length = 0
        if length < 1:
            raise ConfigError(
                f"--lengths: evaluation lengths are ints >= 1 or multiples like '4x' of the trained length "
                f"({trained_length}), got {item!r}"
            )
        lengths.append(length)
    if not lengths:
        raise ConfigError(f"--lengths: no evaluation lengths in {spec!r}; use e.g. '1x,2x,4x,8x' or '1024,2048'")
    return lengths


def long_eval(
    model: nn.Module,
    task: MQAR | SNIAH | TextTask,
    lengths: Sequence[int] | None = None,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    segment_len: int = DEFAULT_SEGMENT_LEN,
    max_new_tokens: int = 16,
    progress: bool = True,
    max_bytes: int | None = None,
    carry_state: bool = True,
) -> dict[str, Any]:
    """The long-context evaluation of one trained model, dispatched on its task.

    MQAR / S-NIAH: a length sweep (default lengths T, 2T, 4T, 8T with T = task.seq_len, the trained length);
    samples default 256 (MQAR) / 50 (S-NIAH). Text: bits per byte of the whole valid and test splits, streamed in
    task.seq_len-byte segments over `batch_size` rows (default 16), or their first `max_bytes` bytes; lengths and
    samples do not apply; carry_state False scores each segment from an empty state (`stream_bits_per_byte`).
    Returns {"task", "metric", "trained_length", "results": [...], "wall_s"}.
    """
    start = time.time()
    trained = task.seq_len
    if isinstance(task, TextTask):
        if lengths is not None or samples is not None:
            raise ConfigError(
                "text evaluation streams whole splits: lengths and samples do not apply; omit --lengths and --samples"
            )
        rows = batch_size or 16
        results = [
            stream_bits_per_byte(model, task, split, trained, rows, progress, max_bytes, carry_state)
            for split in ("valid", "test")
        ]
    elif isinstance(task, MQAR | SNIAH):
        lengths = list(lengths) if lengths is not None else [trained, 2 * trained, 4 * trained, 8 * trained]
        if isinstance(task, MQAR):
            results = mqar_length_sweep(
                model, task, lengths, samples or 256, batch_size or 32, seed, segment_len, progress
            )
        else:
            results = niah_length_sweep(
                model, task, lengths, samples or 50, batch_size or 8, seed, max_new_tokens, segment_len, progress
            )
    else:
        raise TypeError(f"long_eval covers MQAR, SNIAH and TextTask, got {type(task).__name__}")
    return {
        "task": task.name,
        "metric": task.metric,
        "trained_length": trained,
        "results": results,
        "wall_s": round(time.time() - start, 2),
    }


def format_long_eval(result: dict[str, Any]) -> str:
    """A readable table of a `long_eval` result: one row per length (accuracy in %) or per split (bits per byte)."""
    metric, rows = result["metric"], result["results"]
    if metric == "bits_per_byte":
        lines = [f"{'split':<8}{'bits/byte':>10}{'bytes':>12}"]
        lines += [f"{r['split']:<8}{r['bits_per_byte']:>10.4f}{r['bytes']:>12,}" for r in rows]
    else:
        digits = all(DIGIT_METRIC in r for r in rows)
        extra = f"{DIGIT_METRIC + ' %':>24}" if digits else ""
        lines = [f"{'length':>8}{metric + ' %':>18}{extra}{'samples':>9}  (trained at {result['trained_length']})"]
        for r in rows:
            extra = f"{100 * r[DIGIT_METRIC]:>24.1f}" if digits else ""
            lines.append(f"{r['length']:>8}{100 * r[metric]:>18.1f}{extra}{r['samples']:>9}")
    return "\n".join(lines)
