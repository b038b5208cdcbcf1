"""Carving: smaller structures cut from a target, for :mod:`distmlip.capacity`'s calibration.

Along a periodic axis on which the target repeats (a supercell: translating every atom by
``cell[axis] / n`` maps the structure onto itself, within :data:`PERIOD_TOLERANCE`), the pieces
are smaller periodic supercells of the same material, cut between lattice planes
(:func:`repeat_counts`, :func:`carve`); axes without a period (amorphous cells, open axes) are
cut open, last, which gives the pieces surfaces (fewer edges per atom). Plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distmlip.graphs.structure import Structure

__all__ = ["carve", "repeat_counts", "frame_of"]

PERIOD_TOLERANCE = 0.6
"""Å: how far an atom may be from its image under a translation for that to be a period."""
MIN_PERIOD = 1.0
"""Å: the shortest period along a cell vector that is looked for."""
SLICE = 3.0
"""Å: the thickness steps in which an axis without a period is cut."""


@dataclass
class _Frame:
    """The target in the coordinates carving needs.

    Attributes:
        frac: (N, 3) fractional coordinates, wrapped to [0, 1) on periodic axes; on open axes
            relative to the atoms' extent, in [0, 1].
        positions: (N, 3) Cartesian positions with periodic axes wrapped into the cell, Å.
        lengths: (3,) Å: the cell vector's length on periodic axes, the atoms' extent on open.
    """

    frac: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray


def frame_of(structure: Structure) -> _Frame:
    """The target in the coordinates that :func:`repeat_counts` and :func:`carve` use."""
    cell, pbc = structure.cell, np.asarray(structure.pbc, dtype=bool)
    full = cell.copy()
    for axis in np.flatnonzero(np.linalg.norm(full, axis=1) < 1e-9):
        full[axis] = np.eye(3)[axis]  # an open axis without a cell vector: Å along it
    raw = np.linalg.solve(full.T, structure.positions.T).T
    frac = raw.copy()
    frac[:, pbc] %= 1.0
    positions = structure.positions + (frac - raw) @ full
    lengths = np.linalg.norm(full, axis=1)
    for axis in np.flatnonzero(~pbc):
        low, high = frac[:, axis].min(), frac[:, axis].max()
        frac[:, axis] = (frac[:, axis] - low) / max(high - low, 1e-12)
        lengths[axis] *= high - low
    return _Frame(frac, positions, lengths)


def _wrapped_distances(structure: Structure, d: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Squared lengths of displacements ``d`` (k, 3), periodic axes wrapped (minimum image)."""
    periodic = np.asarray(structure.pbc, dtype=bool)
    d = d - np.round((d @ inverse)[:, periodic]) @ structure.cell[periodic]
    return np.einsum("ij,ij->i", d, d)


def _columns(structure: Structure, frame: _Frame, axis: int, sample, inverse) -> list:
    """Per sample atom, the atoms of its species that a translation along ``cell[axis]`` can
    bring within :data:`PERIOD_TOLERANCE` of it (only ``frac[axis]`` changes): a thin column,
    so every candidate period is checked against a few atoms, not all N."""
    others = [b for b in range(3) if b != axis]
    reach = PERIOD_TOLERANCE * np.linalg.norm(inverse, axis=0)  # |Δfrac_b| ≤ |Δx| ‖inv[:, b]‖
    columns = []
    for j in sample:
        near = structure.numbers == structure.numbers[j]
        for b in others:
            delta = frame.frac[:, b] - frame.frac[j, b]
            if structure.pbc[b]:
                delta -= np.round(delta)
            near &= np.abs(delta) <= reach[b] + 1e-9
        columns.append(np.flatnonzero(near))
    return columns


def _is_period(structure, frame, axis: int, shift: float, sample, columns, inverse) -> bool:
    """Translating every sampled atom by ``cell[axis] * shift`` lands it on an atom."""
    for j, column in zip(sample, columns, strict=True):
        d = frame.positions[column] - (frame.positions[j] + structure.cell[axis] * shift)
        if _wrapped_distances(structure, d, inverse).min() > PERIOD_TOLERANCE**2:
            return False
    return True


