"""Neighbour lists and the region mask each worker's neighbour search starts from."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYSTEMS

from distmlip.graph import Structure, binning_frame, neighbor_list, neighborhood_mask


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_edge_vectors_are_within_cutoff_and_symmetric(name):
    structure = Structure.from_ase(SYSTEMS[name]())
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, 5.0)
    vectors = (
        structure.positions[edges.senders]
        + edges.shifts @ structure.cell
        - structure.positions[edges.receivers]
    )
    assert np.linalg.norm(vectors, axis=1).max() < 5.0
    # Full list: every j -> i with shift S has its i -> j twin with shift -S.
    forward = set(zip(edges.receivers, edges.senders, *edges.shifts.T, strict=True))
    backward = set(zip(edges.senders, edges.receivers, *(-edges.shifts).T, strict=True))
    assert forward == backward
    assert not np.any(edges.shifts[:, ~structure.pbc])


def test_small_cell_has_self_images_and_repeated_pairs():
    structure = Structure.from_ase(SYSTEMS["small_cell"]())
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, 5.0)
    assert np.any(edges.receivers == edges.senders)
    pairs = np.stack([edges.receivers, edges.senders], axis=1)
    assert len(np.unique(pairs, axis=0)) < len(pairs)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_neighborhood_mask_contains_every_neighbour(name):
    structure = Structure.from_ase(SYSTEMS[name]())
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, 5.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        selected = rng.random(structure.n_atoms) < 0.2
        mask = neighborhood_mask(structure.positions, structure.cell, structure.pbc, selected, 5.0)
        assert mask[selected].all()
        assert mask[edges.senders[selected[edges.receivers]]].all()


def test_neighborhood_mask_is_local_in_large_systems():
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((20, 4, 4))
    structure = Structure.from_ase(atoms)
    selected = structure.positions[:, 0] < 10.0
    mask = neighborhood_mask(structure.positions, structure.cell, structure.pbc, selected, 5.0)
    assert mask.sum() < 0.5 * structure.n_atoms


def test_binning_frame_completes_degenerate_non_periodic_axes():
    cell = np.array([[4.0, 0, 0], [1.0, 5.0, 0], [0, 0, 0]])
    frame = binning_frame(cell, np.array([True, True, False]))
    np.testing.assert_array_equal(frame[:2], cell[:2])
    assert abs(np.linalg.det(frame)) > 1.0
    np.testing.assert_array_equal(binning_frame(np.zeros((3, 3)), np.zeros(3, bool)), np.eye(3))
