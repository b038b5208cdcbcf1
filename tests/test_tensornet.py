"""The TensorNet adapter against matgl's own single-process ``PESCalculator``.

A seeded random-weight TensorNet inside a ``Potential`` (data scaling and elemental references
included), float64. Upstream builds its graph geometry in ``matgl.float_th`` (float32 by
default); the float64 reference sets it to float64, as ``upstream64`` does for CHGNet.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("MATGL_BACKEND", "PYG")

import matgl  # noqa: E402  (a declared test dependency: a broken install fails)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402
from conftest import (  # noqa: E402
    UPSTREAM_MATRIX,
    PoolCache,
    assert_matches_upstream,
    ethanol,
    relative_error,
    small_cell,
    surface_slab,
)

from distmlip import DistributedCalculator  # noqa: E402
from distmlip.models import resolve_model  # noqa: E402
from distmlip.models.tensornet import TensorNetAdapter  # noqa: E402

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

ELEMENTS = ("H", "C", "O", "Ni", "Cu", "Ag", "Au")
RTOL64 = 1e-11
FORCE_ATOL32 = 2e-4


def crystal(seed: int = 21) -> Atoms:
    """A strained, sheared Cu/Ni/Ag fcc crystal (32 atoms), rattled with ``seed``."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((4, 4, 2))
    atoms.set_cell(atoms.cell.array @ [[1.02, 0.04, 0], [0, 0.98, 0.03], [0, 0, 1.01]], True)
    atoms.numbers[::3] = 28
    atoms.numbers[1::5] = 47
    atoms.rattle(0.05, seed=seed)
    return atoms


def slab() -> Atoms:
    """Cu(111) with Au on top and 16 Å of vacuum, periodic on all axes.

    matgl's graph treats any structure that is not periodic along all three axes as a molecule
    (``Atoms2Graph``: ``atoms.pbc.all()``), so a (True, True, False) slab means something else
    upstream; with pbc on and the vacuum wider than the cutoff both mean the same surface.
    """
    atoms = surface_slab()
    atoms.pbc = True
    return atoms


STRUCTURES = {
    "crystal": crystal,
    "small_cell": small_cell,  # 16 atoms, the 5 Å cutoff exceeds half the cell
    "slab": slab,
    "molecule": lambda: ethanol(22),
}


def build_potential(seed: int = 0, nblocks: int = 2, **model_options):
    """A seeded random TensorNet in a Potential with scaling and elemental references."""
    from matgl.apps.pes import Potential
    from matgl.models import TensorNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        options = dict(
            units=16, nblocks=nblocks, num_rbf=8, cutoff=5.0, is_intensive=False, use_warp=False
        )
        model = TensorNet(element_types=ELEMENTS, dtype=torch.float64, **(options | model_options))
        references = -np.linspace(0.5, 4.0, len(ELEMENTS))
        # A large data_std: random weights give small per-atom terms, and forces must matter.
        potential = Potential(model=model, data_mean=0.3, data_std=80.0, element_refs=references)
    return potential.double()


def upstream(potential, dtype: str) -> dict:
    """PESCalculator results per structure; float64 geometry for the float64 reference."""
    import matgl.ext.ase as matgl_ase
    from matgl.ext.ase import PESCalculator

    # A copy: casting the shared potential to float32 and back would round its weights.
    model = copy.deepcopy(potential)
    model = model.double() if dtype == "float64" else model.float()
    previous = matgl.float_th, matgl_ase._alchmtk_available
    matgl.float_th = torch.float64 if dtype == "float64" else torch.float32
    # With nvalchemi-toolkit-ops importable (fairchem-core installs it) PESCalculator builds
    # its graph from float32 positions whatever float_th says; the reference is matgl's own
    # graph path, in the precision asked for (docs/tensornet.md).
    matgl_ase._alchmtk_available = False
    try:
        results = {}
        for name, make in STRUCTURES.items():
            atoms = make()
            atoms.calc = PESCalculator(model, stress_unit="eV/A3")
            results[name] = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
            if atoms.cell.volume > 0 and atoms.pbc.all():
                results[name]["stress"] = atoms.get_stress()
        return results
    finally:
        matgl.float_th, matgl_ase._alchmtk_available = previous


@pytest.fixture(scope="module")
def potential():
    return build_potential()


@pytest.fixture(scope="module")
def reference64(potential):
    return upstream(potential, "float64")


@pytest.fixture(scope="module")
def pools(potential):
    cache = PoolCache(TensorNetAdapter(potential))
    yield cache
    cache.close()


def evaluate(calc, name: str, keys) -> dict:
    atoms = STRUCTURES[name]()
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


def test_float32_forces(potential):
    reference = upstream(potential, "float32")
    with DistributedCalculator(
        TensorNetAdapter(potential), nprocs=3, partitioner="rcb", dtype="float32"
    ) as calc:
        for name, expected in reference.items():
            got = evaluate(calc, name, ["energy", "forces"])
            force_error = np.abs(got["forces"] - expected["forces"]).max()
            assert force_error <= FORCE_ATOL32, f"{name}: float32 forces {force_error:.2e} eV/Å"


def test_saved_directory_and_object_resolve_alike(potential, tmp_path):
    potential.save(tmp_path / "tensornet")
    for source in (potential, tmp_path / "tensornet", str(tmp_path / "tensornet")):
        adapter = resolve_model(source)
        assert isinstance(adapter, TensorNetAdapter)
        assert adapter.cutoff == 5.0 and adapter.num_layers == 3
        assert adapter.supported_numbers == frozenset({1, 6, 8, 28, 29, 47, 79})


def test_warp_model_runs_through_pyg_layers(potential, reference64):
    """matgl picks warp kernels when nvalchemi is importable: the adapter runs the same
    weights through the PyG layers, so a warp-built potential gives the PyG reference."""
    warp = build_potential(use_warp=True)
    assert warp.model._use_warp
    warp.load_state_dict(potential.state_dict())
    adapter = TensorNetAdapter(warp)
    assert warp.model._use_warp, "the user's potential must be left as it is"
    with DistributedCalculator(adapter, nprocs=2, partitioner="rcb", timeout=120) as calc:
        got = evaluate(calc, "crystal", ["energy", "forces", "stress"])
    for key, value in reference64["crystal"].items():
        assert relative_error(got[key], value) <= RTOL64, key


def test_clear_errors(potential, pools, tmp_path):
    atoms = crystal()
    atoms.numbers[0] = 26  # Fe: not in the model
    with pytest.raises(ValueError, match="Fe"):
        pools.get(2, "slab").get_properties(["energy"], atoms)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="not a saved matgl model"):
        resolve_model(not_a_model)
    with pytest.raises(TypeError, match="Potential wrapping a TensorNet"):
        TensorNetAdapter(torch.nn.Linear(2, 2))
    intensive = build_potential(is_intensive=True)
    with pytest.raises(NotImplementedError, match="is_intensive=False"):
        TensorNetAdapter(intensive)


def test_missing_matgl_is_one_clear_error(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    saved.mkdir()
    monkeypatch.setitem(__import__("sys").modules, "matgl", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs matgl: pip install 'distmlip\[tensornet\]'"):
        resolve_model(saved)
