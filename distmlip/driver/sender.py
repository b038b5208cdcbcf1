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

from distmlip.graphs.structure import Structure
from distmlip.messages import Moved, is_stale

__all__ = ["StructureSender", "resend_if_stale"]


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
