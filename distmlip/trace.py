"""The one measurement hook of the numerical core: named spans and events, off by default.

The engine marks what it does (``with span("vesin"): ...``, ``event("exchange", bytes=...)``);
nothing is recorded unless a caller records (:func:`recording`), so the core pays one global
lookup per mark. Benchmarks and ``DistributedCalculator(..., trace=True)`` record instead of
patching library internals; what a record means (per-layer compute, communication shares) is
worked out outside the core (:mod:`distmlip.bench.run`).

Times are ``time.perf_counter()`` seconds since the recording started.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

__all__ = ["Trace", "recording", "span", "event", "active"]


@dataclass
class Trace:
    """What one recording saw.

    Attributes:
        spans: ``(name, start, end)`` per completed span, s, in completion order.
        events: one dict per event: ``name``, ``at`` (s) and the fields it was given.
    """

    spans: list[tuple[str, float, float]] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    origin: float = field(default_factory=time.perf_counter)

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def seconds(self, name: str) -> float:
        """Total duration of the spans called ``name``, s."""
        return sum(end - start for span_name, start, end in self.spans if span_name == name)

    def last(self, name: str) -> tuple[float, float] | None:
        """``(start, end)`` of the last span called ``name``, or None."""
        for span_name, start, end in reversed(self.spans):
            if span_name == name:
                return start, end
        return None

    def named(self, name: str) -> list[dict]:
        """The events called ``name``, in order."""
        return [entry for entry in self.events if entry["name"] == name]


_current: Trace | None = None


def active() -> Trace | None:
    """The trace being recorded, or None."""
    return _current


@contextmanager
def recording() -> Iterator[Trace]:
    """Record every span and event until the block ends (nested recordings are separate)."""
    global _current
    previous, _current = _current, Trace()
    try:
        yield _current
    finally:
        _current = previous


class _Span:
    __slots__ = ("trace", "name", "start")

    def __init__(self, trace: Trace, name: str):
        self.trace, self.name = trace, name

    def __enter__(self) -> _Span:
        self.start = self.trace.now()
        return self

    def __exit__(self, *exc) -> None:
        self.trace.spans.append((self.name, self.start, self.trace.now()))


_NOTHING = nullcontext()


def span(name: str):
    """Context manager timing the block as ``name`` when recording; a no-op otherwise."""
    trace = _current
    return _NOTHING if trace is None else _Span(trace, name)


def event(name: str, **fields) -> dict | None:
    """Record an event (its dict is returned, so a caller may add fields later), or None."""
    trace = _current
    if trace is None:
        return None
    entry = {"name": name, "at": trace.now(), **fields}
    trace.events.append(entry)
    return entry
