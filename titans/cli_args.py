"""Argument checking of the `titans` command line: a parser whose errors are one line, and the `type=` validators.

A bad flag value (`--temperature -1`, `--samples 0`, `--lengths 2y`) is refused by argparse before any work, and an
unknown `--max-steps 5` gets a hint that config values are dotted overrides (`training.max_steps=5`). Every error is
one line on stderr, `titans <command>: error: ...`, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from titans.config import all_keys


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (no usage block) that point at `--help`; subparsers inherit it."""

    # The command line being parsed, for the hint on an unknown option (set by `parse_args`).
    argv: Sequence[str] = ()

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:
        self.argv = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            message = unrecognized_hint(message.split(":", 1)[1].split(), list(self.argv))
        # The top-level parser reports unknown arguments of a command: point at that command's help.
        command = self.argv[0] if self.argv and not self.argv[0].startswith("-") and " " not in self.prog else ""
        helper = f"{self.prog} {command}".strip()
        self.exit(2, f"{self.prog}: error: {message} (see `{helper} --help`)\n")


def unrecognized_hint(unknown: Sequence[str], argv: Sequence[str]) -> str:
    """The error for arguments argparse did not recognise, with the dotted override each `--flag` probably meant."""
    keys = all_keys()
    hints = []
    for arg in unknown:
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if not value and arg in argv and argv.index(arg) + 1 < len(argv):
            following = argv[argv.index(arg) + 1]
            value = following if not following.startswith("-") and "=" not in following else ""
        name = name.replace("-", "_")
        matches = [key for key in keys if key == name or key.rsplit(".", 1)[-1] == name]
        hints.extend(f"{key}={value or 'VALUE'}" for key in matches)
    example = f"write {' or '.join(hints)}" if hints else "e.g. training.max_steps=100"
    return (
        f"unrecognized arguments: {' '.join(unknown)}; config values are dotted key=value overrides, not options: "
        f"{example}"
    )


def positive_int(text: str) -> int:
    """`type=` for a count that must be >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """`type=` for a count that may be 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """`type=` for a finite number >= 0 (e.g. a sampling temperature, 0 = greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


_LENGTH = re.compile(r"^(\d+|(\d+(\.\d*)?|\.\d+)x)$")


def length_list(text: str) -> str:
    """`type=` for `--lengths`: comma-separated token counts ('1024,4096') or multiples of the trained length
    ('1x,2x,4x', '1.5x'), each > 0; returned as given (resolved against the trained length later)."""
    items = [item.strip() for item in text.split(",")]
    bad = [item for item in items if not _LENGTH.match(item)]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated lengths like 1024,4096 or multiples of the trained length like 1x,2x,4x; got "
            f"{', '.join(repr(b) for b in bad) or repr(text)}"
        )
    zero = [item for item in items if float(item.rstrip("x")) <= 0]
    if zero:
        raise argparse.ArgumentTypeError(f"every length must be > 0, got {', '.join(zero)}")
    return text
