"""Structures large enough that a worker holds only part of them, and how much it holds.

On the small systems of conftest every worker's neighbour-search region is the whole structure
and its halo most of what it does not own, so code that confines a worker to its region, picks
its halo or masks its neighbours can be wrong without any test noticing. These structures have
a few thousand atoms and cells of at least four cutoffs along every periodic axis: at P >= 4
each worker searches, holds and exchanges a minority of the atoms.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron

from distmlip.graphs.neighbors import neighborhood_mask
from distmlip.graphs.structure import Structure

CUTOFF = 4.0
"""Å: the locality tests' reference model cutoff (cells span >= 4 of it per periodic axis)."""


def amorphous() -> Atoms:
    """2,048 atoms of fcc Cu/Ni/Ag (28.9 Å cube) rattled by 0.35 Å: no crystal order left
    at the scale of the cutoff, three species in random places."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(8)
    rng = np.random.default_rng(11)
    atoms.numbers = rng.choice([29, 28, 47], size=len(atoms), p=[0.6, 0.3, 0.1])
    atoms.rattle(0.35, seed=11)
    return atoms


def gas() -> Atoms:
    """1,500 atoms at random in a sheared 30 × 27 × 24 Å cell (0.08 atoms/Å³, a liquid's
    density but no structure), fractional coordinates in [−0.3, 1.3): atoms outside the cell
    and pairs at every distance, where neighbour-search binning meets the cutoff awkwardly."""
    cell = np.array([[30.0, 0.0, 0.0], [6.5, 27.0, 0.0], [-4.0, 5.5, 24.0]])
    rng = np.random.default_rng(12)
    positions = rng.uniform(-0.3, 1.3, size=(1500, 3)) @ cell
    numbers = rng.choice([29, 28], size=1500)
    return Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)


def vacuum_slab() -> Atoms:
    """Cu(111), 10 × 10 × 16 layers (1,600 atoms, 25.5 Å wide), 12 Å of vacuum on each side,
    pbc (True, True, False), rattled by 0.15 Å."""
    atoms = fcc111("Cu", size=(10, 10, 16), vacuum=12.0)
    atoms.numbers[::7] = 79
    atoms.rattle(0.15, seed=13)
    return atoms


def skewed() -> Atoms:
    """1,792 atoms in a strongly skewed triclinic cell (angles far from 90°), strained,
    rattled by 0.12 Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 7))
    shear = np.array([[1.0, 0.0, 0.0], [0.55, 0.95, 0.0], [-0.45, 0.35, 1.05]])
    atoms.set_cell(shear @ atoms.cell.array, scale_atoms=True)
    atoms.numbers[::4] = 28
    atoms.rattle(0.12, seed=14)
    return atoms


def nanoparticle() -> Atoms:
    """A 1,415-atom Cu icosahedron (about 33 Å across) in 8 Å of vacuum, no periodicity."""
    atoms = Icosahedron("Cu", noshells=8)
    atoms.center(vacuum=8.0)
    atoms.pbc = False
    atoms.numbers[::6] = 46
    atoms.rattle(0.1, seed=15)
    return atoms


LARGE = {
    "amorphous": amorphous,
    "gas": gas,
    "vacuum_slab": vacuum_slab,
    "skewed": skewed,
    "nanoparticle": nanoparticle,
}


def fractions(atoms: Atoms, owners: np.ndarray, stats: list[dict], cutoff: float) -> dict:
    """What each worker of a call held, as fractions of the structure.

    Args:
        atoms: the structure evaluated.
        owners: (N,) the rank that owned each atom (``calc.last_owners``).
        stats: per-worker ``calc.last_stats`` of the call (``owned_atoms``, ``halo_atoms``).
        cutoff: Å, the graph's cutoff.
    Returns:
        ``region``: (P,) atoms in each worker's neighbour-search region / N; ``halo``: (P,) halo
        atoms / atoms the worker does not own; ``owned``: (P,) owned / N.
    """
    structure = Structure.from_ase(atoms)
    n = len(atoms)
    region, halo, owned = [], [], []
    for rank, record in enumerate(stats):
        mine = owners == rank
        assert record["owned_atoms"] == mine.sum()
        mask = neighborhood_mask(structure.positions, structure.cell, structure.pbc, mine, cutoff)
        region.append(mask.sum() / n)
        halo.append(record["halo_atoms"] / max(n - record["owned_atoms"], 1))
        owned.append(record["owned_atoms"] / n)
    return {"region": np.array(region), "halo": np.array(halo), "owned": np.array(owned)}


def main() -> None:
    """Print, per structure, P and partitioner, the largest and mean search region and the
    largest halo of the workers (docs/design.md's exactness matrix):
    ``python tests/locality.py``."""
    from distmlip.graphs.halo import build_local_graph
    from distmlip.graphs.partition import partition

    for name, make in LARGE.items():
        atoms = make()
        structure = Structure.from_ase(atoms)
        for nparts in (4, 6, 8):
            for method in ("slab", "rcb", "metis"):
                owners = partition(structure, nparts, method, CUTOFF)
                stats = []
                for rank in range(nparts):
                    graph = build_local_graph(structure, owners, rank, nparts, CUTOFF)
                    stats.append({"owned_atoms": graph.n_owned, "halo_atoms": graph.n_halo})
                share = fractions(atoms, owners, stats, CUTOFF)
                print(
                    f"{name:12s} {len(atoms):5d}  P={nparts} {method:5s}  region max "
                    f"{share['region'].max():.2f} mean {share['region'].mean():.2f}  "
                    f"halo max {share['halo'].max():.2f}"
                )


if __name__ == "__main__":
    main()
