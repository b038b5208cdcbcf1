"""The eSEN adapter against fairchem's own single-process ``FAIRChemCalculator``.

A seeded random-weight eSEN (``eSCNMDBackbone`` + ``MLP_EFS_Head``, 2 blocks, lmax 2) saved as
a fairchem inference checkpoint and loaded by fairchem's ``load_predict_unit``, with an energy
normaliser and element references. float64 on both sides (fairchem's
``base_precision_dtype``).
"""

from __future__ import annotations

import sys

import fairchem.core  # noqa: F401  (a declared test dependency: a broken install fails)
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import (
    UPSTREAM_MATRIX,
    PoolCache,
    assert_matches_upstream,
    ethanol,
    relative_error,
    small_cell,
    surface_slab,
)
from fairchem_models import (
    TASK,
    direct_config,
    direct_tasks_config,
    esen_config,
    predict_unit,
    tasks_config,
    uma_config,
    uma_tasks_config,
    write_esen_checkpoint,
)

from distmlip import DistributedCalculator
from distmlip.models import resolve_model
from distmlip.models.fairchem import ESENAdapter, is_fairchem_checkpoint

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

RTOL64 = 1e-11
FORCE_ATOL32 = 2e-4


def crystal() -> Atoms:
    """A strained, sheared Cu/Ni/O/Ag fcc crystal (32 atoms), rattled."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((4, 4, 2))
    atoms.set_cell(atoms.cell.array @ [[1.02, 0.04, 0], [0, 0.98, 0.03], [0, 0, 1.01]], True)
    atoms.numbers[::3] = 28
    atoms.numbers[1::5] = 47
    atoms.numbers[2::7] = 8
    atoms.rattle(0.05, seed=31)
    return atoms


STRUCTURES = {
    "crystal": crystal,
    "small_cell": small_cell,  # 16 atoms, the 5 Å cutoff exceeds half the cell
    "slab": surface_slab,  # Cu(111)/Au, pbc (True, True, False)
    "molecule": lambda: ethanol(32),
}


def upstream(unit, name: str, info: dict | None = None, task: str = TASK) -> dict:
    """FAIRChemCalculator's energy, forces and (for a cell with volume) stress."""
    from fairchem.core import FAIRChemCalculator

    atoms = STRUCTURES[name]()
    atoms.info.update(info or {})
    atoms.calc = FAIRChemCalculator(unit, task_name=task)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.any() and "stress" in atoms.calc.implemented_properties:
        results["stress"] = atoms.get_stress()
    return results


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_esen_checkpoint(tmp_path_factory.mktemp("esen") / "esen.pt")


@pytest.fixture(scope="module")
def reference64(checkpoint):
    unit = predict_unit(checkpoint, "float64")
    return {name: upstream(unit, name) for name in STRUCTURES}


@pytest.fixture(scope="module")
def adapter(checkpoint):
    return ESENAdapter(checkpoint)


@pytest.fixture(scope="module")
def pools(adapter):
    cache = PoolCache(adapter)
    yield cache
    cache.close()


def evaluate(calc, name: str, keys, info: dict | None = None) -> dict:
    atoms = STRUCTURES[name]()
    atoms.info.update(info or {})
    return calc.get_properties(list(keys), atoms)


@pytest.mark.parametrize(
    ("nprocs", "partitioner"),
    UPSTREAM_MATRIX,
)
def test_float64_matches_upstream(pools, reference64, nprocs, partitioner):
    calc = pools.get(nprocs, partitioner)
    assert_matches_upstream(calc, reference64, evaluate, RTOL64, f"P={nprocs} {partitioner}")
    if nprocs > 1:
        evaluate(calc, "crystal", ["energy"])
        assert all(stats["exchanges"] > 0 for stats in calc.last_stats)
    forces = reference64["crystal"]["forces"]
    assert np.abs(forces).max() > 1e-2, "forces too small to show anything"


def test_checkpointed_matches_upstream(pools, reference64):
    calc = pools.get(3, "rcb", checkpoint=True)
    assert_matches_upstream(calc, reference64, evaluate, RTOL64, "checkpointed P=3 rcb")
    assert all(s["checkpoint_regions"] > 0 for s in calc.last_stats)


