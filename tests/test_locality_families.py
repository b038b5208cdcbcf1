"""Every model family where partitioning can fail: each worker holds a minority of the atoms.

The family tests (test_chgnet.py, test_mace.py, test_tensornet.py, test_fairchem.py) use 4-64
atoms, where every worker's neighbour-search region is the whole structure: code that confines
a worker to its region, picks its halo, masks its neighbours or builds CHGNet's bond graph and
eSEN's edge data from the local part could be wrong without them noticing. Here each family
runs on a rattled, mixed-species structure of 700-1,400 atoms in a periodic cell at least
8 cutoffs long (and 3 cutoffs across), at P = 4 and P = 1, float64: energy, per-atom energies,
forces and stress of P = 4 equal P = 1 to 1e-11 relative, P = 1 equals the upstream package's
own calculator where that is affordable, and the partition did split the work (no worker
searches 75 % of the structure, no halo holds 45 % of what a worker does not own).

What each worker held at P = 4 (tests/locality.fractions; the bounds of each test sit a
little above; region: atoms in the worker's neighbour-search region / N, a cell-list superset
one bin, at least a cutoff wide, around the owned atoms; halo: halo atoms / atoms not owned):

=================  =====  ===========  ===========================  ===========================
structure          atoms  partitioner  region per worker            halo per worker
=================  =====  ===========  ===========================  ===========================
CHGNet Si/Ge/C     1,280  rcb          0.551 0.550 0.550 0.551      0.267 0.267 0.267 0.267
MACE alloy         1,300  slab         0.542 0.575 0.574 0.541      0.231 0.239 0.230 0.241
MACE (111) slab      720  slab         0.556 0.549 0.554 0.554      0.263 0.257 0.259 0.252
TensorNet oxide    1,408  metis        0.545 0.640 0.545 0.545      0.259 0.258 0.255 0.259
eSEN / UMA oxide   1,408  rcb          0.545 0.545 0.545 0.545      0.274 0.269 0.276 0.269
=================  =====  ===========  ===========================  ===========================

The long axes are 9 cell-list bins, so a quarter (2.25 bins) never lines up with the bin edges
(with 8 bins a rattled atom over an edge made a region 6 of 8 bins, 0.75). A neighbour-search
region that does not wrap around the periodic boundary fails every test here and passes the
family tests' P = 4 comparisons (checked by mutation). Worker starts dominate the cost (each
imports torch and the model's package, 7-9 CPU s): P = 6 or 8 would double it.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from conftest import relative_error
from locality import fractions

from distmlip import DistributedCalculator

pytestmark = pytest.mark.slow

RTOL64 = 1e-11
PROPERTIES = ("energy", "energies", "forces", "stress")


def mixed(atoms: Atoms, sites, numbers, weights, seed: int, rattle: float = 0.15) -> Atoms:
    """``atoms`` with the atoms of species ``sites`` replaced at random by ``numbers``
    (probabilities ``weights``), then rattled by ``rattle`` Å."""
    rng = np.random.default_rng(seed)
    chosen = atoms.numbers == sites
    atoms.numbers[chosen] = rng.choice(numbers, size=int(chosen.sum()), p=weights)
    atoms.rattle(rattle, seed=seed)
    return atoms


def run(model, structures: dict, cases, cutoff: float, evaluate, bounds) -> dict:
    """Each structure through a calculator per (P, partitioner) of ``cases`` (one pool at a
    time, closed after use); for P > 1 the fractions each worker held must stay within
    ``bounds`` = (region, halo). Returns ``{(P, partitioner): {name: results}}``."""
    results = {}
    for nprocs, partitioner in cases:
        got = results[nprocs, partitioner] = {}
        with DistributedCalculator(
            model, nprocs=nprocs, partitioner=partitioner, dtype="float64", timeout=300
        ) as calc:
            for name, make in structures.items():
                atoms = make()
                got[name] = evaluate(calc, atoms)
                if nprocs == 1:
                    continue
                assert all(s["exchanges"] > 0 for s in calc.last_stats)
                held = fractions(atoms, calc.last_owners, calc.last_stats, cutoff)
                label = f"{name} P={nprocs} {partitioner}"
                print(label, {key: np.round(value, 3) for key, value in held.items()})
                assert held["region"].max() < bounds[0], f"{label}: region {held['region']}"
                assert held["halo"].max() < bounds[1], f"{label}: halo {held['halo']}"
                assert held["owned"].min() > 0.8 / nprocs, f"{label}: owned {held['owned']}"
    return results


def get_properties(keys):
    def evaluate(calc, atoms):
        return calc.get_properties(list(keys), atoms)

    return evaluate


def assert_equal(got: dict, expected: dict, label: str) -> None:
    """Every property of ``expected`` ({name: {key: value}}) within RTOL64 in ``got``."""
    for name, values in expected.items():
        for key, value in values.items():
            error = relative_error(got[name][key], value)
            assert error <= RTOL64, f"{label} {name}: {key} relative error {error:.1e}"
        assert np.abs(values["forces"]).max() > 1e-2, f"{name}: forces too small to show much"


# CHGNet (pretrained 0.3.0): atom graph 6 Å, bond graph (angles) 3 Å.


def chgnet_silicon() -> Atoms:
    """Diamond Si 10 × 4 × 4 conventional cells (1,280 atoms, 54.3 × 21.7 × 21.7 Å: 9 × 3.6 ×
    3.6 atom-graph cutoffs), a quarter Ge and a few C, rattled by 0.15 Å: every atom has
    bonds and angles under 3 Å, and the bond graph crosses every partition boundary."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((10, 4, 4))
    return mixed(atoms, 14, [14, 32, 6], [0.7, 0.25, 0.05], seed=41)


