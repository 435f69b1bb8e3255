"""Harness for titans-pytorch 0.5.5 (lucidrains), run with that package's own venv; prints one JSON line.

It is started by bench_memory.py and bench_models.py as `PEER_PYTHON peer_titans_pytorch.py '<json spec>'`, one
measurement per fresh process (the peak-RSS delta is this process's alone). It never imports `titans`, and no
peer code is kept in this repository: install the package into a scratch venv as benchmarks/README.md shows.

Spec kinds:
    {"kind": "memory", dim, heads, batch, seq_len, chunk_size, mode: "fwd"|"fwd+bwd", threads, warmup, repeats,
     budget_s}                                         NeuralMemory(dim, chunk_size, heads), package defaults
    {"kind": "mac_train", dim, depth, segment_len, batch, seq_len, threads, warmup, repeats, budget_s}
                                                       MemoryAsContextTransformer: forward + backward + Adam step
    {"kind": "mac_generate", dim, depth, segment_len, prompt_len, new_tokens, threads}
                                                       cached greedy sampling (sample(use_cache=True))
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

# Before torch loads libgomp: sleep rather than spin between parallel regions. The default (ACTIVE) spinning makes
# small ops 10-30x slower whenever the 2 cores are shared with other processes (see benchmarks/README.md).
if not os.environ.get("TITANS_BENCH_OMP_DEFAULT"):  # set by worker_env("unset"): keep libgomp's own default
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field} line; this harness needs Linux")


def reset_peak_rss() -> float:
    """Reset the RSS high-water mark (VmHWM) to the current RSS and return it; same method as bench_memory.py."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def time_repeats(step, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Seconds per call: `warmup` untimed calls, then up to `repeats` timed calls within `budget_s`."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def make_mac(spec: dict[str, Any]):
    """A MAC of the package's README shape: 4 persistent and 4 long-term memory tokens, heads of width 16."""
    from titans_pytorch import MemoryAsContextTransformer

    dim_head = 16 if spec["dim"] <= 64 else 32
    return MemoryAsContextTransformer(
        num_tokens=256,
        dim=spec["dim"],
        depth=spec["depth"],
        segment_len=spec["segment_len"],
        num_persist_mem_tokens=4,
        num_longterm_mem_tokens=4,
        dim_head=dim_head,
        heads=spec["dim"] // dim_head,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    kind = spec["kind"]
    if kind == "memory":
        from titans_pytorch import NeuralMemory

        module = NeuralMemory(
            dim=spec["dim"], chunk_size=spec["chunk_size"], heads=spec["heads"], dim_head=spec["dim"] // spec["heads"]
        )
        x = torch.randn(spec["batch"], spec["seq_len"], spec["dim"], requires_grad=spec["mode"] == "fwd+bwd")

        def step() -> None:
            if spec["mode"] == "fwd":
                with torch.no_grad():
                    module(x)
            else:
                y, _ = module(x)
                y.square().mean().backward()
                module.zero_grad(set_to_none=True)

        tokens = spec["batch"] * spec["seq_len"]
    elif kind == "mac_train":
        model = make_mac(spec)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        # return_loss=True trims one position, so seq_len + 1 tokens give seq_len training positions
        data = torch.randint(0, 256, (spec["batch"], spec["seq_len"] + 1))

        def step() -> None:
            loss = model(data, return_loss=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        tokens = spec["batch"] * spec["seq_len"]
    elif kind == "mac_generate":
        model = make_mac(spec).eval()
        prompt = torch.randint(0, 256, (1, spec["prompt_len"]))
        total = spec["prompt_len"] + spec["new_tokens"]
        model.sample(prompt, spec["prompt_len"] + 4, temperature=0.0, use_cache=True, show_progress=False)  # warm-up
        base = reset_peak_rss()
        times = []
        for _ in range(max(1, spec.get("repeats", 1))):  # the median of several generations (one is ~1 s)
            start = time.perf_counter()
            model.sample(prompt, total, temperature=0.0, use_cache=True, show_progress=False)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        return {
            "seconds": seconds,
            "tokens_per_s": spec["new_tokens"] / seconds,
            "repeats": len(times),
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_delta_mb": peak_rss_mb() - base,
        }
    else:
        raise ValueError(f"unknown spec kind {kind!r}; expected memory, mac_train or mac_generate")

    base = reset_peak_rss()
    times = time_repeats(step, spec["warmup"], spec["repeats"], spec["budget_s"])
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "repeats": len(times),
        "peak_delta_mb": peak_rss_mb() - base,
        "peak_total_mb": peak_rss_mb(),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: peer_titans_pytorch.py '<json spec>' (see the module docstring)")
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
