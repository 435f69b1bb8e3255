"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: a second gains nothing, and on a busy 2-core machine spinning workers slow
    them down many times over. Restored afterwards (train(training.threads=1) also sets the global count), so later
    tests see torch's setting unchanged. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