def test_ghost_baseline_matches_upstream(pools, reference64):
    calc = pools.get(3, "rcb", halo="ghost")
    assert_matches_upstream(calc, reference64, evaluate, RTOL64, "ghost P=3 rcb")
    assert all(stats["exchanges"] == 0 for stats in calc.last_stats)


def test_charge_and_spin_come_from_atoms_info(checkpoint, pools):
    """The charge/spin embedding enters every atom: distmlip reads atoms.info per structure,
    as FAIRChemCalculator does (a stale or default value would be a wrong energy)."""
    unit = predict_unit(checkpoint, "float64")
    calc = pools.get(2, "rcb")
    neutral = evaluate(calc, "molecule", ["energy", "forces"])
    charged_info = {"charge": 1, "spin": 2}
    expected = upstream(unit, "molecule", charged_info)
    got = evaluate(calc, "molecule", ["energy", "forces"], charged_info)
    assert abs(got["energy"] - neutral["energy"]) > 1e-6, "charge changed nothing"
    for key in ("energy", "forces"):
        assert relative_error(got[key], expected[key]) <= RTOL64, key
    with pytest.raises(ValueError, match="charge"):
        evaluate(calc, "molecule", ["energy"], {"charge": 1000})
    assert calc.get_properties(["energy"], STRUCTURES["crystal"]())["energy"] < 0  # still usable


def test_float32_forces(checkpoint):
    unit = predict_unit(checkpoint, "float32")
    with DistributedCalculator(
        ESENAdapter(checkpoint), nprocs=3, partitioner="rcb", dtype="float32", timeout=120
    ) as calc:
        for name in STRUCTURES:
            expected = upstream(unit, name)
            got = evaluate(calc, name, ["energy", "forces"])
            force_error = np.abs(got["forces"] - expected["forces"]).max()
            assert force_error <= FORCE_ATOL32, f"{name}: float32 forces {force_error:.2e} eV/Å"


def test_checkpoint_file_and_predict_unit_resolve_alike(checkpoint, reference64, monkeypatch):
    assert is_fairchem_checkpoint(checkpoint)
    monkeypatch.setenv("HOME", str(checkpoint.parent))
    home_path = f"~/{checkpoint.name}"  # expanded before the file is sniffed
    for source in (checkpoint, str(checkpoint), home_path, predict_unit(checkpoint)):
        adapter = resolve_model(source)
        assert isinstance(adapter, ESENAdapter)
        assert adapter.cutoff == 5.0 and adapter.num_layers == 3 and adapter.task_name == TASK
    # A predict unit the user built (float64) runs as the path does.
    with DistributedCalculator(predict_unit(checkpoint), nprocs=2, timeout=120) as calc:
        assert_matches_upstream(calc, reference64, evaluate, RTOL64, "predict unit P=2")
    with pytest.warns(UserWarning, match="base_precision_dtype=torch.float32"):
        ESENAdapter(predict_unit(checkpoint, "float32"))


def test_clear_errors(checkpoint, pools, tmp_path):
    atoms = crystal()
    atoms.numbers[0] = 100  # Fm: past the model's 100-entry embedding
    with pytest.raises(ValueError, match="Fm"):
        pools.get(2, "slab").get_properties(["energy"], atoms)
    with pytest.raises(ValueError, match="not one of this checkpoint's"):
        ESENAdapter(checkpoint, task_name="omol")
    with pytest.raises(TypeError, match="MLIPPredictUnit"):
        ESENAdapter(torch.nn.Linear(2, 2))
    not_fairchem = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, not_fairchem)
    assert not is_fairchem_checkpoint(not_fairchem)
    with pytest.raises(ValueError, match="not a MACE model"):
        resolve_model(not_fairchem)  # a .pt that is neither family's: MACE's loader says so
    rescaled = write_esen_checkpoint(tmp_path / "rescaled.pt", tasks=tasks_config(force_rmsd=1.0))
    with pytest.raises(NotImplementedError, match="not\\s+the energy's gradient"):
        ESENAdapter(rescaled)
    refusals = {
        "averages over atoms": (esen_config(), {"reduce": "mean"}),
        "charge/spin-balanced": (esen_config(charge_balanced_channels=[0]), None),
        "expected one MLP_EFS_Head": (esen_config(), "linear"),
    }
    for message, (config, head) in refusals.items():
        if head == "linear":
            config["heads"] = {
                "e": {"module": "fairchem.core.models.uma.escn_md.Linear_Energy_Head"}
            }
        elif head:
            config["heads"]["efs"].update(head)
        path = write_esen_checkpoint(tmp_path / "refused.pt", config=config)
        with pytest.raises(NotImplementedError, match=message):
            ESENAdapter(path)
    from fairchem.core.units.mlip_unit import load_predict_unit
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    fast = InferenceSettings(
        execution_mode="umas_fast_pytorch", merge_mole=True, activation_checkpointing=False
    )
    with pytest.raises(NotImplementedError, match="execution_mode='general'"):
        ESENAdapter(load_predict_unit(checkpoint, inference_settings=fast, device="cpu"))
    merged = load_predict_unit(
        checkpoint, inference_settings=InferenceSettings(merge_mole=True), device="cpu"
    )
    from fairchem.core import FAIRChemCalculator

    FAIRChemCalculator(merged, task_name=TASK).get_potential_energy(crystal())
    with pytest.raises(ValueError, match="merged its experts"):
        ESENAdapter(merged)


