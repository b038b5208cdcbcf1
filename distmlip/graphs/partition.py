"""Partitioners: assign every atom an owner rank, ``owner[i] in {0..P-1}``.

* ``slab`` — the DistMLIP "vertical" rule with equal *atom counts*: sort atoms along the widest
  lattice direction (largest spacing between lattice planes) and cut into P contiguous slabs.
* ``rcb`` — recursive coordinate bisection: split the widest extent of each group in proportion
  to the ranks it gets; compact regions and smaller halos at large P.
* ``metis`` — pymetis (METIS k-way) on the atom graph; needs the optional ``pymetis`` extra.

All are deterministic functions of the structure, so every rank that calls one gets the same answer.
Nothing here requires slabs to be thicker than the cutoff: halos may span several partitions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distmlip.graphs.neighbors import binning_frame, neighbor_list
from distmlip.graphs.structure import Structure

__all__ = ["PARTITIONERS", "partition", "partition_coordinates", "check_partitioner"]


def partition_coordinates(structure: Structure) -> np.ndarray:
    """(N, 3) coordinates in Å along the frame axes, wrapped into the cell on periodic axes.

    Fractional coordinates times the lattice-plane spacing, so distances along each axis are in Å
    and a periodic image never lands in a different partition from its atom.
    """
    frame = binning_frame(structure.cell, structure.pbc)
    reciprocal = np.linalg.inv(frame)
    fractional = structure.positions @ reciprocal
    periodic = np.asarray(structure.pbc, dtype=bool)
    fractional[:, periodic] -= np.floor(fractional[:, periodic])
    spacing = 1.0 / np.linalg.norm(reciprocal, axis=0)
    return fractional * spacing


def _extent(coordinates: np.ndarray, structure: Structure) -> np.ndarray:
    """Width of the system along each axis: the lattice-plane spacing on periodic axes."""
    width = np.ptp(coordinates, axis=0) if len(coordinates) else np.zeros(3)
    if structure.pbc.any():
        frame = binning_frame(structure.cell, structure.pbc)
        spacing = 1.0 / np.linalg.norm(np.linalg.inv(frame), axis=0)
        width = np.where(structure.pbc, spacing, width)
    return width


def _split_sorted(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(order, np.cumsum(sizes)[:-1])


def slab_partition(structure: Structure, nparts: int) -> np.ndarray:
    """P slabs of equal atom count (±1) stacked along the widest lattice direction."""
    coordinates = partition_coordinates(structure)
    axis = int(np.argmax(_extent(coordinates, structure)))
    order = np.lexsort((np.arange(structure.n_atoms), coordinates[:, axis]))
    owner = np.empty(structure.n_atoms, dtype=np.int64)
    for rank, members in enumerate(np.array_split(order, nparts)):
        owner[members] = rank
    return owner


def rcb_partition(structure: Structure, nparts: int) -> np.ndarray:
    """Recursive coordinate bisection into ``nparts`` groups of near-equal atom count.

    Each group of atoms destined for k ranks is cut along its widest extent into groups for
    floor(k/2) and k - floor(k/2) ranks, with atom counts in the same ratio.
    """
    coordinates = partition_coordinates(structure)
    owner = np.empty(structure.n_atoms, dtype=np.int64)
    # Work list of (atom indices, first rank, number of ranks); loops over groups, not atoms.
    groups = [(np.arange(structure.n_atoms), 0, nparts)]
    while groups:
        members, first, count = groups.pop()
        if count == 1:
            owner[members] = first
            continue
        local = coordinates[members]
        axis = int(np.argmax(np.ptp(local, axis=0))) if len(members) else 0
        left_ranks = count // 2
        n_left = int(round(len(members) * left_ranks / count))
        order = members[np.lexsort((members, local[:, axis]))]
        groups.append((order[:n_left], first, left_ranks))
        groups.append((order[n_left:], first + left_ranks, count - left_ranks))
    return owner


def metis_partition(structure: Structure, nparts: int, cutoff: float) -> np.ndarray:
    """METIS k-way partition of the undirected atom graph (edges within ``cutoff``)."""
    check_partitioner("metis")
    import pymetis

    if nparts == 1:
        return np.zeros(structure.n_atoms, dtype=np.int64)
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    # METIS wants a simple symmetric graph: drop self-images and duplicate image pairs.
    keep = edges.receivers != edges.senders
    # One int64 key per pair: a 1-D unique is several times faster than unique(axis=0).
    keys = np.unique(edges.receivers[keep] * structure.n_atoms + edges.senders[keep])
    receivers, senders = np.divmod(keys, structure.n_atoms)
    xadj = np.concatenate([[0], np.cumsum(np.bincount(receivers, minlength=structure.n_atoms))])
    adjacency = pymetis.CSRAdjacency(adj_starts=xadj, adjacent=senders)
    _, membership = pymetis.part_graph(nparts, adjacency=adjacency)
    return np.asarray(membership, dtype=np.int64)


PARTITIONERS: dict[str, Callable[..., np.ndarray]] = {
    "slab": slab_partition,
    "rcb": rcb_partition,
    "metis": metis_partition,
}


def check_partitioner(name: str) -> None:
    """Refuse an unknown partitioner, or ``metis`` without pymetis installed."""
    if not isinstance(name, str) or name not in PARTITIONERS:
        raise ValueError(
            f"unknown partitioner {name!r}; choose one of {', '.join(sorted(PARTITIONERS))}"
        )
    if name == "metis":
        try:
            import pymetis  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "partitioner='metis' needs pymetis: pip install 'distmlip[metis]' "
                "(or use partitioner='rcb')"
            ) from error


def partition(structure: Structure, nparts: int, method: str = "slab", cutoff: float = 5.0):
    """Owner rank of every atom: (N,) int64 in [0, nparts).

    Args:
        structure: the system.
        nparts: number of partitions P ≥ 1 (P ≤ N; partitions may still be empty for metis).
        method: ``slab``, ``rcb`` or ``metis``.
        cutoff: graph cutoff in Å (used by ``metis`` only).
    """
    check_partitioner(method)
    if nparts < 1:
        raise ValueError(f"the number of partitions must be at least 1, got {nparts}")
    if nparts > structure.n_atoms:
        raise ValueError(
            f"cannot split {structure.n_atoms} atoms into {nparts} partitions; "
            f"use nprocs <= {structure.n_atoms}"
        )
    if method == "metis":
        return metis_partition(structure, nparts, cutoff)
    return PARTITIONERS[method](structure, nparts)
