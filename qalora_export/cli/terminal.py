"""What the command line shows: our lines and tables on the terminal, progress bars, exit codes.

While a command runs, ``sys.stdout`` / ``sys.stderr`` lead to the log file (:mod:`qalora_export.console`);
these helpers write to the terminal the console kept.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from qalora_export.console import Console

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# The terminal while a command runs (set by main); sys.stdout / sys.stderr then lead to the log.
_CONSOLE: Optional[Console] = None


def set_console(console: Optional[Console]) -> None:
    global _CONSOLE
    _CONSOLE = console


def out():
    return _CONSOLE.out if _CONSOLE is not None else sys.stdout


def err():
    return _CONSOLE.err if _CONSOLE is not None else sys.stderr


def note(msg: str) -> None:
    """A progress or status line of ours (stderr side of the terminal)."""
    print(msg, file=err(), flush=True)


class Progress:
    """A tqdm bar fed by name callbacks (or nothing when stderr is not a terminal and CI is set)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="layer", file=err(), leave=False,
                        disable=None if not os.environ.get("CI") else True)

    def __call__(self, name: str) -> None:
        self.bar.set_postfix_str(name.rsplit(".", 3)[-3] if "." in name else name, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def say(msg: str = "") -> None:
    print(msg, file=out(), flush=True)


def print_summary(title: str, summary: dict, skip: Sequence[str] = ("per_layer",)) -> None:
    say(title)
    for key, value in summary.items():
        if key in skip:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}"
        say(f"  {key:24s} {value}")