@pytest.mark.parametrize("halo", ["exchange", "ghost"])
def test_crowded_atoms_keep_the_neighbours_fairchem_keeps(tmp_path_factory, checkpoint, halo):
    """With max_neighbors=12 every atom of the crystal has too many neighbours (about 78
    within 5 Å): fairchem keeps those within its 13th nearest's squared distance + 0.01 Å²,
    and so must distmlip, on every worker (the 0.05 Å rattle splits the second shell)."""
    path = tmp_path_factory.getbasetemp() / "few.pt"
    if not path.exists():
        write_esen_checkpoint(path, config=esen_config(max_neighbors=12))
    expected = upstream(predict_unit(path, "float64"), "crystal")
    with DistributedCalculator(
        ESENAdapter(path), nprocs=2, partitioner="rcb", halo=halo, timeout=120
    ) as calc:
        got = evaluate(calc, "crystal", expected)
    for key, value in expected.items():
        assert relative_error(got[key], value) <= RTOL64, key
    all_edges = upstream(predict_unit(checkpoint), "crystal")  # the same weights, no limit
    assert abs(all_edges["energy"] - expected["energy"]) > 1e-6, "the limit changed nothing"


def test_worker_without_edges_and_a_lone_atom(checkpoint, pools):
    """Two atoms 12 Å apart: each worker has an atom and no edge (fairchem pads with an edge
    that adds nothing; so does distmlip). One isolated atom fairchem answers from a table: a
    clear error."""
    from fairchem.core import FAIRChemCalculator

    pair = Atoms("CuNi", positions=[[0, 0, 0], [12, 0, 0]], cell=[30, 20, 20], pbc=False)
    reference = pair.copy()
    reference.calc = FAIRChemCalculator(predict_unit(checkpoint), task_name=TASK)
    expected = {"energy": reference.get_potential_energy(), "forces": reference.get_forces()}
    got = pools.get(2, "slab").get_properties(["energy", "forces"], pair)
    assert relative_error(got["energy"], expected["energy"]) <= RTOL64
    assert np.abs(got["forces"]).max() == np.abs(expected["forces"]).max() == 0.0
    with pytest.raises(ValueError, match="single isolated atom"):
        pools.get(1, "slab").get_properties(["energy"], Atoms("Cu", cell=[9, 9, 9]))


def test_missing_fairchem_is_one_clear_error(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "fairchem.core.units", None)  # as if not installed
    with pytest.raises(
        ImportError, match=r"needs fairchem-core: pip install 'distmlip\[fairchem\]'"
    ):
        resolve_model(checkpoint)


# A UMA-shaped model: mixture-of-linear-experts backbone (experts mixed from the composition and
# the charge/spin/dataset embedding) and a dataset MoE head, two datasets.
UMA_CASES = {"omat": {}, "omol": {"charge": -1, "spin": 2}}


@pytest.fixture(scope="module")
def uma_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("uma") / "uma.pt"
    return write_esen_checkpoint(path, seed=1, config=uma_config(), tasks=uma_tasks_config())


@pytest.fixture(scope="module")
def uma_reference(uma_checkpoint):
    unit = predict_unit(uma_checkpoint, "float64")
    return {
        task: {name: upstream(unit, name, info, task) for name in STRUCTURES}
        for task, info in UMA_CASES.items()
    }


