"""Every rule of the Verlet-skin reuse decision, for every model family, on both skin paths.

With ``skin > 0`` a worker keeps the graph it built with ``cutoff + skin`` and reuses it (re-
selecting the edges shorter than the cutoff) until, compared with the structure it was built
for, some atom has moved ``skin / 2`` or more, or the cell, pbc, species or number of atoms
changed (``_Built.holds`` in distmlip/builders.py for the host path, ``DeviceGraph.holds`` in
distmlip/resident.py for the resident path). Per-structure inputs from ``atoms.info`` (eSEN/
UMA: charge, spin) are not part of the graph: they reach the model with every call
(``GraphInputs.system``), so a change there keeps the graph and must still change the numbers.

For every family (the reference model, pretrained CHGNet, MACE, TensorNet, eSEN; UMA for the
``atoms.info`` rule) and both paths (``resident=False``, ``resident=True`` on CPU tensors), a
sequence of frames changes one thing at a time; each frame must (a) be reused or rebuilt as
the rule says (``last_stats[...]["graph_reused"]``, ``graph_builds`` / ``graph_reuses``) and
(b) give the energy, per-atom energies, forces, stress (and CHGNet's magmoms) of a fresh
evaluation with ``skin=0`` (the workers' builder and engine at P = 1 in this process), to
1e-11 relative in float64.

One worker pool per family and path (P = 2; the reference model P = 3); the fresh references
are computed once per family and shared by both paths.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("MATGL_BACKEND", "PYG")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.neighborlist import neighbor_list  # noqa: E402
from conftest import relative_error  # noqa: E402

from distmlip import DistributedCalculator  # noqa: E402
from distmlip.calculator import assemble  # noqa: E402
from distmlip.exchange.comm import Communicator  # noqa: E402
from distmlip.graphs.structure import Structure  # noqa: E402
from distmlip.models import resolve_model  # noqa: E402
from distmlip.options import GraphOptions
from distmlip.worker.engine import call_exchange
from distmlip.worker.engine import evaluate as evaluate_graph  # noqa: E402
from distmlip.worker.main import graph_builder  # noqa: E402

RTOL = 1e-11
SKIN = 0.5
MARGIN = 0.002
"""Å: the "just under" and "just over" moves are skin/2 ∓ MARGIN from the built structure."""
CPU = torch.device("cpu")
FAMILIES = ("reference", "chgnet", "mace", "tensornet", "esen")
SAME_SYSTEM = "one atom stored a lattice vector away (the same system)"


def crystal() -> Atoms:
    """test_tensornet's strained Cu/Ni/Ag crystal (32 atoms; every family knows these elements;
    the cells are smaller than twice the cutoff), rattled with its own seed."""
    from test_tensornet import crystal as tensornet_crystal

    return tensornet_crystal(seed=41)


class Families:
    """Per family, lazily: what DistributedCalculator takes, and the float64 model the fresh
    references run in this process (as a worker casts it)."""

    def __init__(self, directory):
        self.directory = directory
        self.models: dict[str, tuple] = {}
        self.paths: dict[str, object] = {}  # the model files written (MACE, eSEN, UMA)

    def get(self, family: str):
        if family not in self.models:
            model = self._build(family)
            local = copy.deepcopy(resolve_model(model)).to(torch.float64).eval()
            for parameter in local.parameters():
                parameter.requires_grad_(False)
            self.models[family] = (model, local)
        return self.models[family]

    def _build(self, family: str):
        if family == "reference":
            from distmlip import ReferenceMPNN

            return ReferenceMPNN(cutoff=5.0, num_layers=3, hidden=32, seed=0)
        if family == "chgnet":
            return resolve_model("chgnet")
        if family == "mace":
            from test_mace import build_model

            path = self.paths[family] = self.directory / "mace.model"
            torch.save(build_model("residual_2x_L1_c3"), path)
            return str(path)
        if family == "tensornet":
            from test_tensornet import build_potential

            from distmlip.models.tensornet import TensorNetAdapter

            return TensorNetAdapter(build_potential())
        from fairchem_models import uma_config, uma_tasks_config, write_esen_checkpoint

        from distmlip.models.fairchem import ESENAdapter

        if family == "esen":
            path = self.paths[family] = self.directory / "esen.pt"
            return ESENAdapter(write_esen_checkpoint(path))
        if family == "uma":
            path = self.paths[family] = self.directory / "uma.pt"
            write_esen_checkpoint(path, seed=1, config=uma_config(), tasks=uma_tasks_config())
            return ESENAdapter(path, task_name="omol")
        raise ValueError(family)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("families"))


def properties_of(model, atoms: Atoms) -> list[str]:
    names = ["energy", "energies", "forces"]
    if atoms.cell.volume > 0 and not getattr(model, "direct_forces", False):
        names.append("stress")
    return names + list(getattr(model, "site_properties", ()))


def in_process(model, atoms: Atoms, skin: float = 0.0) -> dict:
    """``model`` (float64) on ``atoms`` by the workers' own builder and engine at P = 1 in this
    process, a new graph (``skin=0``): what a one-worker calculator computes, without a pool."""
    structure = Structure.from_ase(atoms, model.system_inputs(atoms))
    comm = Communicator(0, 1, CPU)
    call = graph_builder(model, GraphOptions("slab", skin=skin), CPU, torch.float64).get(
        structure, comm
    )
    result = evaluate_graph(model, call, call_exchange(call, comm), comm, True)
    results = assemble([result], structure.n_atoms, structure.volume)
    return {name: np.asarray(results[name]) for name in properties_of(model, atoms)}


def distributed(calc: DistributedCalculator, atoms: Atoms) -> dict:
    atoms = atoms.copy()
    atoms.calc = calc
    names = properties_of(calc.model, atoms)
    calc.calculate(atoms, names)
    return {name: np.array(calc.results[name], copy=True) for name in names}


def crossing_move(atoms: Atoms, cutoff: float, distance: float) -> tuple[int, np.ndarray]:
    """(atom, unit vector): moving the atom ``distance`` along the vector brings a neighbour
    from beyond ``cutoff`` to within it (so a reused graph must re-select its edges)."""
    i, j, d, vectors = neighbor_list("ijdD", atoms, cutoff + distance)
    candidates = np.flatnonzero((i != j) & (d > cutoff + 0.01) & (d < cutoff + distance - 0.01))
    assert len(candidates), "no pair can cross the cutoff"
    pair = candidates[np.argmin(d[candidates])]  # the deepest into the cutoff: it counts
    return int(i[pair]), vectors[pair] / d[pair]


def approaching_pair(atoms: Atoms, cutoff: float, distance: float):
    """(i, j, unit vector from i to j) of two atoms further apart than ``cutoff + skin`` that
    come within ``cutoff`` when each moves ``distance`` towards the other."""
    i, j, d, vectors = neighbor_list("ijdD", atoms, cutoff + 2 * distance)
    reach = (d > cutoff + SKIN + 0.005) & (d < cutoff + 2 * distance - 0.001)
    candidates = np.flatnonzero((i != j) & reach)
    assert len(candidates), "no pair can approach into the cutoff"
    pair = candidates[np.argmin(d[candidates])]  # the deepest into the cutoff: it counts
    return int(i[pair]), int(j[pair]), vectors[pair] / d[pair]


def rule_frames(cutoff: float) -> list[tuple[str, Atoms, bool]]:
    """(label, atoms, graph reused?) frames, each changing one thing against its predecessor
    (for a reused frame, also against the frame the kept graph was built for)."""
    base = crystal()
    under, over = SKIN / 2 - MARGIN, SKIN / 2 + MARGIN
    atom, direction = crossing_move(base, cutoff, under)
    frames = [("build", base, False)]

    def add(label, reused, change):
        atoms = frames[-1][1].copy()
        change(atoms)
        frames.append((label, atoms, reused))

    def move(atom, distance, direction):
        def change(atoms):
            atoms.positions[atom] += distance * np.asarray(direction)

        return change

    def shear(atoms):
        atoms.set_cell(atoms.cell.array @ [[1, 0, 0], [0.015, 1, 0], [0, -0.01, 1]])

    def scale(atoms):
        atoms.set_cell(atoms.cell.array * 1.003, scale_atoms=True)

    def substitute(atoms):
        atoms.numbers[5] = 79

    add(
        "one atom moved just under skin/2 (an edge crosses the cutoff)",
        True,
        move(atom, under, direction),
    )
    add(
        "just over skin/2 since the build (4 mÅ since the last frame)",
        False,
        move(atom, over - under, direction),
    )
    add(
        "another atom just under skin/2 since the new build",
        True,
        move((atom + 7) % len(base), under, [0.6, 0.0, 0.8]),
    )
    add("nothing changed", True, lambda atoms: None)
    approach = 0.45  # > skin/2 each (< skin), 0.9 > skin together
    first, second, towards = approaching_pair(frames[-1][1], cutoff, approach)

    def close_in(atoms):
        move(first, approach, towards)(atoms)
        move(second, approach, -towards)(atoms)

    add(
        "two atoms approach each other by more than the skin (an edge beyond cutoff + skin "
        "comes within the cutoff)",
        False,
        close_in,
    )
    add("pbc only: (T, T, T) -> (T, T, F)", False, lambda atoms: atoms.set_pbc((1, 1, 0)))
    add("cell only, positions fixed", False, shear)
    assert np.array_equal(frames[-1][1].positions, frames[-2][1].positions)
    add("cell and positions scaled together (each atom moved < skin/2)", False, scale)
    assert np.abs(frames[-1][1].positions - frames[-2][1].positions).max() < under / 2
    add("species of one atom only", False, substitute)
    gone = -1 if atom != len(base) - 1 else 0  # any atom but the one the last frame moves
    add("one atom fewer (the others unmoved)", False, lambda atoms: atoms.pop(gone))
    add(SAME_SYSTEM, False, move(3, 1.0, frames[-1][1].cell[0]))
    add("pbc only: (T, T, F) -> (T, T, T)", False, lambda atoms: atoms.set_pbc(True))
    add("a move just under skin/2 again", True, move(atom, under, -direction))
    return frames


def info_frames(cutoff: float) -> list[tuple[str, Atoms, bool]]:
    """UMA (omol): charge and spin from atoms.info change the energy of every atom but not
    the graph; a positions-only move keeps both working; a species change still rebuilds."""
    base = crystal()
    atom, direction = crossing_move(base, cutoff, SKIN / 2 - MARGIN)
    moved = base.copy()
    moved.positions[atom] += (SKIN / 2 - MARGIN) * direction
    substituted = moved.copy()
    substituted.numbers[5] = 79

    def with_info(atoms, **info):
        atoms = atoms.copy()
        atoms.info.update(info)
        return atoms

    return [
        ("build, fairchem's omol defaults (charge 0, spin 1)", base, False),
        ("charge and spin only", with_info(base, charge=1, spin=2), True),
        ("moved under skin/2, same charge and spin", with_info(moved, charge=1, spin=2), True),
        ("charge only", with_info(moved, charge=-1, spin=2), True),
        ("spin only", with_info(moved, charge=-1, spin=4), True),
        ("defaults again (info emptied)", moved, True),
        ("species only, charged", with_info(substituted, charge=1, spin=2), False),
    ]


@pytest.fixture(scope="module")
def fresh(families, one_thread):
    """Fresh (skin = 0) references per family, computed once for both paths."""
    cache = {}

    def get(family: str, frames) -> list[dict]:
        key = (family, tuple(label for label, _, _ in frames))
        if key not in cache:
            _, local = families.get(family)
            cache[key] = [in_process(local, atoms) for _, atoms, _ in frames]
        return cache[key]

    return get


def same_rest(a: Atoms, b: Atoms) -> bool:
    """Same species, pbc and atoms.info (what a positions-only request keeps)."""
    return (
        np.array_equal(a.numbers, b.numbers) and np.array_equal(a.pbc, b.pbc) and a.info == b.info
    )


def run_frames(calc, frames, expected, label: str) -> None:
    """Each frame: the reuse decision (all workers alike, the counters) and the numbers."""
    builds, reuses = calc.graph_builds, calc.graph_reuses
    for step, ((what, atoms, reused), reference) in enumerate(zip(frames, expected, strict=True)):
        got = distributed(calc, atoms)
        decisions = {stats["graph_reused"] for stats in calc.last_stats}
        assert decisions == {int(reused)}, f"{label} frame {step} ({what}): reused {decisions}"
        if reused:
            assert all(s["skin_edges"] > s["edges"] for s in calc.last_stats), what
        # Only positions and cell changed: the driver sent them alone (distmlip.driver.sender).
        previous = frames[step - 1][1] if step else None
        moved_only = previous is not None and same_rest(previous, atoms)
        sent = {s["positions_only"] for s in calc.last_stats}
        assert sent == {int(moved_only)}, f"{label} frame {step} ({what}): positions only {sent}"
        for key, value in reference.items():
            error = relative_error(got[key], value)
            assert error <= RTOL, f"{label} frame {step} ({what}): {key} {error:.2e}"
    expected_reuses = sum(reused for _, _, reused in frames)
    assert calc.graph_reuses - reuses == expected_reuses, label
    assert calc.graph_builds - builds == len(frames) - expected_reuses, label


SAME_PHYSICS = ("nothing changed", SAME_SYSTEM)


def check_frames_are_honest(local, frames, expected) -> None:
    """The frames test something: the reused move changes the set of edges within the cutoff
    (a graph not re-selected would be wrong), and every other frame changes the forces."""

    def edges(atoms):
        return set(map(tuple, np.column_stack(neighbor_list("ijS", atoms, local.cutoff))))

    assert edges(frames[0][1]) != edges(frames[1][1]), "no edge crossed the cutoff"
    for step in range(1, len(frames)):
        previous, current = expected[step - 1], expected[step]
        if frames[step][0] in SAME_PHYSICS or len(previous["forces"]) != len(current["forces"]):
            continue
        assert relative_error(current["forces"], previous["forces"]) > 1e-8, frames[step][0]


@pytest.mark.slow
@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_reuse_rule(family, resident, families, fresh):
    model, local = families.get(family)
    frames = rule_frames(local.cutoff)
    expected = fresh(family, frames)
    check_frames_are_honest(local, frames, expected)
    nprocs = 3 if family == "reference" else 2
    with DistributedCalculator(
        model, nprocs=nprocs, partitioner="rcb", skin=SKIN, resident=resident, timeout=120
    ) as calc:
        assert calc.resident is resident
        run_frames(calc, frames, expected, f"{family} {'resident' if resident else 'host'}")


@pytest.mark.slow
@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
def test_charge_and_spin_keep_the_graph_and_change_the_numbers(resident, families, fresh):
    """UMA-shaped (omol task): a change of atoms.info alone reuses the graph (the graph does
    not depend on it) and is sent as a complete structure (not positions-only), and the
    numbers follow the new charge and spin."""
    model, local = families.get("uma")
    assert local.mixture
    frames = info_frames(local.cutoff)
    expected = fresh("uma", frames)
    changed = relative_error(expected[1]["energies"], expected[0]["energies"])
    assert changed > 1e-6, "charge and spin changed nothing: the test would show nothing"
    with DistributedCalculator(
        model, nprocs=2, partitioner="rcb", skin=SKIN, resident=resident, timeout=120
    ) as calc:
        positions_only = []
        builds, reuses = calc.graph_builds, calc.graph_reuses
        for step, ((what, atoms, reused), reference) in enumerate(
            zip(frames, expected, strict=True)
        ):
            got = distributed(calc, atoms)
            assert {s["graph_reused"] for s in calc.last_stats} == {int(reused)}, what
            positions_only.append({s["positions_only"] for s in calc.last_stats})
            for key, value in reference.items():
                error = relative_error(got[key], value)
                assert error <= RTOL, f"uma frame {step} ({what}): {key} {error:.2e}"
        # New system inputs are sent whole; a move with the same inputs sends positions only.
        assert positions_only == [{0}, {0}, {1}, {0}, {0}, {0}, {0}], positions_only
        assert calc.graph_reuses - reuses == 5 and calc.graph_builds - builds == 2
