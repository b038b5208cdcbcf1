"""The CHGNet adapter against upstream ``chgnet`` (``CHGNetCalculator``), single process.

One pretrained model is loaded per module; the upstream reference of each structure is computed
once; each (P, partitioner) calculator is started once and evaluates every structure.
"""

from __future__ import annotations

import copy

# A declared test dependency: a broken install must fail, not skip.
import chgnet  # noqa: F401
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, fcc111, molecule
from conftest import relative_error

from distmlip import DistributedCalculator
from distmlip.models import resolve_model
from distmlip.models.chgnet import CHGNetAdapter, build_bond_graph

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

GPA = units.GPa  # eV/Å³ per GPa

FLOAT32_TOLERANCES = {
    # energy and per-atom energies eV/atom, forces eV/Å (max abs), stress GPa, magmoms μB
    "energy": 1e-5,
    "energies": 1e-4,
    "forces": 2e-4,
    "stress": 1e-3,
    "magmoms": 1e-4,
}
RTOL64 = 1e-11
"""float64: max |distributed − upstream| / max |upstream| per property (measured: ≤ 5e-13)."""
PROPERTIES = ["energy", "energies", "forces", "stress", "magmoms"]


def crystal() -> Atoms:
    """Rock-salt MgO 2×2×2 conventional (64 atoms) with Fe, Ni, Li on Mg sites and F on O."""
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat(2)
    atoms.numbers[[0, 10, 20]] = [26, 28, 3]
    atoms.numbers[[1, 33]] = [9, 9]
    atoms.rattle(0.03, seed=11)
    return atoms


def small_cell() -> Atoms:
    """fcc Cu primitive ×(1,1,4): 4 atoms, two 2.55 Å lattice vectors (< 2×6 Å and < 3 Å, so
    atoms bond to their own periodic images in both the atom and the bond graph)."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((1, 1, 4))
    atoms.numbers[1] = 30
    atoms.rattle(0.05, seed=12)
    return atoms


def silicon_cell() -> Atoms:
    """Strained cubic Si, 8 atoms in a 5.4 Å cell, Ge substituted."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.set_cell(
        atoms.cell.array @ np.array([[1.02, 0.03, 0], [0, 0.99, 0.02], [0, 0, 1.0]]),
        scale_atoms=True,
    )
    atoms.numbers[3] = 32
    atoms.rattle(0.05, seed=13)
    return atoms


def slab() -> Atoms:
    """Pt(111) 3×3×3 slab with 8 Å vacuum and an O adatom, pbc (True, True, False)."""
    atoms = fcc111("Pt", size=(3, 3, 3), vacuum=8.0)
    top = atoms.positions[atoms.positions[:, 2].argmax()]
    atoms += Atoms("O", positions=[top + [0.0, 0.0, 1.9]])
    atoms.rattle(0.03, seed=14)
    return atoms


def rattled() -> Atoms:
    """SrTiO3 2×2×2 (40 atoms), strongly rattled."""
    atoms = Atoms(
        "SrTiO3",
        scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
        cell=np.eye(3) * 3.905,
        pbc=True,
    ).repeat(2)
    atoms.rattle(0.15, seed=15)
    return atoms


def sparse() -> Atoms:
    """Simple cubic Cu at 3.2 Å: no bond shorter than 3 Å, so no angle anywhere."""
    atoms = Atoms("Cu", cell=np.eye(3) * 3.2, pbc=True).repeat(2)
    atoms.numbers[0] = 29
    atoms.rattle(0.02, seed=16)
    return atoms


def cluster() -> Atoms:
    """Ethanol plus a lone O atom 9 Å away (an isolated atom), no periodicity."""
    atoms = molecule("CH3CH2OH")
    atoms += Atoms("O", positions=[[9.0, 0.0, 0.0]])
    atoms.center(vacuum=7.0)
    atoms.pbc = False
    return atoms


FLOAT64_STRUCTURES = ("crystal", "small_cell", "slab", "cluster")

STRUCTURES = {
    "crystal": crystal,
    "small_cell": small_cell,
    "silicon_cell": silicon_cell,
    "slab": slab,
    "rattled": rattled,
    "cluster": cluster,
}