@pytest.mark.parametrize(
    ("task", "nprocs", "partitioner", "checkpoint"),
    [
        ("omat", 2, "slab", False),
        ("omat", 3, "rcb", False),
        ("omat", 4, "rcb", False),
        ("omol", 3, "rcb", False),
        ("omat", 3, "slab", True),  # the experts stay mixed while the blocks are recomputed
    ],
)
def test_uma_shaped_model_matches_upstream(
    uma_checkpoint, uma_reference, task, nprocs, partitioner, checkpoint
):
    adapter = ESENAdapter(uma_checkpoint, task_name=task)
    assert adapter.mixture and adapter.expert is not None
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner=partitioner, timeout=120, checkpoint=checkpoint
    ) as calc:
        for name, expected in uma_reference[task].items():
            got = evaluate(calc, name, expected, UMA_CASES[task])
            for key, value in expected.items():
                error = relative_error(got[key], value)
                assert error <= RTOL64, f"{task} P={nprocs} {partitioner} {name}: {key} {error:.2e}"
        if task == "omol":  # no charge/spin given: fairchem's omol defaults (0, spin 1)
            unit = predict_unit(uma_checkpoint, "float64")
            expected = upstream(unit, "molecule", {}, task)
            got = evaluate(calc, "molecule", expected)
            for key, value in expected.items():
                assert relative_error(got[key], value) <= RTOL64, f"omol defaults: {key}"
            assert abs(got["energy"] - uma_reference[task]["molecule"]["energy"]) > 1e-6


def test_uma_experts_follow_the_whole_structures_composition(uma_checkpoint, uma_reference):
    """The experts are mixed from the composition of the whole structure, not a worker's part:
    a composition that is off shows in the energy (so the exact match above means something)."""
    adapter = ESENAdapter(uma_checkpoint, task_name="omat")
    expected = uma_reference["omat"]["crystal"]
    with DistributedCalculator(adapter, nprocs=2, partitioner="rcb", timeout=120) as calc:
        exact = evaluate(calc, "crystal", ["energy"])["energy"]
        honest = calc.model.system_inputs
        calc.model.system_inputs = lambda atoms: dict(honest(atoms), composition=((29, 32),))
        wrong = calc.get_properties(["energy"], crystal())["energy"]
    assert relative_error(exact, expected["energy"]) <= RTOL64
    assert abs(wrong - expected["energy"]) > 1e-6 * abs(expected["energy"])


@pytest.mark.parametrize(("nprocs", "halo"), [(1, "exchange"), (3, "exchange"), (3, "ghost")])
def test_direct_force_model_matches_upstream(tmp_path_factory, nprocs, halo):
    """A direct-force eSEN: forces from its force head (with their own normaliser), no stress,
    no backward pass; as FAIRChemCalculator, which has no stress for it either."""
    from ase.calculators.calculator import PropertyNotImplementedError

    path = tmp_path_factory.getbasetemp() / "direct.pt"
    if not path.exists():
        write_esen_checkpoint(path, config=direct_config(), tasks=direct_tasks_config())
    unit = predict_unit(path, "float64")
    adapter = ESENAdapter(path)
    assert adapter.direct_forces
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner="rcb", halo=halo, timeout=120
    ) as calc:
        for name in STRUCTURES:
            expected = upstream(unit, name)
            assert "stress" not in expected
            got = evaluate(calc, name, ["energy", "forces"])
            for key, value in expected.items():
                error = relative_error(got[key], value)
                assert error <= RTOL64, f"direct P={nprocs} {halo} {name}: {key} {error:.2e}"
            assert all(timings.get("backward", 0.0) == 0.0 for timings in calc.last_timings)
        with pytest.raises(PropertyNotImplementedError, match="no stress"):
            calc.get_properties(["stress"], crystal())


