"""Progress of long commands: a tqdm bar on a terminal, a plain heartbeat line every few seconds otherwise.

With output redirected (a log file, CI, `nohup`) a bar is noise and its absence is silence, so `Progress` prints a
line in the style of the evaluation lines instead, at the first update and then every `every_s` seconds:

    step 120/1000 (epoch 1): loss 1.2345, 8,230 tokens/s, 0.50 s/step, ETA 7m20s
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

HEARTBEAT_S = 30.0  # seconds between heartbeat lines of the commands that have no setting for it


def format_duration(seconds: float) -> str:
    """`42s`, `7m20s`, `2h05m`: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress through `total` units (steps, lengths, examples).

    enabled=False shows nothing (a non-main rank, or progress turned off). On a terminal (stdout and stderr both ttys)
    this is a tqdm bar (unless bar=False); otherwise, with every_s > 0, a heartbeat line on stdout at the first update
    (unless announce_first=False) and then at most every `every_s` seconds. tokens_per_unit adds a tokens/s figure.
    Use as a context manager (closes the bar).
    """

    def __init__(
        self,
        total: int,
        unit: str = "step",
        desc: str = "",
        initial: int = 0,
        enabled: bool = True,
        every_s: float = HEARTBEAT_S,
        tokens_per_unit: int | None = None,
        bar: bool = True,
        announce_first: bool = True,
    ) -> None:
        terminal = enabled and bar and sys.stdout.isatty() and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not terminal, dynamic_ncols=True, unit=unit, desc=desc)
        self.heartbeat = enabled and not terminal and every_s > 0
        self.total, self.unit, self.desc, self.every_s = total, unit, desc, every_s
        self.tokens_per_unit = tokens_per_unit
        self.done = self.first_done = initial
        self.start = self.last_line = time.monotonic()
        # announce_first=False: the first line only once every_s has passed (work that is usually quick stays quiet)
        self.said = not announce_first
        # The rate is measured from the first update on once it can be: the first unit often pays one-time costs
        # (a C++ build, compilation, warm caches) that would make every later ETA too long.
        self.rate_from: tuple[float, int] | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()

    def update(self, n: int = 1, **fields: Any) -> None:
        """Count n more units done; `fields` (e.g. loss=1.23, epoch=1) show on the bar or in the heartbeat line."""
        self.done += n
        self.bar.update(n)
        if fields:
            self.bar.set_postfix({k: _short(v) for k, v in fields.items()})
        now = time.monotonic()
        if self.rate_from is None:
            self.rate_from = (now, self.done)
        if self.heartbeat and (not self.said or now - self.last_line >= self.every_s):
            self.said, self.last_line = True, now
            print(self.line(now, fields), flush=True)

    def line(self, now: float, fields: dict[str, Any]) -> str:
        """The heartbeat line: where we are, the fields, the rate since the start, and the time left."""
        head = f"{self.desc + ' ' if self.desc else ''}{self.unit} {self.done}/{self.total}"
        epoch = fields.get("epoch")
        parts = [f"{k} {_short(v)}" for k, v in fields.items() if k != "epoch"]
        elapsed, units = now - self.start, self.done - self.first_done
        if self.rate_from is not None and self.done > self.rate_from[1] and now > self.rate_from[0]:
            elapsed, units = now - self.rate_from[0], self.done - self.rate_from[1]
        if units > 0 and elapsed > 0:
            if self.tokens_per_unit:
                parts.append(f"{units * self.tokens_per_unit / elapsed:,.0f} tokens/s")
            parts.append(f"{elapsed / units:.2f} s/{self.unit}")
            if self.rate_from is not None and self.done == self.rate_from[1] and self.done - self.first_done == 1:
                # Only the first unit is timed, one-time costs (a build, a compile) included: no forecast from it.
                parts.append("ETA from the next line")
            else:
                parts.append(f"ETA {format_duration((self.total - self.done) * elapsed / units)}")
        return head + (f" (epoch {epoch})" if epoch is not None else "") + ": " + ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)
