"""Partitioners: valid owners, balanced slabs, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import SYSTEMS

from distmlip.graphs.partition import partition, partition_coordinates
from distmlip.graphs.structure import Structure


@pytest.mark.parametrize("method", ["slab", "rcb", "metis"])
@pytest.mark.parametrize("name", list(SYSTEMS))
def test_every_atom_gets_one_owner(name, method):
    structure = Structure.from_ase(SYSTEMS[name]())
    for nparts in (1, 2, 3, 7):
        owner = partition(structure, nparts, method, cutoff=5.0)
        assert owner.dtype == np.int64 and owner.shape == (structure.n_atoms,)
        assert owner.min() >= 0 and owner.max() < nparts
        if method != "metis":
            counts = np.bincount(owner, minlength=nparts)
            assert counts.max() - counts.min() <= 1


def test_slab_cuts_along_the_widest_direction():
    from ase.build import bulk

    structure = Structure.from_ase(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 6, 2)))
    owner = partition(structure, 3, "slab")
    y = partition_coordinates(structure)[:, 1]
    for rank in range(2):
        assert y[owner == rank].max() <= y[owner == rank + 1].min()


def test_partitions_are_deterministic():
    structure = Structure.from_ase(SYSTEMS["triclinic"]())
    for method in ("slab", "rcb", "metis"):
        first = partition(structure, 4, method)
        np.testing.assert_array_equal(first, partition(structure, 4, method))


def test_errors():
    structure = Structure.from_ase(SYSTEMS["small_cell"]())
    with pytest.raises(ValueError, match="unknown partitioner 'grid'"):
        partition(structure, 2, "grid")
    with pytest.raises(ValueError, match="cannot split 16 atoms into 17"):
        partition(structure, 17, "slab")


def test_metis_without_pymetis_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymetis", None)
    structure = Structure.from_ase(SYSTEMS["small_cell"]())
    with pytest.raises(ImportError, match=r"pip install 'distmlip\[metis\]'"):
        partition(structure, 2, "metis")