def _upstream(chgnet_model, atoms: Atoms) -> dict:
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.io.ase import AseAtomsAdaptor

    atoms = atoms.copy()
    atoms.calc = CHGNetCalculator(chgnet_model, use_device="cpu", on_isolated_atoms="ignore")
    # Per-atom energies: upstream's own site energies (its calculator does not return them).
    sites = chgnet_model.predict_structure(
        AseAtomsAdaptor.get_structure(atoms), task="e", return_site_energies=True
    )["site_energies"]
    return {
        "energy": atoms.get_potential_energy(),
        "energies": np.asarray(sites, dtype=np.float64),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(),
        "magmoms": atoms.get_magnetic_moments(),
    }


@pytest.fixture(scope="module")
def adapter() -> CHGNetAdapter:
    return resolve_model("chgnet")


@pytest.fixture(scope="module")
def upstream32(adapter) -> dict:
    return {name: _upstream(adapter.model, build()) for name, build in STRUCTURES.items()}


@pytest.fixture(scope="module")
def upstream64(adapter) -> dict:
    return upstream_float64(adapter)


def upstream_float64(adapter, names=FLOAT64_STRUCTURES) -> dict:
    """Upstream CHGNet in float64: the model, its graph geometry and its AtomRef in float64."""
    import torch
    from chgnet.graph import converter
    from chgnet.model import model as model_module

    model = copy.deepcopy(adapter.model).double()
    composition = model.composition_model

    def composition_features(graphs):  # upstream casts these to float32
        rows = []
        for graph in graphs:
            counts = torch.bincount(graph.atomic_number - 1, minlength=composition.max_num_elements)
            rows.append(counts.double() / (len(graph.atomic_number) if model.is_intensive else 1))
        return torch.stack(rows)

    composition._assemble_graphs = composition_features
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(converter, "TORCH_DTYPE", torch.float64)
        patch.setattr(model_module, "TORCH_DTYPE", torch.float64)
        return {name: _upstream(model, STRUCTURES[name]()) for name in names}


def _evaluate(calc, atoms: Atoms) -> dict:
    atoms = atoms.copy()
    return calc.get_properties(PROPERTIES, atoms)


def _compare_float32(calc, reference: dict) -> None:
    for name, expected in reference.items():
        atoms = STRUCTURES[name]()
        got = _evaluate(calc, atoms)
        n = len(atoms)
        errors = {
            "energy": abs(got["energy"] - expected["energy"]) / n,
            "energies": np.abs(got["energies"] - expected["energies"]).max(),
            "forces": np.abs(got["forces"] - expected["forces"]).max(),
            "stress": np.abs(got["stress"] - expected["stress"]).max() / GPA,
            "magmoms": np.abs(got["magmoms"] - expected["magmoms"]).max(),
        }
        for key, error in errors.items():
            bound = FLOAT32_TOLERANCES[key]
            assert error < bound, f"{name}: {key} error {error:.3g} ≥ {bound}"


def _compare_float64(calc, reference: dict, label: str) -> None:
    for name, expected in reference.items():
        atoms = STRUCTURES[name]()
        if len(atoms) < calc.nprocs:
            continue  # more workers than atoms is refused (tested in test_validate)
        got = _evaluate(calc, atoms)
        for key in PROPERTIES:
            error = relative_error(got[key], expected[key])
            assert error <= RTOL64, f"{label} {name}: {key} relative error {error:.2e}"


@pytest.mark.parametrize(
    ("nprocs", "partitioner"), [(1, "slab"), (2, "slab"), (3, "rcb"), (4, "metis")]
)
def test_float32_matches_upstream(adapter, upstream32, nprocs, partitioner):
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner=partitioner, dtype="float32"
    ) as calc:
        _compare_float32(calc, upstream32)


MATRIX = [(p, method) for p in (2, 3) for method in ("slab", "rcb", "metis")]
MATRIX += [(4, "slab"), (4, "rcb"), (8, "rcb")]
"""P and partitioners compared with upstream: every partitioner at P = 2, 3, and P = 4, 8 (the
reference model's tests run every partitioner at every P; eight model copies on two CI cores
cost half a minute per pool)."""


