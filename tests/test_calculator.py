"""Distributed evaluation equals single-process evaluation, and matches finite differences."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError
from conftest import (
    SYSTEMS,
    assert_forces_are_finite_differences,
    bulk_cu,
    evaluate,
    relative_error,
    small_cell,
    trajectory,
    triclinic,
)

from distmlip import DistributedCalculator, WorkerError

RTOL = 1e-10


@pytest.mark.parametrize(
    ("nprocs", "partitioner"),
    [(1, "slab")]
    + [(p, method) for p in (2, 3, 4) for method in ("slab", "rcb", "metis")]
    + [pytest.param(8, method, marks=pytest.mark.slow) for method in ("slab", "rcb", "metis")],
)
def test_distributed_equals_single_process(nprocs, partitioner, pools, single_process_results):
    """Every P and partitioner equals the brute-force single-process evaluation (float64)."""
    calc = pools.get(nprocs, partitioner)
    for name, make in SYSTEMS.items():
        expected = single_process_results[name]
        got = evaluate(calc, make())
        for key in expected:
            error = relative_error(got[key], expected[key])
            assert error <= RTOL, f"{name}: {key} relative error {error:.2e} (P={nprocs})"
        # The work really was split: every worker owns atoms of this system.
        assert sum(s["owned_atoms"] for s in calc.last_stats) == len(make())
        if name == "bulk" and nprocs > 1:
            assert all(s["owned_atoms"] > 0 for s in calc.last_stats)
            assert all(s["halo_atoms"] > 0 for s in calc.last_stats)


@pytest.mark.parametrize("make", [small_cell, triclinic], ids=["small_cell", "triclinic"])
@pytest.mark.slow
def test_forces_match_finite_differences(make, pools):
    calc = pools.get(2, "rcb")
    atoms = make()
    rng = np.random.default_rng(0)
    # Every atom of the small cell (each one a halo row of the other worker somewhere), and a
    # third of the triclinic cell's.
    chosen = rng.choice(len(atoms), size=min(len(atoms), 20), replace=False)
    assert_forces_are_finite_differences(calc, atoms, chosen)


@pytest.mark.parametrize("make", [small_cell, triclinic], ids=["small_cell", "triclinic"])
@pytest.mark.slow
def test_stress_matches_finite_differences(make, pools):
    calc = pools.get(2, "slab")
    atoms = make()
    stress = evaluate(calc, atoms)["stress"]
    voigt = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]
    step = 1e-5
    for component, (a, b) in enumerate(voigt):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * step / (1 if a == b else 2)
            strain[b, a] = strain[a, b]
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(evaluate(calc, strained)["energy"])
        numeric = (energies[0] - energies[1]) / (2 * step) / atoms.cell.volume
        assert stress[component] == pytest.approx(numeric, abs=1e-7), component


def test_cluster_without_cell_has_no_stress(pools, single_process_results):
    atoms = SYSTEMS["cluster"]()
    atoms.cell = np.zeros((3, 3))
    calc = pools.get(2, "rcb")
    result = evaluate(calc, atoms)
    assert "stress" not in result
    assert result["energy"] == pytest.approx(single_process_results["cluster"]["energy"], rel=RTOL)
    atoms.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="nonzero volume"):
        atoms.get_stress()


def test_float32_close_to_float64(reference_model, pools, single_process_results):
    calc = pools.get(2, "slab", dtype="float32")
    got = evaluate(calc, SYSTEMS["bulk"]())
    expected = single_process_results["bulk"]
    assert got["energy"] == pytest.approx(expected["energy"], rel=1e-5)
    assert np.abs(got["forces"] - expected["forces"]).max() < 1e-4


@pytest.mark.parametrize("nprocs, partitioner", [(2, "slab"), (4, "rcb"), (3, "metis")])
@pytest.mark.slow
def test_ghost_baseline_equals_single_process(
    nprocs, partitioner, reference_model, single_process_results
):
    from distmlip import DistributedCalculator

    with DistributedCalculator(
        reference_model, nprocs=nprocs, partitioner=partitioner, halo="ghost"
    ) as calc:
        for name, make in SYSTEMS.items():
            expected = single_process_results[name]
            got = evaluate(calc, make())
            for key in expected:
                error = relative_error(got[key], expected[key])
                assert error <= RTOL, f"{name}: {key} relative error {error:.2e} (ghost)"


def test_ghost_baseline_recomputes_what_exchange_shares(reference_model):
    """On a system much larger than the receptive field, ghosts cost extra edges per worker."""
    from ase.build import bulk

    from distmlip.graphs.ghost import build_ghost_graph
    from distmlip.graphs.halo import build_local_graph
    from distmlip.graphs.partition import partition
    from distmlip.graphs.structure import Structure

    structure = Structure.from_ase(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((16, 4, 4)))
    owner = partition(structure, 4, "slab")
    layers, cutoff = reference_model.num_layers, reference_model.cutoff
    for rank in range(4):
        exchange = build_local_graph(structure, owner, rank, 4, cutoff)
        ghost = build_ghost_graph(structure, owner, rank, 4, cutoff, layers)
        assert ghost.n_owned == exchange.n_owned
        assert len(ghost.edges) >= 2 * len(exchange.edges)
        assert ghost.n_computed > ghost.n_owned


def test_ghost_needs_layer_count():
    from distmlip import DistributedCalculator
    from distmlip.models import DistributedModel

    class NoLayers(DistributedModel):
        cutoff = 3.0

    with pytest.raises(ValueError, match="halo='ghost' needs the model's number"):
        DistributedCalculator(NoLayers(), nprocs=2, halo="ghost")


SKIN = 0.6


def skin_frames() -> dict[str, list[tuple]]:
    """Per system, (atoms, graph expected to be reused) for MD-like steps with ``SKIN``.

    Random-walk steps of 0.08 Å: after the first build the next three steps move no atom more
    than 0.24 Å (< SKIN / 2), so they must reuse the graph; later steps may rebuild. The bulk
    system then probes each rebuild rule once.
    """
    frames = {}
    for name in ("bulk", "small_cell", "slab", "cluster"):
        walk = trajectory(SYSTEMS[name](), steps=6, step_size=0.08, seed=7)
        frames[name] = [(walk[0], False)] + [(a, True) for a in walk[1:4]]
        frames[name] += [(a, None) for a in walk[4:]]
    base = bulk_cu()
    moved = base.copy()
    moved.positions[17] += [0.29, 0.0, 0.0]  # 2 × 0.29 < 0.6: reuse
    moved_more = base.copy()
    moved_more.positions[17] += [0.0, 0.31, 0.0]  # 2 × 0.31 > 0.6: rebuild
    wrapped = base.copy()  # the same physical system, one atom stored one lattice vector away
    wrapped.positions[3] += wrapped.cell[0]
    strained = base.copy()
    strained.set_cell(base.cell.array * 1.001, scale_atoms=True)
    substituted = base.copy()
    substituted.numbers[4] = 47
    frames["bulk_rules"] = [
        (base, False),
        (moved, True),
        (moved_more, False),
        (base, False),
        (wrapped, False),
        (base, False),
        (strained, False),
        (substituted, False),
    ]
    return frames


@pytest.mark.parametrize(("nprocs", "partitioner"), [(3, "rcb"), (2, "metis")])
@pytest.mark.slow
def test_skin_reuse_equals_fresh_graphs(nprocs, partitioner, pools):
    """Verlet-skin graph reuse gives the single-process results of a fresh graph every step,
    reuses exactly when no atom moved more than skin / 2 and nothing else changed."""
    frames = skin_frames()
    single = pools.get(1)
    expected = {name: [evaluate(single, atoms) for atoms, _ in f] for name, f in frames.items()}
    calc = pools.get(nprocs, partitioner, skin=SKIN)
    for name, steps in frames.items():
        for step, ((atoms, reuse), reference) in enumerate(zip(steps, expected[name], strict=True)):
            got = evaluate(calc, atoms)
            for key in reference:
                error = relative_error(got[key], reference[key])
                assert error <= RTOL, f"{name} step {step}: {key} relative error {error:.2e}"
            reused = {s["graph_reused"] for s in calc.last_stats}
            assert len(reused) == 1, "workers disagree on reusing their graphs"
            if reuse is not None:
                assert reused == {int(reuse)}, f"{name} step {step}: reused {reused}"
            # Graphs were built with cutoff + skin: more candidate edges than real ones.
            assert all(s["skin_edges"] > s["edges"] for s in calc.last_stats)
    assert calc.graph_reuses >= 3 * 4 + 1


def test_skin_is_validated(reference_model):
    with pytest.raises(ValueError, match="skin must be"):
        DistributedCalculator(reference_model, nprocs=1, skin=-0.1)
    with pytest.raises(ValueError, match="skin must be"):
        DistributedCalculator(reference_model, nprocs=1, skin=float("nan"))


def test_skin_after_worker_death_rebuilds(reference_model):
    """A graph cached by workers that died is never reused: the restarted pool rebuilds."""
    atoms = small_cell()
    with DistributedCalculator(reference_model, nprocs=2, skin=0.5, timeout=60) as calc:
        first = evaluate(calc, atoms)
        os.kill(calc.pool.pids[1], signal.SIGKILL)
        with pytest.raises(WorkerError):
            evaluate(calc, atoms)
        again = evaluate(calc, atoms)
        assert {s["graph_reused"] for s in calc.last_stats} == {0}
        assert relative_error(again["forces"], first["forces"]) <= RTOL


def test_options_are_keyword_only(reference_model):
    with pytest.raises(TypeError, match="positional"):
        DistributedCalculator(reference_model, 2)


def test_energy_only_runs_no_backward_then_forces_are_computed(pools):
    """ASE asks for the energy alone: no backward pass on any worker; forces asked next for
    the same atoms are then computed (and equal a full evaluation's)."""
    calc = pools.get(2)
    atoms = small_cell()
    atoms.rattle(0.03, seed=11)
    full = evaluate(calc, atoms)
    atoms = atoms.copy()
    atoms.rattle(0.0)  # same positions, new object: the calculator compares them
    calc.reset()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert "forces" not in calc.results
    assert all("backward" not in timings for timings in calc.last_timings)
    assert energy == pytest.approx(full["energy"], rel=1e-12)
    forces = atoms.get_forces()
    assert all("backward" in timings for timings in calc.last_timings)
    np.testing.assert_allclose(forces, full["forces"], rtol=0, atol=1e-12)
    # Several properties from one evaluation.
    calc.reset()
    properties = calc.get_properties(["energy", "forces", "stress"], atoms)
    np.testing.assert_allclose(properties["stress"], full["stress"], rtol=0, atol=1e-12)
