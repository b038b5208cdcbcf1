"""Shared test systems and worker pools.

Worker pools are expensive to start (each worker imports torch), so the tests share them:
``calculator_pool(nprocs, partitioner)`` keeps at most one distributed calculator alive and hands
it to every test that asks for the same settings in a row.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron
from hypothesis import settings

from distmlip import DistributedCalculator, ReferenceMPNN

# Property tests replay the same examples every run by default, in CI and locally, so a failure
# reproduces; `pytest --hypothesis-profile=long` explores new random examples, ten times as many.
settings.register_profile("deterministic", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("long", max_examples=1000, print_blob=True, deadline=None)
settings.load_profile("deterministic")


def examples(count: int) -> int:
    """``count`` property-test examples, scaled by the profile (× 10 under ``long``)."""
    return count * settings().max_examples // 100


def bulk_cu() -> Atoms:
    """fcc Cu 4×4×4 conventional cells (256 atoms), one atom in five Ni, rattled."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)
    atoms.numbers[::5] = 28
    atoms.rattle(0.08, seed=1)
    return atoms


def triclinic() -> Atoms:
    """A sheared, strained 4×4×4 primitive fcc cell (64 atoms), rattled."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat(4)
    strain = np.array([[1.03, 0.08, -0.05], [0.02, 0.97, 0.11], [0.06, -0.04, 1.02]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.numbers[::3] = 47
    atoms.rattle(0.1, seed=2)
    return atoms


def small_cell() -> Atoms:
    """16 atoms in a 7.2 × 7.2 × 3.6 Å cell: the 5 Å cutoff exceeds half the cell on every axis."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 1))
    atoms.rattle(0.1, seed=3)
    return atoms


def surface_slab() -> Atoms:
    """Cu(111) 3×3×5 slab with 8 Å vacuum, pbc (True, True, False)."""
    atoms = fcc111("Cu", size=(3, 3, 5), vacuum=8.0)
    atoms.numbers[-9:] = 79
    atoms.rattle(0.05, seed=4)
    return atoms


def cluster() -> Atoms:
    """A 55-atom icosahedral cluster in a box, no periodicity."""
    atoms = Icosahedron("Cu", noshells=3)
    atoms.center(vacuum=6.0)
    atoms.pbc = False
    atoms.rattle(0.05, seed=5)
    return atoms


SYSTEMS = {
    "bulk": bulk_cu,
    "triclinic": triclinic,
    "small_cell": small_cell,
    "slab": surface_slab,
    "cluster": cluster,
}


@pytest.fixture(scope="module")
def one_thread():
    """In-process evaluations on one torch thread (as each worker here): two threads on a
    shared 2-core machine spend most of their time waiting for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_model() -> ReferenceMPNN:
    return ReferenceMPNN(cutoff=5.0, num_layers=3, hidden=32, seed=0)


class PoolCache:
    """At most one live DistributedCalculator, reused while tests ask for the same settings."""

    def __init__(self, model=None):
        self.model = model
        self.key = None
        self.calc = None

    def get(
        self,
        nprocs: int,
        partitioner: str = "slab",
        dtype: str = "float64",
        halo: str = "exchange",
        model=None,
        skin: float = 0.0,
        trace: bool = False,
        checkpoint: bool = False,
    ):
        model = self.model if model is None else model
        name = id(model) if not isinstance(model, str) else model
        key = (name, nprocs, partitioner, dtype, halo, skin, trace, checkpoint)
        if key != self.key:
            self.close()
            self.calc = DistributedCalculator(
                model,
                nprocs=nprocs,
                partitioner=partitioner,
                dtype=dtype,
                halo=halo,
                timeout=120,
                skin=skin,
                trace=trace,
                checkpoint=checkpoint,
            )
            self.key = key
        return self.calc

    def close(self):
        if self.calc is not None:
            self.calc.close()
        self.calc, self.key = None, None


@pytest.fixture(scope="session")
def pools(reference_model):
    cache = PoolCache(reference_model)
    yield cache
    cache.close()


def ethanol(seed: int) -> Atoms:
    """Ethanol in a 14 Å box, not periodic, rattled by 0.02 Å."""
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.center(vacuum=5.0)
    atoms.pbc = False
    atoms.rattle(0.02, seed=seed)
    return atoms


UPSTREAM_MATRIX = (
    [(1, "slab")] + [(p, method) for p in (2, 3, 4) for method in ("slab", "rcb")] + [(3, "metis")]
)
"""(P, partitioner) of the float64 comparisons of TensorNet and eSEN with their upstream."""


def assert_matches_upstream(calc, reference: dict, evaluate, rtol: float, label: str) -> None:
    """Every property of every structure of ``reference`` ({name: {key: value}}) within
    ``rtol`` relative (``evaluate(calc, name, keys)`` gives distmlip's)."""
    for name, expected in reference.items():
        got = evaluate(calc, name, expected)
        for key, value in expected.items():
            error = relative_error(got[key], value)
            assert error <= rtol, f"{label} {name}: {key} {error:.2e}"


def relative_error(value, reference) -> float:
    """max |value − reference| / max |reference|: the bound every exactness test states."""
    value, reference = np.asarray(value), np.asarray(reference)
    return float(np.abs(value - reference).max() / max(np.abs(reference).max(), 1e-300))


def evaluate(calc, atoms: Atoms) -> dict:
    """Energy, forces, per-atom energies and (if the cell has volume) stress."""
    atoms = atoms.copy()
    atoms.calc = calc
    properties = ["energy", "forces", "energies"] + (["stress"] if atoms.cell.volume > 0 else [])
    calc.calculate(atoms, properties)
    return {key: np.array(calc.results[key], copy=True) for key in properties}


def assert_forces_are_finite_differences(calc, atoms: Atoms, indices, step: float = 1e-4) -> None:
    """The forces of ``atoms[indices]`` equal central differences of the energy (1e-6 eV/Å)."""
    forces = evaluate(calc, atoms)["forces"]
    for atom in indices:
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[atom, axis] += sign * step
                energies.append(evaluate(calc, displaced)["energy"])
            numeric = -(energies[0] - energies[1]) / (2 * step)
            assert abs(forces[atom, axis] - numeric) <= 1e-6, (atom, axis, numeric)


def trajectory(atoms: Atoms, steps: int, step_size: float, seed: int = 0) -> list[Atoms]:
    """``steps`` configurations, each atom moving ``step_size`` Å in a random direction per step
    (a random walk, so displacements since any rebuild grow as in MD)."""
    rng = np.random.default_rng(seed)
    frames = []
    atoms = atoms.copy()
    for _ in range(steps):
        direction = rng.normal(size=(len(atoms), 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        atoms.positions += step_size * direction
        frames.append(atoms.copy())
    return frames


@pytest.fixture(scope="session")
def single_process_results(reference_model):
    """The truth for every test system: the reference model evaluated by brute force in this
    process (no neighbour list, partition, halo or engine; see dense_reference.py)."""
    from dense_reference import dense_evaluate

    model = copy.deepcopy(reference_model).double().eval()
    return {name: dense_evaluate(model, make()) for name, make in SYSTEMS.items()}
