"""A worker's side of positions-only requests (:mod:`distmlip.driver.sender`): the last complete
structure it received, from which a :class:`~distmlip.messages.Moved` is completed."""

from __future__ import annotations

from dataclasses import replace

from distmlip.graphs.structure import Structure
from distmlip.messages import Moved, StaleBase


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