def test_s2_activation_within_upstreams_own_run_to_run_spread(tmp_path):
    """fairchem draws a random roll for every edge's Wigner rotation on every call. With the
    gate activation the results do not depend on it (the 1e-11 tests above); with
    act_type="s2" they do, upstream's too: distmlip must then agree with upstream as well as
    upstream agrees with itself."""
    path = write_esen_checkpoint(tmp_path / "s2.pt", config=esen_config(act_type="s2"))
    unit = predict_unit(path, "float64")
    draws = [upstream(unit, "crystal") for _ in range(3)]
    with DistributedCalculator(ESENAdapter(path), nprocs=2, partitioner="rcb", timeout=120) as calc:
        got = evaluate(calc, "crystal", ["energy", "forces"])
    for key in ("energy", "forces"):
        spread = max(
            float(np.abs(np.asarray(a[key]) - np.asarray(b[key])).max())
            for a in draws
            for b in draws
        )
        assert spread > 0, "upstream repeated itself exactly: the roll no longer matters"
        error = float(np.abs(np.asarray(got[key]) - np.asarray(draws[0][key])).max())
        assert error <= 5 * spread, f"{key}: {error:.2e} vs upstream's own spread {spread:.2e}"


# fairchem's max_neighbors rule (fairchem/core/graph/radius_graph_pbc.py,
# get_max_neighbors_mask, enforce_max_neighbors_strictly=False, degeneracy_tolerance=0.01):
# an atom with more than max_neighbors neighbours within the cutoff keeps those whose squared
# distance is at most that of its (max_neighbors + 1)-th nearest plus 0.01 Å², so neighbours
# tied (or within 0.01 Å²) at the cap are kept together. A cap of 14 in fcc Cu (a = 3.61 Å,
# 5 Å cutoff: 12 neighbours at 2.55 Å, 6 at 3.61 Å, 24 at 4.42 Å) falls inside the second shell.
MAX_NEIGHBORS = 14
DEGENERACY_TOLERANCE = 0.01  # Å², fairchem's default


def fcc_ties(split: float = 0.0, rattle: float = 0.0, seed: int = 0) -> Atoms:
    """Cubic fcc Cu/Ni, 2×2×2 (32 atoms). ``split``: a tetragonal strain along z that moves
    the two out-of-plane second-shell neighbours ``split`` Å² further than the four in-plane
    ones (squared distance); ``rattle``: Å."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.numbers[::3] = 28
    if split:
        stretch = np.sqrt(1 + split / 3.61**2)
        atoms.set_cell(atoms.cell.array @ np.diag([1, 1, stretch]), scale_atoms=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


TIES = {
    # name: (structure, the neighbours fairchem keeps per atom)
    "exact_ties": (lambda: fcc_ties(), {18}),
    "near_ties_within": (lambda: fcc_ties(rattle=3e-4, seed=1), {18}),
    "near_ties_some_beyond": (lambda: fcc_ties(rattle=1e-3, seed=4), {15, 16, 17, 18}),
    "split_just_within": (lambda: fcc_ties(split=0.007, rattle=2e-5, seed=2), {18}),
    "split_just_beyond": (lambda: fcc_ties(split=0.013, rattle=2e-5, seed=3), {16}),
}


def max_neighbors_rule(atoms: Atoms, cutoff: float, cap: int) -> dict:
    """fairchem's rule in numpy on ASE's neighbour list: per atom the candidates within the
    cutoff, the neighbours kept, and how far (Å²) the closest squared distance lies from the
    atom's threshold (the margin rounding would have to cross to change the decision)."""
    from ase.neighborlist import neighbor_list

    centres, distances = neighbor_list("id", atoms, cutoff)
    rows = {"candidates": [], "kept": [], "margin": [], "at_cap": []}
    for atom in range(len(atoms)):
        squared = np.sort(distances[centres == atom] ** 2)
        threshold = squared[cap] + DEGENERACY_TOLERANCE if len(squared) > cap else np.inf
        rows["candidates"].append(len(squared))
        rows["kept"].append(int((squared <= threshold).sum()))
        rows["margin"].append(float(np.abs(squared - threshold).min()))
        # the squared distances tied with the (cap+1)-th within the tolerance
        rows["at_cap"].append(squared[np.abs(squared - squared[cap]) <= DEGENERACY_TOLERANCE])
    return rows