def test_chgnet_partitioned_equals_single_process():
    """CHGNet at P = 4 (rcb) equals P = 1, magnetic moments included. P = 1 against upstream
    CHGNetCalculator is left to test_chgnet.py's small structures: upstream's float64 forces
    and stress (a double backward) would add 25 CPU s to this test (measured once on this
    structure: within 6e-14 relative on every property)."""
    from distmlip.models import resolve_model

    adapter = resolve_model("chgnet")
    keys = PROPERTIES + ("magmoms",)
    structures = {"silicon": chgnet_silicon}
    results = run(
        adapter,
        structures,
        [(1, "slab"), (4, "rcb")],
        adapter.cutoff,
        get_properties(keys),
        bounds=(0.60, 0.30),
    )
    assert_equal(results[4, "rcb"], results[1, "slab"], "P=4 rcb vs P=1")


# MACE (random weights, 2 residual interactions, L = 1, correlation 3, ZBL pair term): 5 Å.


def mace_alloy() -> Atoms:
    """fcc Cu/Ni/Ag/Au 13 × 5 × 5 conventional cells (1,300 atoms, 46.9 × 18.1 × 18.1 Å),
    rattled by 0.15 Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((13, 5, 5))
    return mixed(atoms, 29, [29, 28, 47, 79], [0.55, 0.25, 0.1, 0.1], seed=42)


def mace_slab() -> Atoms:
    """Cu(111) 18 × 8 × 5 in an orthogonal cell (720 atoms, 45.9 × 17.7 Å in plane) with Ni
    and an Au top layer, 8 Å of vacuum on each side, pbc (True, True, False), rattled by
    0.15 Å."""
    atoms = fcc111("Cu", size=(18, 8, 5), vacuum=8.0, orthogonal=True)
    atoms = mixed(atoms, 29, [29, 28], [0.8, 0.2], seed=43)
    top = atoms.positions[:, 2] > atoms.positions[:, 2].max() - 0.5
    atoms.numbers[top] = 79
    return atoms


def test_mace_partitioned_equals_single_process_and_upstream(tmp_path, monkeypatch):
    """MACE on a bulk alloy and on a vacuum slab (pbc (T, T, F)): P = 4 (slab) equals P = 1,
    and P = 1 equals MACECalculator (virial, as test_mace.py: MACE's stress divides by a
    volume of its own on a non-periodic axis)."""
    import test_mace as mace_tests
    import torch

    path = tmp_path / "mace.model"
    torch.save(mace_tests.build_model("residual_2x_L1_c3"), path)
    structures = {"alloy": mace_alloy, "slab": mace_slab}
    for name, make in structures.items():
        monkeypatch.setitem(mace_tests.STRUCTURES, name, make)
    results = run(
        str(path),
        structures,
        [(1, "slab"), (4, "slab")],
        mace_tests.R_MAX,
        lambda calc, atoms: mace_tests.distributed(calc, lambda: atoms),
        bounds=(0.62, 0.30),
    )
    assert_equal(results[4, "slab"], results[1, "slab"], "P=4 slab vs P=1")
    upstream = mace_tests.upstream(str(path), "float64", names=tuple(structures))
    assert_equal(results[1, "slab"], upstream, "P=1 vs MACECalculator")


# TensorNet (matgl, random weights, 2 blocks, 16 units, in a Potential): 5 Å.


def tensornet_oxide() -> Atoms:
    """Rock-salt NiO 11 × 4 × 4 conventional cells (1,408 atoms, 45.9 × 16.7 × 16.7 Å) with
    Cu and Ag on Ni sites, rattled by 0.15 Å."""
    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True).repeat((11, 4, 4))
    return mixed(atoms, 28, [28, 29, 47], [0.6, 0.3, 0.1], seed=44)


def test_tensornet_partitioned_equals_single_process_and_upstream(monkeypatch):
    """TensorNet at P = 4 (metis) equals P = 1, and P = 1 equals matgl's PESCalculator
    (energy, forces, stress: it has no per-atom energies)."""
    import test_tensornet as tensornet_tests

    from distmlip.models.tensornet import TensorNetAdapter

    potential = tensornet_tests.build_potential()
    structures = {"oxide": tensornet_oxide}
    results = run(
        TensorNetAdapter(potential),
        structures,
        [(1, "slab"), (4, "metis")],
        5.0,
        get_properties(PROPERTIES),
        bounds=(0.68, 0.30),
    )
    assert_equal(results[4, "metis"], results[1, "slab"], "P=4 metis vs P=1")
    monkeypatch.setattr(tensornet_tests, "STRUCTURES", structures)
    upstream = tensornet_tests.upstream(potential, "float64")
    assert_equal(results[1, "slab"], upstream, "P=1 vs PESCalculator")


# eSEN (fairchem, random weights, 2 blocks, lmax 2, 16 channels): 5 Å.


def esen_oxide() -> Atoms:
    """Rock-salt MgO 11 × 4 × 4 conventional cells (1,408 atoms, 46.3 × 16.8 × 16.8 Å) with
    Fe and Ni on Mg sites, rattled by 0.15 Å."""
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat((11, 4, 4))
    return mixed(atoms, 12, [12, 26, 28], [0.7, 0.2, 0.1], seed=45)


@pytest.mark.parametrize("shape", ["esen", "uma"])
def test_esen_partitioned_equals_single_process_and_upstream(shape, tmp_path, monkeypatch):
    """eSEN, and a UMA-shaped model (experts mixed from the composition of the whole
    structure: a worker that mixed them from its own part would be off here, where no worker
    sees the whole), at P = 4 (rcb) equal P = 1, and P = 1 equals fairchem's
    FAIRChemCalculator (energy, forces, stress)."""
    import test_fairchem as fairchem_tests
    from fairchem_models import (
        TASK,
        predict_unit,
        uma_config,
        uma_tasks_config,
        write_esen_checkpoint,
    )

    from distmlip.models.fairchem import ESENAdapter

    if shape == "uma":
        checkpoint = write_esen_checkpoint(
            tmp_path / "uma.pt", seed=1, config=uma_config(), tasks=uma_tasks_config()
        )
    else:
        checkpoint = write_esen_checkpoint(tmp_path / "esen.pt")
    adapter = ESENAdapter(checkpoint, task_name=TASK)
    assert bool(adapter.mixture) == (shape == "uma")
    structures = {"oxide": esen_oxide}
    results = run(
        adapter,
        structures,
        [(1, "slab"), (4, "rcb")],
        adapter.cutoff,
        get_properties(PROPERTIES),
        bounds=(0.60, 0.31),
    )
    assert_equal(results[4, "rcb"], results[1, "slab"], f"{shape} P=4 rcb vs P=1")
    monkeypatch.setitem(fairchem_tests.STRUCTURES, "oxide", esen_oxide)
    unit = predict_unit(checkpoint, "float64")
    upstream = {"oxide": fairchem_tests.upstream(unit, "oxide", task=TASK)}
    assert_equal(results[1, "slab"], upstream, f"{shape} P=1 vs FAIRChemCalculator")