def repeat_counts(structure: Structure, frame: _Frame | None = None) -> list[int]:
    """Per axis, the largest n such that the structure repeats n times along it (1: none)."""
    frame = frame_of(structure) if frame is None else frame
    n_atoms = structure.n_atoms
    sample = np.linspace(0, n_atoms - 1, min(8, n_atoms)).astype(int)
    inverse = np.linalg.pinv(structure.cell)
    counts = []
    for axis in range(3):
        found = 1
        if structure.pbc[axis]:
            columns = _columns(structure, frame, axis, sample, inverse)
            limit = min(int(frame.lengths[axis] / MIN_PERIOD), n_atoms)
            for n in range(limit, 1, -1):  # n must divide the atom count
                # Every multiple of the shift must map too: a near-miss (L/7 of 6 periods, off
                # by a seventh of one) passes once but drifts further with each step.
                steps = sorted({1, 2, 3, n // 2} & set(range(1, n)))
                if n_atoms % n == 0 and all(
                    _is_period(structure, frame, axis, k / n, sample, columns, inverse)
                    for k in steps
                ):
                    found = n
                    break
        counts.append(found)
    return counts


def _cut_offset(values: np.ndarray) -> float:
    """A cut position in [0, 1) (a fraction of one period) in the widest gap between atoms."""
    ordered = np.sort(values % 1.0)
    gaps = np.diff(np.concatenate([ordered, [ordered[0] + 1.0]]))
    k = int(np.argmax(gaps))
    return float((ordered[k] + gaps[k] / 2) % 1.0)


def carve(
    structure: Structure, fraction: float, frame: _Frame | None = None, counts=None
) -> tuple[Structure, bool]:
    """A piece of ``structure`` with about ``fraction`` of its atoms (at least one unit of each
    axis); True if it is a periodic supercell of the target (cut along periods only), False if
    some axis was cut open."""
    frame = frame_of(structure) if frame is None else frame
    counts = repeat_counts(structure, frame) if counts is None else counts
    units = [
        count if count > 1 else max(1, int(length // SLICE))
        for count, length in zip(counts, frame.lengths, strict=True)
    ]
    keep = list(units)

    def kept() -> float:
        return float(np.prod([k / u for k, u in zip(keep, units, strict=True)]))

    while kept() > fraction:
        # Smaller supercells first; cut an axis open (a new surface) only where that is not
        # enough, the target's own open axes last.
        shrinkable = [a for a in range(3) if keep[a] > 1 and counts[a] > 1]
        shrinkable = shrinkable or [a for a in range(3) if keep[a] > 1 and structure.pbc[a]]
        shrinkable = shrinkable or [a for a in range(3) if keep[a] > 1]
        if not shrinkable:
            break
        # Shrink the longest side first: compact pieces have the fewest surface atoms.
        axis = max(shrinkable, key=lambda a: frame.lengths[a] * keep[a] / units[a])
        keep[axis] -= 1
    mask = np.ones(structure.n_atoms, dtype=bool)
    cell, pbc, periodic = structure.cell.copy(), np.asarray(structure.pbc).copy(), True
    for axis in range(3):
        if keep[axis] == units[axis]:
            continue
        part = keep[axis] / units[axis]
        if counts[axis] > 1:  # a smaller supercell: cut between lattice planes
            offset = _cut_offset(frame.frac[:, axis] * units[axis]) / units[axis]
            mask &= (frame.frac[:, axis] - offset) % 1.0 < part - 1e-9
            cell[axis] *= part
        else:  # cut open
            mask &= frame.frac[:, axis] <= part
            pbc[axis], periodic = False, False
    piece = Structure(
        positions=frame.positions[mask],
        numbers=structure.numbers[mask],
        cell=cell,
        pbc=pbc,
        system=dict(structure.system),
    )
    return piece, periodic and abs(piece.n_atoms - structure.n_atoms * kept()) < 0.5
