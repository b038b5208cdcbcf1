"""What the commands write: ``--json`` keeps standard output for the one JSON object."""

from __future__ import annotations

import contextlib
import json
import os
import sys

__all__ = ["json_only_stdout", "print_json", "table"]


@contextlib.contextmanager
def json_only_stdout(enabled: bool = True):
    """Within the block, anything written to standard output goes to standard error instead.

    Upstream packages print banners (CHGNet: "CHGNet v0.3.0 initialized ..."), some from C code
    or from the worker processes started inside the block, so both ``sys.stdout`` and file
    descriptor 1 are pointed at standard error; ``--json`` output is written after the block.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved_fd = None
    with contextlib.suppress(OSError, ValueError):
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    saved_stream, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = saved_stream
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def print_json(payload) -> None:
    """One JSON object on standard output (numpy arrays and scalars as lists and numbers)."""
    json.dump(payload, sys.stdout, indent=2, default=_plain)
    print(flush=True)


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, name and value."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