def fairchem_graph_degrees(atoms: Atoms, cutoff: float, cap: int) -> np.ndarray:
    """Edges per receiver of fairchem's own graph (``generate_graph`` as its backbone calls
    it, float64 positions)."""
    from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch
    from fairchem.core.graph.compute import generate_graph

    batch = atomicdata_list_to_batch([AtomicData.from_ase(atoms, task_name=TASK)])
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    graph = generate_graph(
        batch, cutoff=cutoff, max_neighbors=cap, enforce_max_neighbors_strictly=False,
        radius_pbc_version=2, pbc=batch.pbc,
    )  # fmt: skip
    return torch.bincount(graph["edge_index"][1], minlength=len(atoms)).numpy()


@pytest.fixture(scope="module")
def capped_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("capped") / "capped.pt"
    return write_esen_checkpoint(path, config=esen_config(max_neighbors=MAX_NEIGHBORS))


def upstream_of(unit, atoms: Atoms) -> dict:
    """FAIRChemCalculator's energy, forces and stress of ``atoms`` (periodic)."""
    from fairchem.core import FAIRChemCalculator

    atoms = atoms.copy()
    atoms.calc = FAIRChemCalculator(unit, task_name=TASK)
    return {
        "energy": atoms.get_potential_energy(),
        "forces": atoms.get_forces(),
        "stress": atoms.get_stress(),
    }


@pytest.fixture(scope="module")
def capped_reference(capped_checkpoint):
    unit = predict_unit(capped_checkpoint, "float64")
    return {name: upstream_of(unit, make()) for name, (make, _) in TIES.items()}


@pytest.mark.slow
def test_tie_crystals_bind_the_cap_as_intended(checkpoint, capped_reference):
    """The structures below test what they say: every atom has more candidates than the cap;
    the tolerance keeps more than the cap (exact and near ties) or drops neighbours just past
    it; no decision is within rounding of its threshold; fairchem's own graph keeps what this
    reading of its rule keeps; and the cap changes fairchem's energy."""
    unit = predict_unit(checkpoint, "float64")  # the same weights, max_neighbors=300
    for name, (make, kept) in TIES.items():
        atoms = make()
        rule = max_neighbors_rule(atoms, 5.0, MAX_NEIGHBORS)
        assert min(rule["candidates"]) > MAX_NEIGHBORS, f"{name}: the cap does not bind"
        assert set(rule["kept"]) == kept, f"{name}: kept {sorted(set(rule['kept']))}"
        assert max(rule["kept"]) > MAX_NEIGHBORS, f"{name}: a strict cap would keep the same"
        assert min(rule["margin"]) > 1e-6, f"{name}: a decision within rounding"
        np.testing.assert_array_equal(
            fairchem_graph_degrees(atoms, 5.0, MAX_NEIGHBORS), rule["kept"], err_msg=name
        )
        spreads = [np.ptp(at_cap) for at_cap in rule["at_cap"]]
        if name == "exact_ties":
            assert max(spreads) < 1e-9, "the unrattled crystal's shell is not exactly tied"
        else:
            assert min(spreads) > 1e-6, f"{name}: ties are exact, not near"
        uncapped = upstream_of(unit, atoms)["energy"]
        assert abs(uncapped - capped_reference[name]["energy"]) > 1e-6, f"{name}: cap inert"
    within = max_neighbors_rule(TIES["split_just_within"][0](), 5.0, MAX_NEIGHBORS)
    beyond = max_neighbors_rule(TIES["split_just_beyond"][0](), 5.0, MAX_NEIGHBORS)
    assert max(within["margin"]) < 5e-3 and max(beyond["margin"]) < 5e-3  # "just"


@pytest.mark.slow
@pytest.mark.parametrize(("nprocs", "partitioner"), [(2, "slab"), (3, "rcb")])
def test_max_neighbors_ties_match_upstream(
    capped_checkpoint, capped_reference, nprocs, partitioner
):
    """Exact and near ties at fairchem's max_neighbors cap, on every worker: distmlip keeps
    the neighbours fairchem keeps (energy, forces, stress to 1e-11 relative, float64)."""
    with DistributedCalculator(
        ESENAdapter(capped_checkpoint), nprocs=nprocs, partitioner=partitioner, timeout=120
    ) as calc:
        for name, (make, _) in TIES.items():
            expected = capped_reference[name]
            got = calc.get_properties(list(expected), make())
            assert all(stats["owned_atoms"] > 0 for stats in calc.last_stats)
            for key, value in expected.items():
                error = relative_error(got[key], value)
                assert error <= RTOL64, f"P={nprocs} {name}: {key} {error:.2e}"
