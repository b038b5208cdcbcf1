"""MACE adapter vs upstream ``mace.calculators.MACECalculator`` (single process).

Random-weight models of several shapes are saved with ``torch.save`` and loaded back through
their path, by both calculators. Float64: relative error ≤ 1e-11 on energy, per-atom energies,
forces and stress; float32: forces within 1e-4 eV/Å of upstream float32.

Cost control (CI has 2 cores): one model shape runs the full P × partitioner matrix, the other
shapes run at P = 2 only; at most one DistributedCalculator is alive at a time.
"""

from __future__ import annotations

# A declared test dependency: a broken install must fail, not skip.
import mace  # noqa: F401  (before e3nn)
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from conftest import PoolCache, cluster, relative_error, small_cell, surface_slab

from distmlip import DistributedCalculator
from distmlip.models import resolve_model
from distmlip.models.mace import MACEAdapter, load_mace_model

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

RTOL64 = 1e-11
FORCE_ATOL32 = 1e-4
ELEMENTS = (1, 6, 8, 28, 29, 47, 79)
R_MAX = 5.0


def crystal() -> Atoms:
    """A strained, sheared Cu/Ni/Ag fcc crystal, 4×4×2 primitive cells (32 atoms), rattled."""
    atoms = bulk("Cu", "fcc", a=3.61).repeat((4, 4, 2))
    strain = np.array([[1.03, 0.08, -0.05], [0.02, 0.97, 0.11], [0.06, -0.04, 1.02]])
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.numbers[::3] = 47
    atoms.numbers[1::5] = 28
    atoms.rattle(0.1, seed=2)
    return atoms


def slab() -> Atoms:
    """Cu(111) 3×3×5 slab with Au on top and 8 Å vacuum, pbc (True, True, False)."""
    return surface_slab()


def organic_molecule() -> Atoms:
    """Ethanol + benzene, 21 atoms, no cell, no periodicity."""
    atoms = molecule("CH3CH2OH")
    benzene = molecule("C6H6")
    benzene.translate([4.0, 0.5, 0.0])
    atoms += benzene
    atoms.rattle(0.02, seed=7)
    return atoms


STRUCTURES = {
    "crystal": crystal,
    "small_cell": small_cell,  # 16 atoms, the 5 Å cutoff exceeds half the cell
    "slab": slab,
    "cluster": cluster,  # 55-atom Cu icosahedron, non-periodic, in a box
    "molecule": organic_molecule,
}

# The shapes beyond the first run on these (upstream's first calls are slow: TorchScript warm-up).
OTHER_SHAPE_STRUCTURES = ("crystal", "slab", "molecule")

# name → (interaction block, num_interactions, correlation, max_ell, hidden irreps, extras)
SHAPES = {
    "residual_2x_L1_c3": (
        "RealAgnosticResidualInteractionBlock",
        2,
        3,
        2,
        "16x0e+16x1o",
        {"pair_repulsion": True},
    ),
    "plain_1x_L0_c1": ("RealAgnosticInteractionBlock", 1, 1, 1, "16x0e", {}),
    "residual_3x_L2_c2": ("RealAgnosticResidualInteractionBlock", 3, 2, 2, "8x0e+8x1o+8x2e", {}),
    "nonlinear_2x_L1_c2": (
        "RealAgnosticResidualNonLinearInteractionBlock",
        2,
        2,
        2,
        "16x0e+16x1o",
        {},
    ),
    "density_2x_L1_c3_unscaled": (
        "RealAgnosticDensityResidualInteractionBlock",
        2,
        3,
        1,
        "8x0e+8x1o",
        {"scale_shift": False},
    ),
}


