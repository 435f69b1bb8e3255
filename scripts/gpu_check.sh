#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none): the CUDA tests, the CUDA benchmark, then the slow
# compiled-kernel tests. Logs go to ${OUT:-gpu_check_out}/. Each stage has its own time limit (seconds), 7 minutes
# in all: TESTS_S (default 150), BENCH_S (210), SLOW_S (60). BENCH_ARGS are passed to benchmarks/bench_cuda.py
# (default: issue 18's shape, d_model 512, 8 heads, 4 layers, T 8192, its most important rows first).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$out/device.txt"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
    2>&1 | tee -a "$out/device.txt"
status=0
timeout "${TESTS_S:-150}" "$python" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_flex.py \
    2>&1 | tee "$out/tests.log" || status=1
# shellcheck disable=SC2086
timeout "${BENCH_S:-210}" "$python" benchmarks/bench_cuda.py ${BENCH_ARGS:---shape issue --budget 180} 2>&1 | tee "$out/bench.log" || status=1
timeout "${SLOW_S:-60}" "$python" -m pytest -q -p no:cacheprovider -m slow tests/test_cuda.py \
    2>&1 | tee "$out/slow_tests.log" || status=1
exit $status