@pytest.mark.parametrize(
    ("nprocs", "partitioner"),
    [(1, "slab")] + MATRIX,
)
def test_float64_matches_upstream(adapter, upstream64, nprocs, partitioner):
    """Energy, per-atom energies, forces, stress and magmoms equal upstream's single process
    (float64) for every P and partitioner, to round-off."""
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner=partitioner, dtype="float64"
    ) as calc:
        _compare_float64(calc, upstream64, f"P={nprocs} {partitioner}")
        if nprocs > 1:
            assert all(stats["exchanges"] > 0 for stats in calc.last_stats)


@pytest.mark.parametrize(
    ("nprocs", "partitioner", "checkpoint"), [(1, "slab", True), (2, "rcb", 97), (3, "slab", 500)]
)
def test_checkpointed_matches_upstream(adapter, upstream64, nprocs, partitioner, checkpoint):
    """Activation checkpointing recomputes each layer in the backward, edge messages in chunks
    of ``checkpoint`` edges (an integer: several chunks on these structures): the same numbers."""
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner=partitioner, dtype="float64", checkpoint=checkpoint
    ) as calc:
        _compare_float64(calc, upstream64, f"checkpointed P={nprocs} {partitioner}")
        # Each of the 5 atom convolutions ran in chunks; bond and angle updates as regions.
        assert all(s["checkpoint_regions"] >= 5 for s in calc.last_stats)


def test_checkpointing_keeps_fewer_activations(adapter):
    from test_checkpoint import assert_checkpointing_keeps_less

    assert_checkpointing_keeps_less(copy.deepcopy(adapter), crystal(), factor=3.0, chunk=200)


def test_r2scan_matches_upstream():
    """The shipped r2SCAN-fine-tuned CHGNet loads by name and equals upstream (float64)."""
    adapter = resolve_model("chgnet-r2scan")
    assert adapter.version == "r2scan"
    reference = upstream_float64(adapter, names=("crystal", "slab"))
    with DistributedCalculator(adapter, nprocs=2, partitioner="rcb", dtype="float64") as calc:
        _compare_float64(calc, reference, "r2scan P=2 rcb")


def test_chgnet_020_with_bond_bias():
    """0.2.0 has a bias in the bond ``mlp_out``: long bonds change too, exercising that path,
    and upstream skips bond updates when a structure has no angle at all (``sparse``)."""
    adapter = resolve_model("chgnet-0.2.0")
    assert adapter.version == "0.2.0"
    structures = {"crystal": crystal, "slab": slab, "sparse": sparse}
    reference = {name: _upstream(adapter.model, build()) for name, build in structures.items()}
    with DistributedCalculator(adapter, nprocs=2, partitioner="rcb", dtype="float32") as calc:
        for name, expected in reference.items():
            atoms = structures[name]()
            atoms.calc = calc
            assert abs(atoms.get_potential_energy() - expected["energy"]) / len(atoms) < 1e-5
            assert np.abs(atoms.get_forces() - expected["forces"]).max() < 2e-4


def test_unknown_element_raises(adapter):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.numbers[0] = 95  # Am: CHGNet knows Z = 1..94
    assert adapter.supported_numbers == frozenset(range(1, 95))
    with DistributedCalculator(adapter, nprocs=1) as calc:
        atoms.calc = calc
        with pytest.raises(ValueError, match="Am"):
            atoms.get_potential_energy()


def test_resolve_model_names(adapter):
    import chgnet.model

    assert isinstance(adapter, CHGNetAdapter) and adapter.version == "0.3.0"
    assert adapter.cutoff == 6.0 and adapter.bond_cutoff == 3.0
    assert isinstance(resolve_model(adapter.model), CHGNetAdapter)
    assert isinstance(adapter.model, chgnet.model.CHGNet)
    with pytest.raises(ValueError, match="model_name"):
        resolve_model("chgnet-9.9.9")