def build_model(shape: str, seed: int = 0, heads: tuple[str, ...] | None = None):
    """A seeded random-weight ScaleShiftMACE (or MACE) of the given shape, float64; with
    ``heads``, a multi-head ScaleShiftMACE whose heads differ in E0s, scale and shift."""
    from e3nn import o3
    from mace import modules

    block, layers, correlation, max_ell, hidden, extras = SHAPES[shape]
    extras = dict(extras)
    scale_shift = extras.pop("scale_shift", True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kwargs = dict(
                r_max=R_MAX,
                num_bessel=6,
                num_polynomial_cutoff=5,
                max_ell=max_ell,
                interaction_cls=modules.interaction_classes[block],
                interaction_cls_first=modules.interaction_classes[block],
                num_interactions=layers,
                num_elements=len(ELEMENTS),
                hidden_irreps=o3.Irreps(hidden),
                MLP_irreps=o3.Irreps("8x0e"),
                atomic_energies=-np.linspace(0.5, 4.0, len(ELEMENTS)),
                avg_num_neighbors=12.0,
                atomic_numbers=list(ELEMENTS),
                correlation=correlation,
                gate=torch.nn.functional.silu,
                radial_MLP=[16, 16],
                **extras,
            )
            if heads:
                count = len(heads)
                kwargs["atomic_energies"] = -np.stack(
                    [np.linspace(0.5 + k, 4.0 - k, len(ELEMENTS)) for k in range(count)]
                )
                return modules.ScaleShiftMACE(
                    atomic_inter_scale=list(np.linspace(1.7, 0.9, count)),
                    atomic_inter_shift=list(np.linspace(-0.3, 0.2, count)),
                    heads=list(heads),
                    **kwargs,
                )
            if scale_shift:
                return modules.ScaleShiftMACE(
                    atomic_inter_scale=1.7, atomic_inter_shift=-0.3, **kwargs
                )
            return modules.MACE(**kwargs)
    finally:
        torch.set_default_dtype(previous)


def mace_volume(atoms: Atoms) -> float:
    """The volume MACECalculator divides its virial by.

    MACE's neighbour list replaces the cell vector of every non-periodic axis by
    (max|x| + 1)·5·r_max·ê (``mace.data.neighborhood.get_neighborhood``), and its stress uses
    that cell; distmlip divides by the volume of ``atoms.cell`` (ASE's convention, equal to a
    finite-difference strain derivative). Both agree where the cell is fully periodic.
    """
    cell = atoms.cell.array.copy()
    length = (np.abs(atoms.positions).max() + 1) * 5 * R_MAX
    for axis in range(3):
        if not atoms.pbc[axis]:
            cell[axis] = 0.0
            cell[axis, axis] = length
    return abs(np.linalg.det(cell))


def upstream(path: str, dtype: str, names=tuple(STRUCTURES)) -> dict:
    """MACECalculator results per structure (energy, energies, forces, virial σ·V)."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=path, device="cpu", default_dtype=dtype)
    results = {}
    for name in names:
        make = STRUCTURES[name]
        atoms = make()
        atoms.calc = calc
        result = {
            "energy": np.array(atoms.get_potential_energy()),
            "forces": atoms.get_forces().copy(),
            "energies": np.array(calc.results["energies"], copy=True),
        }
        if atoms.cell.volume > 0:
            result["virial"] = atoms.get_stress(voigt=False) * mace_volume(atoms)
        results[name] = result
    return results


def distributed(calc: DistributedCalculator, make) -> dict:
    atoms = make()
    atoms.calc = calc
    properties = ["energy", "forces", "energies"]
    if atoms.cell.volume > 0:
        properties.append("stress")
    calc.calculate(atoms, properties)
    result = {
        "energy": np.array(calc.results["energy"]),
        "forces": np.array(calc.results["forces"], copy=True),
        "energies": np.array(calc.results["energies"], copy=True),
    }
    if "stress" in properties:
        from ase.stress import voigt_6_to_full_3x3_stress

        result["virial"] = voigt_6_to_full_3x3_stress(calc.results["stress"]) * atoms.cell.volume
    return result


class Models:
    """Model files on disk, upstream results per (shape, dtype), and one live calculator."""

    def __init__(self, directory):
        self.directory = directory
        self.paths: dict[str, str] = {}
        self.reference: dict[tuple[str, str], dict] = {}
        self.pools = PoolCache()

    def path(self, shape: str) -> str:
        if shape not in self.paths:
            path = self.directory / f"{shape}.model"
            torch.save(build_model(shape), path)
            self.paths[shape] = str(path)
        return self.paths[shape]

    def upstream(self, shape: str, dtype: str = "float64", names=tuple(STRUCTURES)) -> dict:
        if (shape, dtype) not in self.reference:
            self.reference[shape, dtype] = upstream(self.path(shape), dtype, names)
        return self.reference[shape, dtype]

    def calculator(self, shape, nprocs, partitioner="slab", dtype="float64", halo="exchange"):
        return self.pools.get(nprocs, partitioner, dtype, halo, model=self.path(shape))

    def close(self):
        self.pools.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = Models(tmp_path_factory.mktemp("mace_models"))
    yield cache
    cache.close()


def check_float64(calc, reference, label: str, names=tuple(STRUCTURES)) -> None:
    for name in names:
        make = STRUCTURES[name]
        got = distributed(calc, make)
        expected = reference[name]
        assert set(got) == set(expected), name
        for key in expected:
            error = relative_error(got[key], expected[key])
            assert error <= RTOL64, f"{label} {name}: {key} relative error {error:.2e}"
        assert sum(s["owned_atoms"] for s in calc.last_stats) == len(make())


MATRIX = [(p, method) for p in (2, 3) for method in ("slab", "rcb", "metis")]
MATRIX += [(4, "slab"), (4, "rcb"), (8, "rcb")]
"""P and partitioners compared with upstream: every partitioner at P = 2, 3, and P = 4, 8 (the
reference model's tests run every partitioner at every P; eight model copies on two CI cores
cost half a minute per pool)."""


@pytest.mark.parametrize(
    ("nprocs", "partitioner"),
    MATRIX,
)
def test_float64_matches_upstream(models, nprocs, partitioner):
    shape = "residual_2x_L1_c3"
    calc = models.calculator(shape, nprocs, partitioner)
    check_float64(calc, models.upstream(shape), f"{shape} P={nprocs} {partitioner}")
    if nprocs > 1:
        # Zero redundancy with real halos: every worker owns atoms and exchanged features.
        stats = calc.last_stats
        assert all(s["exchanges"] > 0 for s in stats)


@pytest.mark.parametrize(
    ("shape", "nprocs", "partitioner", "checkpoint"),
    [
        ("residual_2x_L1_c3", 1, "slab", True),
        ("residual_2x_L1_c3", 2, "rcb", 97),
        ("residual_2x_L1_c3", 3, "slab", 400),
        ("plain_1x_L0_c1", 2, "slab", 67),  # the non-residual interaction, chunked
        ("nonlinear_2x_L1_c2", 2, "rcb", True),  # not chunked: whole blocks, exchange replayed
    ],
)
def test_checkpointed_matches_upstream(models, shape, nprocs, partitioner, checkpoint):
    """Each interaction recomputed in the backward, its edges in chunks of ``checkpoint``
    (an integer: several chunks here), each product block as a whole: the same numbers."""
    calc = models.pools.get(nprocs, partitioner, model=models.path(shape), checkpoint=checkpoint)
    names = tuple(STRUCTURES) if shape == "residual_2x_L1_c3" else OTHER_SHAPE_STRUCTURES
    assert shape in SHAPES
    check_float64(
        calc,
        models.upstream(shape, names=names),
        f"checkpointed {shape} P={nprocs} {partitioner}",
        names,
    )
    assert all(s["checkpoint_regions"] > 0 for s in calc.last_stats)


def test_checkpointing_keeps_fewer_activations(models):
    from test_checkpoint import assert_checkpointing_keeps_less

    model = resolve_model(models.path("residual_3x_L2_c2"))
    assert_checkpointing_keeps_less(model, crystal(), factor=3.0, chunk=200)


def test_ghost_baseline_matches_upstream(models):
    """The recomputing spatial-decomposition baseline (halo='ghost') is exact for MACE too."""
    shape = "residual_3x_L2_c2"
    calc = models.calculator(shape, 3, "slab", halo="ghost")
    check_float64(
        calc, models.upstream(shape, names=OTHER_SHAPE_STRUCTURES), "ghost", OTHER_SHAPE_STRUCTURES
    )
    assert all(s["exchanges"] == 0 for s in calc.last_stats)


def test_unknown_element_is_a_clear_error(models):
    # Two workers (the partitioner does not matter here): a pool of eight MACE copies took
    # half a minute to start on two CI cores.
    calc = models.calculator("residual_2x_L1_c3", 2, "rcb")
    atoms = small_cell()
    atoms.numbers[0] = 26  # Fe: not in the model
    atoms.calc = calc
    with pytest.raises(ValueError, match="Fe"):
        atoms.get_potential_energy()


def test_slab_stress_is_the_strain_derivative_of_the_energy(models):
    """For a cell with a non-periodic axis, stress is (1/V) ∂E/∂ε with V the volume of
    atoms.cell (docs/mace.md): central finite differences of the energy under strain."""
    calc = models.calculator("residual_2x_L1_c3", 2, "rcb")  # the pool of the test above
    atoms = slab()
    stress = distributed(calc, lambda: atoms.copy())["virial"] / atoms.cell.volume
    step = 1e-5
    for i, j in [(0, 0), (2, 2), (0, 1), (1, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * step / (1 if i == j else 2)
            strain[j, i] += 0 if i == j else sign * step / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(float(distributed(calc, lambda s=strained: s.copy())["energy"]))
        derivative = (energies[0] - energies[1]) / (2 * step) / atoms.cell.volume
        assert derivative == pytest.approx(stress[i, j], rel=1e-6, abs=1e-9), (i, j)


@pytest.mark.parametrize(
    "shape",
    ["plain_1x_L0_c1", "residual_3x_L2_c2", "nonlinear_2x_L1_c2", "density_2x_L1_c3_unscaled"],
)
def test_other_shapes_float64(models, shape):
    calc = models.calculator(shape, 2, "rcb")
    check_float64(
        calc,
        models.upstream(shape, names=OTHER_SHAPE_STRUCTURES),
        f"{shape} P=2 rcb",
        OTHER_SHAPE_STRUCTURES,
    )


def test_float32_forces(models):
    shape, nprocs, partitioner = "residual_2x_L1_c3", 3, "rcb"
    reference = models.upstream(shape, "float32")
    calc = models.calculator(shape, nprocs, partitioner, "float32")
    for name, make in STRUCTURES.items():
        got = distributed(calc, make)
        expected = reference[name]
        force_error = np.abs(got["forces"] - expected["forces"]).max()
        assert force_error <= FORCE_ATOL32, f"{name}: float32 force error {force_error:.2e} eV/Å"
        energy_error = abs(float(got["energy"]) - float(expected["energy"]))
        assert energy_error <= 1e-5 * len(make()), f"{name}: float32 energy error {energy_error}"


def test_model_instance_and_path_are_equivalent(models):
    """resolve_model accepts the model object, a str path and a Path; all give MACEAdapter."""
    from pathlib import Path

    path = models.path("plain_1x_L0_c1")
    model = load_mace_model(path)
    for source in (model, path, Path(path)):
        adapter = resolve_model(source)
        assert isinstance(adapter, MACEAdapter)
        assert adapter.cutoff == pytest.approx(R_MAX)
        assert adapter.supported_numbers == frozenset(ELEMENTS)


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nowhere.model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DistributedCalculator(missing, nprocs=2)


def test_not_a_mace_file(tmp_path):
    text = tmp_path / "notes.model"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a MACE model"):
        resolve_model(str(text))
    other = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(2, 2), other)
    with pytest.raises(ValueError, match="not a MACE energy model"):
        resolve_model(other)
    state = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match="dict"):
        resolve_model(state)


def test_head_selection(models):
    model = load_mace_model(models.path("plain_1x_L0_c1"))
    assert MACEAdapter(model).head == "Default"
    with pytest.raises(ValueError, match="no head"):
        MACEAdapter(model, head="mp_pbe")


def test_multi_head_model_evaluates_the_selected_head(tmp_path):
    """Each head of a multi-head model equals MACECalculator(head=...) (float64, P=2); without
    a head and none named 'default', the adapter refuses, as MACECalculator does."""
    from mace.calculators import MACECalculator

    path = tmp_path / "two_heads.model"
    model = build_model("plain_1x_L0_c1", heads=("pbe", "r2scan"))
    torch.save(model, path)
    with pytest.raises(ValueError, match="several heads"):
        MACEAdapter(model)
    energies = {}
    for head in ("pbe", "r2scan"):
        upstream_calc = MACECalculator(
            model_paths=str(path), device="cpu", default_dtype="float64", head=head
        )
        atoms = crystal()
        atoms.calc = upstream_calc
        expected = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        adapter = MACEAdapter(load_mace_model(path), head=head)
        with DistributedCalculator(adapter, nprocs=2, partitioner="rcb") as calc:
            got = distributed(calc, crystal)
        for key, value in expected.items():
            error = relative_error(got[key], value)
            assert error <= RTOL64, f"head {head}: {key} relative error {error:.2e}"
        energies[head] = got["energy"]
    assert abs(energies["pbe"] - energies["r2scan"]) > 1.0  # the heads really differ


def test_refusals(models, tmp_path):
    """What the distributed path cannot run is refused with a message saying what to do."""
    from types import SimpleNamespace

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="TorchScript"):
        MACEAdapter(scripted)
    compiled_file = tmp_path / "compiled.model"
    torch.jit.save(scripted, compiled_file)
    with pytest.raises(ValueError, match="TorchScript-compiled"):
        load_mace_model(compiled_file)

    with_embedding = load_mace_model(models.path("plain_1x_L0_c1"))
    with_embedding.embedding_specs = {"total_charge": {"type": "continuous"}}
    with pytest.raises(NotImplementedError, match="embedding_specs"):
        MACEAdapter(with_embedding)

    accelerated = load_mace_model(models.path("plain_1x_L0_c1"))
    accelerated.cueq_config = SimpleNamespace(enabled=True)
    try:
        import cuequivariance_torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="cuequivariance_torch"):
            MACEAdapter(accelerated)
    else:  # installed: the model is accepted
        MACEAdapter(accelerated)


def test_skin_reuse_over_a_random_walk_equals_fresh_evaluations(models):
    """MD-like steps with a 0.5 Å Verlet skin (P=3, rcb) equal fresh single-process graphs
    at every step (float64), with reuses between rebuilds."""
    from conftest import trajectory

    shape = "residual_2x_L1_c3"
    walk = trajectory(crystal(), steps=8, step_size=0.06, seed=31)
    fresh = models.calculator(shape, 1)
    expected = [distributed(fresh, lambda a=a: a.copy()) for a in walk]
    calc = models.pools.get(3, "rcb", model=models.path(shape), skin=0.5)
    builds, reuses = calc.graph_builds, calc.graph_reuses
    for step, atoms in enumerate(walk):
        got = distributed(calc, lambda a=atoms: a.copy())
        for key, value in expected[step].items():
            error = relative_error(got[key], value)
            assert error <= RTOL64, f"step {step}: {key} relative error {error:.2e}"
    assert calc.graph_reuses - reuses >= 4 and calc.graph_builds - builds >= 1
