"""Very long inputs: stream T = 65,536 tokens through LMM and MAG in pieces with the carried state, in bounded memory.

    python scripts/stream_long.py                              # LMM and MAG, T = 65,536, pieces of 1,024
    python scripts/stream_long.py --variants MAG --length 8192 --piece 512

Each variant runs in its own child process (so the peak RSS it reports is its own), with one CPU thread, under
torch.no_grad in eval mode. The child first checks correctness on a shorter input: the logits of the streamed pieces
(100 tokens each) must equal one forward pass over the first `--check-length` tokens (torch.testing.assert_close,
float32 defaults).
It then streams `--length` random tokens and records the time, the peak RSS, the RSS after the first and the last
piece, and the bytes of the carried state (which must not grow with T). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from titans.config import ModelConfig
from titans.models import TitansLM, build_model

VOCAB = 256
CHECK_PIECE = 100


def current_rss_mb() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def state_bytes(state: object) -> int:
    """Bytes of every tensor reachable from a (nested dataclass / list / tuple) stream state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, list | tuple):
        return sum(state_bytes(s) for s in state)
    if hasattr(state, "__dict__"):
        return sum(state_bytes(v) for v in vars(state).values())
    return 0


def stream(model: TitansLM, idx: torch.Tensor, piece: int, on_state=None, on_logits=None) -> None:
    """Feed idx [B, T] in pieces of `piece` tokens with the carried state; the callbacks see each piece's results
    (on_state(tokens_seen, state), on_logits(logits [B, n, V])), so nothing O(T) is kept unless a caller keeps it."""
    state = None
    for start in range(0, idx.shape[1], piece):
        logits, _, state = model(idx[:, start : start + piece], state=state)
        if on_state is not None:
            on_state(start + logits.shape[1], state)
        if on_logits is not None:
            on_logits(logits)


def run_variant(variant: str, length: int, piece: int, check_length: int) -> dict:
    """The child process's work for one variant; returns its measurements."""
    torch.set_num_threads(1)
    cfg = ModelConfig(variant=variant, vocab_size=VOCAB)  # the library defaults: d_model 64, 2 layers, window 32
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    long_idx = torch.randint(0, VOCAB, (1, length), generator=generator)

    with torch.no_grad():
        # Streaming first, so the peak RSS is the stream's own (the one-pass check below allocates O(T) activations).
        rss_before = current_rss_mb()
        trace: list[tuple[int, float, int]] = []
        start = time.time()
        stream(model, long_idx, piece, on_state=lambda seen, s: trace.append((seen, current_rss_mb(), state_bytes(s))))
        wall = time.time() - start
        peak = peak_rss_mb()

        # Pieces of 100 tokens cross chunk (16), segment and window (32) boundaries at every offset.
        check_idx = long_idx[:, :check_length]
        whole, _, _ = model(check_idx)
        pieces: list[torch.Tensor] = []
        stream(model, check_idx, CHECK_PIECE, on_logits=pieces.append)
        streamed = torch.cat(pieces, dim=1)
        max_diff = (streamed - whole).abs().max().item()
        torch.testing.assert_close(streamed, whole)

    state_sizes = {size for _, _, size in trace[1:]}
    return {
        "variant": variant,
        "length": length,
        "piece": piece,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(length / wall),
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_first_piece_mb": round(trace[0][1], 1),
        "rss_last_piece_mb": round(trace[-1][1], 1),
        "state_bytes": trace[-1][2],
        "state_bounded": len(state_sizes) <= 1,
        "check_length": check_length,
        "check_max_abs_diff": max_diff,
        "check_passed": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="LMM,MAG", help="comma-separated variants to stream")
    parser.add_argument("--length", type=int, default=65536, help="tokens to stream")
    parser.add_argument("--piece", type=int, default=1024, help="tokens per call")
    parser.add_argument("--check-length", type=int, default=2048, help="length of the streamed == one-pass check")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if min(args.length, args.piece, args.check_length) < 1:
        parser.error("--length, --piece and --check-length must be >= 1")

    if args.worker:
        print(json.dumps(run_variant(args.worker, args.length, args.piece, args.check_length)))
        return

    results = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--worker", variant, "--length", str(args.length)]
        command += ["--piece", str(args.piece), "--check-length", str(args.check_length)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            results.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"{'variant':>8} {'T':>7} {'s':>7} {'tok/s':>7} {'peak MiB':>9} {'rss 1st':>8} {'rss last':>8} {'state':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:>8} failed: {r['error']}")
            continue
        print(
            f"{r['variant']:>8} {r['length']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>7} {r['peak_rss_mb']:>9} "
            f"{r['rss_first_piece_mb']:>8} {r['rss_last_piece_mb']:>8} {r['state_bytes']:>9}"
        )
    print(json.dumps({"script": "stream_long", "torch": torch.__version__, "threads": 1, "results": results}))


if __name__ == "__main__":
    main()
