"""The replicated structure every worker holds, and an atom graph's edge list."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Structure:
    """The replicated description of a system: cheap O(N) arrays every worker holds.

    Attributes:
        positions: (N, 3) float64 Cartesian positions, Å.
        numbers: (N,) int64 atomic numbers.
        cell: (3, 3) float64 lattice vectors as rows, Å (rows may be zero on non-periodic axes).
        pbc: (3,) bool periodicity per lattice vector.
        system: the model's per-structure inputs (``DistributedModel.system_inputs``).
    """

    positions: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    system: dict = field(default_factory=dict)

    @classmethod
    def from_ase(cls, atoms, system: dict | None = None) -> Structure:
        return cls(
            positions=np.ascontiguousarray(atoms.get_positions(), dtype=np.float64),
            numbers=np.ascontiguousarray(atoms.get_atomic_numbers(), dtype=np.int64),
            cell=np.ascontiguousarray(atoms.get_cell().array, dtype=np.float64),
            pbc=np.asarray(atoms.get_pbc(), dtype=bool).copy(),
            system=dict(system or {}),
        )

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell)))


@dataclass(frozen=True)
class EdgeList:
    """Directed edges ``sender -> receiver`` (indices into the array the list was built from).

    Attributes:
        receivers: (E,) int64.
        senders: (E,) int64.
        shifts: (E, 3) int64 image shifts, so that v = x[senders] + shifts @ cell - x[receivers].
    """

    receivers: np.ndarray
    senders: np.ndarray
    shifts: np.ndarray

    def __len__(self) -> int:
        return len(self.receivers)
