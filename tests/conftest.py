"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter (tests/test_scan_triton.py). Triton reads the flag at
# its first import, which no test module makes before this file runs; with a GPU they compile as users run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: a second gains nothing, and on a busy 2-core machine spinning workers slow
    them down many times over. Restored afterwards (train(training.threads=1) also sets the global count), so later
    tests see torch's setting unchanged. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
