"""Stopping a run cleanly: SIGINT/SIGTERM become a flag the training loop polls between steps.

The loop finishes the step it is in, saves a checkpoint and returns, so Ctrl-C or a scheduler's SIGTERM never loses
work; `--resume` continues from there. A step cannot be cut in the middle, so the wait is announced on stderr.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so a run stops between steps with a checkpoint.

    A second signal of the same kind gets the default behaviour back (Ctrl-C twice still kills at once).
    Handlers can only be installed from the main thread; elsewhere (e.g. a worker thread) signals are left alone.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self.announce = announce  # say on stderr how long the stop waits (rank 0 only under torchrun)
        self.step_started = time.monotonic()  # the loop stamps each step's start
        self.last_step_s: float | None = None  # and the previous step's duration

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous[signum])
        if self.announce:
            # A step cannot be cut in the middle, so a long one (a long sequence, a cold compile) is announced.
            if self.last_step_s is None:
                wait = "the first step is still running"
            else:
                left = max(0.0, self.last_step_s - (time.monotonic() - self.step_started))
                wait = f"about {left:.0f} s left; the last step took {self.last_step_s:.1f} s"
            message = (
                f"\ntitans: {self.signal_name} received: stopping after the current step ({wait}), then saving a "
                "checkpoint; send it again to stop at once without one\n"
            )
            os.write(2, message.encode())  # stderr, safe inside a signal handler

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
