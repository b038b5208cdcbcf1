"""The generated crystals of benchmarks and the demo: sizes, cells, reproducible rattles."""

from __future__ import annotations

import numpy as np
import pytest

from distmlip.bench.systems import CRYSTALS, crystal, repeats_for


@pytest.mark.parametrize(
    ("name", "n_atoms", "expected"),
    [
        ("cu", 4000, 4000),  # 10³ fcc cells of 4
        ("cu", 32000, 32000),  # 20³
        ("si", 1000, 1000),  # 5³ diamond cells of 8
        ("si", 20000, 21952),  # 14³: the nearest repeat rounds (20000/8)^(1/3) = 13.6 up
        ("gaas", 5832, 5832),  # 9³: the demo's and md_pipeline's CHGNet system
        ("GaAs", 2000, 1728),  # case-insensitive; (2000/8)^(1/3) = 6.30 -> 6³ cells
    ],
)
def test_atom_count_follows_the_nearest_repeat(name, n_atoms, expected):
    assert len(crystal(name, n_atoms)) == expected


def test_nearest_and_at_least_rounding():
    assert repeats_for("si", 5000) == 9  # 8.55 -> 9
    assert repeats_for("si", 4097) == 8  # 8.0007 -> 8: 4,096 atoms, fewer than asked
    assert repeats_for("si", 4097, at_least=True) == 9  # at least 4,097: 9³ cells
    # 4096 = 8 × 8³ exactly, though the cube root in floating point is 7.999999999999999.
    assert repeats_for("si", 4096, at_least=True) == 8
    assert len(crystal("si", 4000, at_least=True)) == 4096
    assert repeats_for("cu", 1) == 1  # never zero cells
    assert repeats_for("cu", 1e6) == 63  # the preprocessing benchmark's 10^6: 1,000,188 atoms


@pytest.mark.parametrize("name", list(CRYSTALS))
def test_cell_is_the_cubic_lattice_constant_times_the_repeat(name):
    lattice = CRYSTALS[name].lattice
    atoms = crystal(name, repeat=3)
    np.testing.assert_allclose(atoms.cell[:], np.eye(3) * 3 * lattice, atol=1e-12)
    assert atoms.pbc.all()
    stretched = crystal(name, repeat=(2, 1, 3))
    np.testing.assert_allclose(np.diag(stretched.cell[:]), [2 * lattice, lattice, 3 * lattice])
    assert len(stretched) == 6 * len(crystal(name, repeat=1))


def test_species_and_lattice_constants():
    assert set(crystal("cu", repeat=2).get_chemical_symbols()) == {"Cu"}
    assert sorted(set(crystal("gaas", repeat=1).get_chemical_symbols())) == ["As", "Ga"]
    assert {name: c.lattice for name, c in CRYSTALS.items()} == {
        "cu": 3.61,
        "si": 5.43,
        "gaas": 5.653,
    }


def test_rattle_is_reproducible_with_its_seed_and_has_its_size():
    ideal = crystal("si", repeat=4)
    first = crystal("si", repeat=4, rattle=0.05, seed=3)
    again = crystal("si", repeat=4, rattle=0.05, seed=3)
    other = crystal("si", repeat=4, rattle=0.05, seed=4)
    np.testing.assert_array_equal(first.positions, again.positions)
    assert not np.array_equal(first.positions, other.positions)
    displacement = first.positions - ideal.positions
    assert displacement.std() == pytest.approx(0.05, rel=0.1)  # 1,536 Gaussian numbers
    np.testing.assert_array_equal(crystal("si", repeat=4, rattle=0.0).positions, ideal.positions)


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="unknown crystal 'nacl'; known: cu, gaas, si"):
        crystal("nacl", 100)
    with pytest.raises(ValueError, match="exactly one of n_atoms and repeat"):
        crystal("cu")
    with pytest.raises(ValueError, match="exactly one of n_atoms and repeat"):
        crystal("cu", 100, repeat=2)
    with pytest.raises(ValueError, match="n_atoms must be positive"):
        crystal("cu", 0)
    with pytest.raises(ValueError, match="rattle must be >= 0"):
        crystal("cu", repeat=1, rattle=-0.1)
