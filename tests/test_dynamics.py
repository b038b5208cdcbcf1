"""MD through the Python API: long NVE runs with distributed forces, rebalancing, integrator
state for restarts."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk

from distmlip import DistributedCalculator
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure
from distmlip.md.dynamics import (
    MDSettings,
    dynamics_state,
    initial_velocities,
    make_dynamics,
    restore_dynamics_state,
)

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

STEPS = 300
COMPARED = 150


def nve_run(nprocs: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions after every step (steps, N, 3) and total energy (steps + 1,), eV."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)  # 32 atoms
    atoms.rattle(0.05, seed=1)
    initial_velocities(atoms, 600.0, seed=2)
    positions, energies = [], []
    with DistributedCalculator("reference", nprocs=nprocs, dtype="float64", skin=1.0) as calc:
        atoms.calc = calc
        dynamics = make_dynamics(atoms, MDSettings("nve", timestep_fs=2.0))
        energies.append(atoms.get_total_energy())
        for _ in dynamics.irun(steps):
            positions.append(atoms.positions.copy())
            energies.append(atoms.get_total_energy())
        assert calc.graph_builds > 1  # atoms at 600 K leave the skin: graphs were rebuilt
    return np.array(positions[1:]), np.array(energies[1:])


@pytest.fixture(scope="module")
def nve_runs():
    return {nprocs: nve_run(nprocs, STEPS) for nprocs in (1, 2)}


def test_nve_with_two_workers_follows_the_single_process_trajectory(nve_runs):
    (single, single_energy), (split, split_energy) = nve_runs[1], nve_runs[2]
    assert len(single) == STEPS
    deviation = np.abs(split - single).max(axis=(1, 2))
    assert deviation[:COMPARED].max() < 1e-11  # step by step, to float64 round-off (Å)
    np.testing.assert_allclose(split_energy[:COMPARED], single_energy[:COMPARED], atol=1e-9)
    assert np.abs(single[-1] - single[0]).max() > 0.1  # they did move


def test_nve_energy_drift_is_the_same_size_with_two_workers(nve_runs):
    kinetic = 1.5 * 32 * units.kB * 600.0  # eV, the initial kinetic energy
    drifts = {}
    for nprocs, (_, energy) in nve_runs.items():
        drifts[nprocs] = np.abs(energy - energy[0]).max()
        assert 0 < drifts[nprocs] < 1e-3 * kinetic  # 0.6 ps of 2 fs steps
    assert 0.5 < drifts[2] / drifts[1] < 2.0


@pytest.mark.parametrize("partitioner", ["slab", "rcb"])
def test_owners_are_reassigned_at_every_graph_build(partitioner):
    """Hot atoms cross partition boundaries; each rebuild partitions the current positions,
    so the owned atoms per worker stay within one of each other."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    initial_velocities(atoms, 3000.0, seed=0)
    with DistributedCalculator(
        "reference", nprocs=3, partitioner=partitioner, dtype="float64", skin=0.4
    ) as calc:
        atoms.calc = calc
        dynamics = make_dynamics(atoms, MDSettings("nve", timestep_fs=2.0))
        builds, changed = 0, 0
        first_owners = None
        for _ in dynamics.irun(60):
            structure = Structure.from_ase(atoms)
            if calc.graph_builds > builds:  # this step built a graph
                builds = calc.graph_builds
                expected = partition(structure, 3, partitioner, calc.model.cutoff)
                np.testing.assert_array_equal(calc.last_owners, expected)
                if first_owners is None:
                    first_owners = calc.last_owners.copy()
                changed += int(np.any(calc.last_owners != first_owners))
            counts = np.bincount(calc.last_owners, minlength=3)
            assert counts.max() - counts.min() <= 1
        assert builds >= 3 and changed >= 1  # rebuilt, and atoms changed owner


@pytest.mark.parametrize(
    "settings",
    [
        MDSettings("nvt", thermostat="langevin", friction_per_fs=0.05, seed=4),
        MDSettings("nvt", thermostat="nose-hoover", tdamp_fs=20),
        MDSettings("npt", pressure_GPa=1.0, tdamp_fs=20, pdamp_fs=50),
    ],
    ids=["langevin", "nose-hoover", "mtk-npt"],
)
def test_restored_integrator_state_continues_the_same_trajectory(pools, settings):
    """Run 10 steps, save, rebuild the integrator on a copy, restore, run 10 more: the same
    positions and cell as 20 steps in one go."""
    calc = pools.get(2)
    start = bulk("Cu", "fcc", a=3.61).repeat((3, 3, 2))  # a triclinic (60°) cell
    start.rattle(0.02, seed=0)
    initial_velocities(start, 300.0, seed=1)

    whole = start.copy()
    whole.calc = calc
    dynamics = make_dynamics(whole, settings)
    dynamics.run(20)

    part = start.copy()
    part.calc = calc
    dynamics = make_dynamics(part, settings)
    dynamics.run(10)
    state = dynamics_state(dynamics)
    resumed = part.copy()
    resumed.calc = calc
    dynamics = make_dynamics(resumed, settings)
    restore_dynamics_state(dynamics, state)
    dynamics.run(10)
    np.testing.assert_allclose(resumed.positions, whole.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(resumed.cell[:], whole.cell[:], rtol=0, atol=1e-10)
    if settings.ensemble == "npt":
        assert not np.allclose(whole.cell[:], start.cell[:], atol=1e-5)


def test_restoring_into_another_integrator_is_refused(pools):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.calc = pools.get(2)
    langevin = make_dynamics(atoms, MDSettings("nvt"))
    hoover = make_dynamics(atoms, MDSettings("nvt", thermostat="nose-hoover"))
    with pytest.raises(ValueError, match="use the same --ensemble and --thermostat"):
        restore_dynamics_state(hoover, dynamics_state(langevin))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ensemble": "nvx"}, "ensemble must be one of"),
        ({"thermostat": "berendsen"}, "thermostat must be one of"),
        ({"timestep_fs": 0}, "timestep_fs must be a positive number"),
        ({"ensemble": "nvt", "temperature_K": 0}, "needs a temperature above 0 K"),
        ({"temperature_K": float("nan")}, "temperature_K must be >= 0"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MDSettings(**options)


def test_npt_needs_a_periodic_cell(pools):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.pbc = (True, True, False)
    with pytest.raises(ValueError, match="npt needs a periodic cell"):
        make_dynamics(atoms, MDSettings("npt"))


def test_initial_velocities_have_the_temperature_and_no_drift():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    initial_velocities(atoms, 450.0, seed=9)
    assert atoms.get_temperature() == pytest.approx(450.0, rel=1e-12)
    np.testing.assert_allclose(atoms.get_momenta().sum(axis=0), 0, atol=1e-12)
    again = atoms.copy()
    initial_velocities(again, 450.0, seed=9)
    np.testing.assert_array_equal(again.get_momenta(), atoms.get_momenta())