def test_bond_graph_single_worker_counts_match_upstream(adapter):
    """With one worker the local bond graph is the whole bond graph: same bonds and angles as
    CHGNet's own graph converter (self-image bonds included)."""
    import torch
    from pymatgen.io.ase import AseAtomsAdaptor

    from distmlip.exchange import RowDeclarer
    from distmlip.exchange.comm import Communicator
    from distmlip.graphs.halo import build_all_local_graphs
    from distmlip.graphs.structure import Structure
    from distmlip.worker.engine import topology

    for name in ("small_cell", "crystal", "slab"):
        atoms = STRUCTURES[name]()
        structure = Structure.from_ase(atoms)
        (graph,) = build_all_local_graphs(
            structure, np.zeros(len(atoms), dtype=np.int64), 1, adapter.cutoff
        )
        rows = RowDeclarer(Communicator(0, 1, torch.device("cpu")))
        bonds = build_bond_graph(topology(graph, structure), rows, adapter.bond_cutoff)
        upstream = adapter.model.graph_converter(AseAtomsAdaptor.get_structure(atoms))
        assert len(graph.edges) == len(upstream.atom_graph), name
        lengths = np.linalg.norm(topology(graph, structure).vectors, axis=1)
        angle_edges = bonds.angle_edges[lengths[bonds.angle_edges[:, 1]] < adapter.bond_cutoff]
        assert len(angle_edges) == len(upstream.bond_graph), name
        n_short_upstream = len(np.unique(upstream.bond_graph[:, 1].numpy()))
        assert bonds.n_short >= n_short_upstream, name  # bonds without partners have no angle
        assert rows.plans["bonds"].n_owned == bonds.n_short


def test_skin_reuse_prepares_bonds_once_per_build_and_stays_exact(adapter):
    """MD-like random walks with a 0.6 Å skin: every step equals a fresh single-process
    evaluation (float64), although bonds cross CHGNet's 3 Å bond cutoff (MgO's O–O pairs sit at
    2.98 Å) while graphs are reused; the bond graph is prepared once per graph build."""
    from conftest import evaluate, trajectory

    walks = {
        "crystal": trajectory(crystal(), steps=8, step_size=0.07, seed=21),
        "small_cell": trajectory(small_cell(), steps=6, step_size=0.07, seed=22),
    }
    with DistributedCalculator(adapter, nprocs=1, dtype="float64") as single:
        expected = {name: [evaluate(single, a) for a in walk] for name, walk in walks.items()}
    crossings = 0
    with DistributedCalculator(
        adapter, nprocs=3, partitioner="rcb", dtype="float64", skin=0.6
    ) as calc:
        prepared = 0
        for name, walk in walks.items():
            for step, atoms in enumerate(walk):
                got = evaluate(calc, atoms)
                reference = expected[name][step]
                assert abs(got["energy"] - reference["energy"]) < 1e-9 * len(atoms), (name, step)
                assert np.abs(got["forces"] - reference["forces"]).max() < 1e-9, (name, step)
                assert np.abs(got["stress"] - reference["stress"]).max() < 1e-11, (name, step)
                flags = {stats["prepared"] for stats in calc.last_stats}
                assert len(flags) == 1, "workers disagree on preparing"
                prepared += flags.pop()
            distances = [a.get_all_distances(mic=True) for a in walk]
            below = [(d > 0) & (d <= adapter.bond_cutoff) for d in distances]
            crossings += sum(int((b != below[0]).sum()) for b in below[1:])
        assert prepared == calc.graph_builds
        assert calc.graph_reuses >= 6
    assert crossings > 0, "no bond crossed the bond cutoff: the test shows nothing"


def test_refusals(adapter):
    """Models the distributed path cannot run are refused with a message saying why."""
    import torch

    with pytest.raises(TypeError, match="expected a chgnet.model.CHGNet"):
        CHGNetAdapter(torch.nn.Linear(2, 2))
    pooled = copy.deepcopy(adapter.model)
    pooled.mlp_first = False
    with pytest.raises(NotImplementedError, match="mlp_first=False"):
        CHGNetAdapter(pooled)
    other_composition = copy.deepcopy(adapter.model)
    other_composition.composition_model = torch.nn.Linear(94, 1)
    with pytest.raises(NotImplementedError, match="composition model Linear"):
        CHGNetAdapter(other_composition)
