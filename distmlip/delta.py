"""Positions-only requests: per MD step the driver sends the workers only what changed.

An MD step changes a structure's positions (and, under NPT, its cell); its species, pbc and
system inputs (``Structure.numbers``, ``pbc``, ``system``: "the rest") rarely change. The driver's
:class:`StructureSender` sends a complete structure, then, while the rest is unchanged,
:class:`Moved`: the new positions and cell and the id of the request whose structure they
amend (the *base*). Each worker's :class:`StructureStore` keeps the last complete structure it
received, with its request id, and rebuilds the complete one from it.

Why a stale structure cannot be used:

* the base is named by request id, and request ids are never reused (they only grow, also
  across worker restarts);
* the driver names a base only to the worker processes that all answered that full request
  (the base is tied to the pool's worker-process object, which every restart, failure or
  interrupted call replaces), and each worker stores every complete structure on receipt,
  before computing;
* the driver compares the rest by value with its own copy, the pickled bytes (so a caller
  mutating its arrays in place between calls is not missed), and sends the full structure
  unless the bytes are equal;
* a worker that does not hold the named base refuses the request (:class:`StaleBase`) before
  any collective; the driver then stops the workers and resends in full on fresh ones.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace

import numpy as np

from distmlip.graph import Structure

__all__ = ["Moved", "StaleBase", "StructureSender", "StructureStore", "is_stale", "resend_if_stale"]


@dataclass(frozen=True)
class Moved:
    """Request ``base``'s structure with new positions and cell (numbers, pbc, system kept)."""

    base: int
    positions: np.ndarray
    cell: np.ndarray


class StaleBase(RuntimeError):
    """A worker was asked to amend a structure it does not hold (a bug: the driver resends the
    complete structure to fresh workers)."""


def is_stale(error: BaseException) -> bool:
    """``error`` is the driver's report of a worker's :class:`StaleBase`."""
    return f"raised {StaleBase.__name__}: " in str(error)


def resend_if_stale(evaluate, structure, *args):
    """``evaluate(structure, *args)``, once more if a worker reported :class:`StaleBase` (the
    failed call stopped the workers, so the fresh ones are sent the complete structure)."""
    try:
        return evaluate(structure, *args)
    except RuntimeError as error:
        if not is_stale(error):
            raise
        return evaluate(structure, *args)


def _rest(structure: Structure) -> bytes:
    """Everything of ``structure`` but positions and cell, as bytes (equal bytes, equal rest)."""
    return pickle.dumps(
        (structure.numbers, structure.pbc, structure.system), protocol=pickle.HIGHEST_PROTOCOL
    )


class StructureSender:
    """The driver's side: what to send for a structure, and which base the workers hold."""

    def __init__(self):
        self._base: tuple[object, int, bytes] | None = None  # (workers, request id, rest)

    def message(self, structure: Structure, workers) -> tuple[Structure | Moved, bytes | None]:
        """What to send ``workers`` for ``structure``: :class:`Moved` if they hold a base with
        the same rest, else the structure; and the rest's bytes when sending it complete."""
        rest, base = _rest(structure), self._base
        if base is not None and base[0] is workers and base[2] == rest:
            return Moved(base[1], structure.positions, structure.cell), None
        return structure, rest

    def delivered(self, workers, request_id: int, rest: bytes | None) -> None:
        """Every worker of ``workers`` answered request ``request_id`` (whose rest was ``rest``,
        None if it was a :class:`Moved`): a complete structure becomes their base."""
        if rest is not None:
            self._base = (workers, request_id, rest)

    def forget(self) -> None:
        self._base = None


class StructureStore:
    """A worker's side: the last complete structure received, and its request id."""

    def __init__(self):
        self._id: int | None = None
        self._structure: Structure | None = None

    def resolve(self, request_id: int, request):
        """``request`` (an ``EvaluationRequest``) with its complete structure.

        Raises:
            StaleBase: a :class:`Moved` names another base than the one kept.
        """
        sent = request.structure
        if not isinstance(sent, Moved):
            self._id, self._structure = request_id, sent
            return request
        base = self._structure
        if base is None or sent.base != self._id:
            raise StaleBase(
                f"asked to amend the structure of request {sent.base}, but this worker holds "
                f"{'none' if base is None else f'that of request {self._id}'}"
            )
        complete = replace(base, positions=sent.positions, cell=sent.cell, system=dict(base.system))
        return replace(request, structure=complete)
