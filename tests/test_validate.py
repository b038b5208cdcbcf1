"""Bad input: one clear error before any worker computes, and the calculator stays usable."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from conftest import evaluate, small_cell

from distmlip import DistributedCalculator


def nan_positions():
    atoms = small_cell()
    atoms.positions[3, 1] = np.nan
    return atoms


def overlapping():
    atoms = small_cell()
    atoms.positions[5] = atoms.positions[2] + [0.05, 0.0, 0.0]
    return atoms


def zero_volume():
    atoms = small_cell()
    atoms.cell[2] = [0.0, 0.0, 0.0]
    return atoms


def too_few_atoms():
    return Atoms("Cu", positions=[[0, 0, 0]], cell=[4, 4, 4], pbc=True)


def unknown_element():
    atoms = small_cell()
    atoms.numbers[0] = 0  # 'X', a dummy atom no model knows
    return atoms


@pytest.mark.parametrize(
    "make, message",
    [
        (nan_positions, "NaN or infinite"),
        (overlapping, "closer than 0.1"),
        (zero_volume, "zero volume"),
        (too_few_atoms, "larger than the number of atoms"),
        (unknown_element, "does not know element"),
    ],
    ids=["nan", "overlap", "zero_volume", "nprocs_gt_atoms", "unknown_element"],
)
def test_bad_input_raises_before_workers_and_calculator_survives(make, message, pools):
    calc = pools.get(2, "slab")
    pids = calc.pool.pids
    good = evaluate(calc, small_cell())
    with pytest.raises(ValueError, match=message) as error:
        evaluate(calc, make())
    assert "\n" not in str(error.value)
    assert calc.pool.pids == pids, "the bad input must not cost a worker restart"
    again = evaluate(calc, small_cell())
    assert again["energy"] == good["energy"]


def test_unknown_partitioner_fails_at_construction():
    with pytest.raises(ValueError, match="unknown partitioner 'kmeans'; choose one of"):
        DistributedCalculator("reference", nprocs=2, partitioner="kmeans")


def test_self_image_closer_than_minimum_distance(pools):
    atoms = Atoms("Cu", positions=[[0, 0, 0]], cell=[0.05, 4, 4], pbc=True)
    with pytest.raises(ValueError, match="own periodic image"):
        evaluate(pools.get(1), atoms)


def test_atoms_spread_far_apart_are_a_clear_error(reference_model):
    """An atom flung far away (an exploded run) would make the neighbour search crash the
    process; it is a ValueError instead."""
    from ase import Atoms

    from distmlip import Structure
    from distmlip.graphs.validate import validate_structure

    atoms = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1e6, 0, 0], [1e6 + 2.5, 0, 0]])
    with pytest.raises(ValueError, match="span 1e\\+06 Å along the non-periodic axis x"):
        validate_structure(Structure.from_ase(atoms), 2, reference_model)
