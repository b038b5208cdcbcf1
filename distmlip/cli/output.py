"""What the commands write: ``--json`` keeps standard output for the one JSON document."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TextIO

__all__ = [
    "json_only_stdout",
    "print_json",
    "table",
    "FramesDocument",
    "run_header",
]


@contextlib.contextmanager
def json_only_stdout(enabled: bool = True):
    """Within the block, anything written to standard output goes to standard error instead.

    Upstream packages print banners (CHGNet: "CHGNet v0.3.0 initialized ..."), some from C code
    or from the worker processes started inside the block, so both ``sys.stdout`` and file
    descriptor 1 are pointed at standard error; ``--json`` output is written after the block,
    or, to stream it from inside, to the stream the block yields: the real standard output
    (``sys.stdout`` itself when not ``enabled``).
    """
    if not enabled:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved_fd = None
    with contextlib.suppress(OSError, ValueError):
        saved_fd = os.dup(1)
        os.dup2(2, 1)
    saved_stream, sys.stdout = sys.stdout, sys.stderr
    # A stream of its own on the saved descriptor, so that writes bypass the redirection; but a
    # replaced sys.stdout (a test's capture, a notebook) never wrote to descriptor 1 anyway.
    real = saved_stream
    if saved_fd is not None and _descriptor(saved_stream) == 1:
        real = os.fdopen(os.dup(saved_fd), "w", encoding="utf-8")
    try:
        yield real
    finally:
        if real is not saved_stream:
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to keep
                real.close()
        sys.stdout.flush()
        sys.stdout = saved_stream
        if saved_fd is not None:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def _descriptor(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def print_json(payload) -> None:
    """One JSON object on standard output (numpy arrays and scalars as lists and numbers)."""
    json.dump(payload, sys.stdout, indent=2, default=_plain)
    print(flush=True)


class FramesDocument:
    """``{...header, "frames": [...], "interrupted": ..., ...footer}`` written as it grows.

    The header goes out at once, each frame object as it is added (flushed), and
    :meth:`close` ends the document, also when the run is cut short (Ctrl-C, SIGTERM, a failed
    worker): the stream then always holds one valid JSON document with every frame computed,
    ``"interrupted": true`` and the ``"reason"``. A frame is written whole or not at all:
    Ctrl-C and SIGTERM are held while it is written (a signal inside a blocked write to a full
    pipe would otherwise leave half an object).
    """

    def __init__(self, stream: TextIO, header: dict):
        self.stream = stream
        self.count = 0
        self.closed = False
        opening = json.dumps(header, indent=2, default=_plain)[:-2] + "," if header else "{"
        self._write(opening + '\n  "frames": [')  # the header without its closing "\n}"

    def add(self, frame: dict) -> None:
        """One frame object, flushed."""
        text = json.dumps(frame, indent=2, default=_plain).replace("\n", "\n    ")
        self._write(("," if self.count else "") + "\n    " + text, frames=1)

    def close(self, reason: str | None = None, footer: dict | None = None) -> None:
        """End the document (once): ``reason`` None for a complete run, else why it stopped;
        ``footer``: more top-level fields."""
        if self.closed:
            return
        self.closed = True
        tail = {"interrupted": reason is not None, **({"reason": reason} if reason else {})}
        fields = json.dumps({**tail, **(footer or {})}, indent=2, default=_plain)[2:]
        # Cut short by a closed pipe, say: the error being raised is the one to report.
        with contextlib.suppress(*((OSError, ValueError) if reason else ())):
            self._write(("\n  " if self.count else "") + "],\n" + fields + "\n")

    def _write(self, text: str, frames: int = 0) -> None:
        from distmlip.md.trajectory import interrupts_deferred

        with interrupts_deferred():  # counted with the write: a held signal is raised after
            self.stream.write(text)
            self.stream.flush()
            self.count += frames


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns, name and value."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def run_header(args, source: str) -> dict:
    """The JSON fields every command's output starts with: what was run, on what."""
    return {
        "source": source,
        "model": str(args.model),
        "partitioner": args.partitioner,
        "dtype": args.dtype,
    }
