"""How ``distmlip md`` and ``distmlip relax`` stop early: SIGTERM (a batch scheduler's time
limit) is handled like Ctrl-C, and either ends the command with one line and the status a shell
expects (130 for Ctrl-C, 143 for SIGTERM) after what was computed is kept."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

__all__ = ["Terminated", "sigterm_as_interrupt", "stopped"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit): stop like Ctrl-C, results intact."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (in the main thread only: elsewhere
    Python delivers no signals, and the block runs as is)."""

    def stop(number, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped(interruption: KeyboardInterrupt, what: str) -> int:
    """Print ``distmlip: interrupted; WHAT`` (or ``terminated (SIGTERM)``); the exit status."""
    if isinstance(interruption, Terminated):
        print(f"distmlip: terminated (SIGTERM); {what}", file=sys.stderr)
        return 143
    print(f"distmlip: interrupted; {what}", file=sys.stderr)
    return 130
