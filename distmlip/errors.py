"""The errors a failed call raises in the driver (no torch import: the CLI reads them too)."""

from __future__ import annotations

__all__ = [
    "WorkerError",
    "OutOfMemoryError",
    "StructureRejected",
    "error_summary",
    "first_line",
    "stdout_to_stderr",
]


class WorkerError(RuntimeError):
    """A worker died, raised, or did not answer within the timeout. The workers were stopped;
    the next call starts new ones. ``worker_traceback`` holds a raising worker's traceback."""

    def __init__(self, message: str, worker_traceback: str | None = None):
        super().__init__(message)
        self.worker_traceback = worker_traceback
        if worker_traceback and hasattr(self, "add_note"):  # shown by Python's traceback
            self.add_note("worker traceback:\n" + worker_traceback.rstrip())


class OutOfMemoryError(WorkerError, MemoryError):
    """A worker ran out of memory (host or GPU). The message names the worker, the atoms and
    edges it held, the memory it had and what to change; ``report`` holds the same as a dict
    (see :func:`distmlip.worker.memory.memory_report`). The workers were stopped; the next call,
    e.g. on a smaller structure or after more workers were asked for, starts new ones."""

    def __init__(self, message: str, worker_traceback: str | None = None, report=None):
        super().__init__(message, worker_traceback)
        self.report = dict(report or {})


def first_line(error: BaseException, default: str | None = None) -> str:
    """The first line of ``error``'s message; ``default`` (else the error's type name) for an
    empty one. Every one-line report of an error starts from this."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    return type(error).__name__ if default is None else default


def error_summary(error: BaseException) -> str:
    """``Type: first line of the message``: what a one-line error report shows."""
    line = first_line(error, "")
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def stdout_to_stderr() -> None:
    """Point this process's standard output (descriptor 1) at its standard error, after
    flushing: a rank other than 0, or a --json run, keeps whatever a model prints off stdout."""
    import os
    import sys

    sys.stdout.flush()
    os.dup2(2, 1)


class StructureRejected(ValueError):
    """A structure the model refuses, found while computing (``Exchange.reject_if``): raised to
    the caller as this ``ValueError``; the workers, who refused it together, keep serving."""
