"""Activation checkpointing across halo exchanges: keep layer boundaries, recompute the rest.

``torch.utils.checkpoint`` (non-reentrant) runs a region without saving its intermediate
tensors and re-runs it during the backward when a saved tensor is first needed. A region of a
distributed forward contains halo exchanges; re-running them would send messages that the
peers, busy with their own backward, never answer. So the first run *records* every exchange's
result and the recomputation *replays* them in the same order, without communicating: the
exchanged rows are the layer boundaries that are kept. The gradient still flows through the
exchanges of the first run (their autograd nodes are kept), whose backward is the usual
reverse transfer, so the messages of a checkpointed backward are exactly those of a plain one.

Memory: the peak holds the kept boundaries plus one region's activations, instead of every
region's activations (measured in docs/performance.md, "Checkpointing").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint

from distmlip.options import DEFAULT_CHUNK_EDGES, MIN_CHUNK_EDGES

__all__ = [
    "DEFAULT_CHUNK_EDGES",
    "MIN_CHUNK_EDGES",
    "warm_up",
    "chunk_edges",
    "chunks",
    "Replay",
    "checkpointed",
    "patched_forwards",
    "CheckpointRegions",
]


def warm_up() -> None:
    """Run one tiny checkpointed backward, so torch's lazy imports happen now."""
    leaf = torch.ones(1, requires_grad=True)
    torch.utils.checkpoint.checkpoint(torch.square, leaf, use_reentrant=False).sum().backward()


def chunk_edges(checkpoint: bool | int) -> int:
    """Edges per chunk of a ``checkpoint`` setting: 0 (off), :data:`DEFAULT_CHUNK_EDGES`
    (``True``) or the positive integer given."""
    if checkpoint is True:
        return DEFAULT_CHUNK_EDGES
    if checkpoint is False or checkpoint is None:
        return 0
    return int(checkpoint)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop)]`` covering ``range(n)`` in pieces of at most ``size`` (0: one piece)."""
    if size <= 0 or n <= size:
        return [(0, n)]
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class Replay:
    """Results of a region's collectives: recorded on its first run, replayed on re-runs."""

    def __init__(self):
        self.values: list = []
        self._replaying = False
        self._position = 0

    @property
    def replaying(self) -> bool:
        return self._replaying

    def record(self, value):
        self.values.append(value)
        return value

    def next(self):
        if self._position >= len(self.values):
            raise RuntimeError(
                "a checkpointed region ran more exchanges when recomputed than when first run "
                "(its forward must not depend on anything but its inputs)"
            )
        value = self.values[self._position]
        self._position += 1
        return value

    @contextmanager
    def replay(self) -> Iterator[None]:
        self._replaying, self._position = True, 0
        try:
            yield
        finally:
            self._replaying = False


def checkpointed(
    function: Callable,
    args: tuple,
    kwargs: dict[str, Any],
    bind: Callable[[Replay | None], Any] | None = None,
):
    """``function(*args, **kwargs)``, checkpointed when autograd records (else run plainly).

    ``bind(replay)`` returns a context manager under which the communicator records or
    replays through ``replay`` (``bind(None)`` is never called; None: no collectives).
    """
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    replay = Replay()
    runs = 0

    def run(*args, **kwargs):
        nonlocal runs
        runs += 1
        mode = replay.replay() if runs > 1 else nullcontext()
        with mode, bind(replay) if bind is not None else nullcontext():
            return function(*args, **kwargs)

    # preserve_rng_state: a region that draws random numbers (fairchem's "s2" activation rolls
    # a random rotation) must draw the same ones when it is recomputed.
    return torch.utils.checkpoint.checkpoint(
        run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
    )


@contextmanager
def patched_forwards(
    modules: Iterable[torch.nn.Module], wrap: Callable[[torch.nn.Module, Callable], Callable]
) -> Iterator[None]:
    """Run each module's ``forward`` through ``wrap(module, forward)`` for the duration of the
    block.

    For upstream forwards that loop over their layers themselves (MACE): their layer modules
    are checkpointed without copying the loop. The instance attribute shadows the class's
    ``forward`` and is removed afterwards, so the module is unchanged outside the block.
    """
    patched = []
    try:
        for module in modules:
            if "forward" in vars(module):
                raise RuntimeError(f"{type(module).__name__}.forward is already patched")
            module.forward = wrap(module, module.forward)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


class CheckpointRegions:
    """The checkpointing half of an ``exchange``, the same for the halo exchange and the ghost
    baseline: ``chunks``, ``checkpoint`` and ``checkpoint_modules``. ``_bind`` is the
    communicator's record/replay context (None: no collectives to replay)."""

    _bind: Callable[[Replay], Any] | None = None

    def _init_checkpointing(self, checkpoint: bool | int) -> None:
        self.chunk_edges = chunk_edges(checkpoint)
        self.checkpointing = self.chunk_edges > 0
        self.regions = 0  # checkpoint regions run (statistics: proof that it is on)

    def chunks(self, n_edges: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` pieces of a layer's ``n_edges`` edges to compute, and
        :meth:`checkpoint`, one at a time: one piece unless checkpointing."""
        return chunks(n_edges, self.chunk_edges)

    def checkpoint(self, function, *args, **kwargs):
        """``function(*args, **kwargs)``; with ``checkpoint=True`` its activations are not kept
        but recomputed in the backward, its exchanges replayed.

        Wrap one message-passing layer (or a part of one) whose output is all that later
        layers read: its tensor inputs and outputs are what stays in memory. The region must
        be a function of its arguments (and of tensors created before it) only.
        """
        if not self.checkpointing or not torch.is_grad_enabled():
            return function(*args, **kwargs)
        self.regions += 1
        return checkpointed(function, args, kwargs, self._bind)

    def checkpoint_modules(self, modules, replace=None):
        """Context manager: every call of each module in ``modules`` is :meth:`checkpoint` ed
        (for upstream forwards that loop over their layers themselves); nothing changes
        without checkpointing. ``replace(module, forward)`` may return a function to run
        instead (e.g. in edge chunks, each checkpointed), or None for the default."""
        if not self.checkpointing:
            return patched_forwards((), None)

        def wrap(module, forward):
            custom = replace(module, forward) if replace is not None else None
            if custom is not None:
                return custom
            return lambda *args, **kwargs: self.checkpoint(forward, *args, **kwargs)

        return patched_forwards(modules, wrap)
