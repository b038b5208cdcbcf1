"""Input checks that run in the calling process before any worker computes.

Each failure is one ``ValueError`` line that names the problem and what to change.
"""

from __future__ import annotations

import numpy as np
import vesin

from distmlip.graphs.structure import Structure

__all__ = ["validate_structure", "MIN_DISTANCE"]

MIN_DISTANCE = 0.1
"""Å. Closer atoms are treated as a broken structure, not as physics."""

MAX_SPAN_PER_CUTOFF = 2e4
"""Largest extent of the atoms along a non-periodic axis, in neighbour-search cutoffs."""


def _first(indices: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (", ..." if len(indices) > limit else "")


def validate_structure(structure: Structure, nprocs: int, model=None) -> None:
    """Raise ``ValueError`` if the structure cannot be evaluated as asked."""
    n = structure.n_atoms
    if n == 0:
        raise ValueError("the structure has no atoms")
    bad = np.flatnonzero(~np.isfinite(structure.positions).all(axis=1))
    if len(bad):
        raise ValueError(
            f"positions of atom(s) {_first(bad)} are NaN or infinite; fix the structure"
        )
    if not np.isfinite(structure.cell).all():
        raise ValueError("the cell contains NaN or infinite values; fix the cell")
    periodic = np.asarray(structure.pbc, dtype=bool)
    if periodic.any():
        vectors = structure.cell[periodic]
        singular = np.linalg.svd(vectors, compute_uv=False)
        if singular.min() < 1e-6 * max(singular.max(), 1.0):
            raise ValueError(
                "the cell has zero volume along its periodic directions "
                f"(pbc={periodic.tolist()}); give a full-rank cell or set pbc=False on those axes"
            )
    if nprocs > n:
        raise ValueError(
            f"nprocs={nprocs} is larger than the number of atoms ({n}); use nprocs <= {n}"
        )
    if model is not None:
        model.check_numbers(structure.numbers)
    # Along open axes the neighbour search bins the atoms' whole span; an atom far from the
    # rest makes that grid too fine for vesin (it crashes the process). Say so instead.
    spans = np.where(~periodic, np.ptp(structure.positions, axis=0), 0.0)
    span = float(spans.max())
    if model is not None and span > MAX_SPAN_PER_CUTOFF * model.cutoff:
        axis = "xyz"[int(np.argmax(spans))]
        raise ValueError(
            f"the atoms span {span:.3g} Å along the non-periodic axis {axis}, more than "
            f"{MAX_SPAN_PER_CUTOFF:g} cutoffs: an atom far from the others (an exploded "
            "run?) or a unit mix-up; fix the structure"
        )
    search = max(MIN_DISTANCE, span / MAX_SPAN_PER_CUTOFF)
    box = structure.cell if periodic.any() else np.zeros((3, 3))
    i, j, d = vesin.NeighborList(cutoff=search, full_list=False).compute(
        structure.positions, box, periodic.tolist(), quantities="ijd"
    )
    close = d < MIN_DISTANCE
    i, j, d = i[close], j[close], d[close]
    if len(i):
        k = int(np.argmin(d))
        what = "its own periodic image" if i[k] == j[k] else f"atom {int(j[k])}"
        raise ValueError(
            f"atom {int(i[k])} is {d[k]:.3g} Å from {what} (closer than {MIN_DISTANCE} Å): "
            "overlapping atoms or a too-small cell; fix the structure"
        )
