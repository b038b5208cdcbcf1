"""Neighbour lists and the region mask each worker's neighbour search starts from."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYSTEMS

from distmlip.graphs.neighbors import binning_frame, neighbor_list, neighborhood_mask
from distmlip.graphs.structure import Structure


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


def _rows(receivers, senders, shifts) -> np.ndarray:
    return np.column_stack([receivers, senders, shifts]).astype(np.int64)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_edges_equal_vesin_full_list_with_and_without_receiver_mask(name):
    """The mirrored half list is vesin's full list, self-images and repeated pairs included;
    with a receiver mask, exactly the masked receivers' edges, interior senders first."""
    import vesin

    structure = Structure.from_ase(SYSTEMS[name]())
    box = structure.cell if structure.pbc.any() else np.zeros((3, 3))
    i, j, shifts = vesin.NeighborList(cutoff=5.0, full_list=True).compute(
        structure.positions, box, structure.pbc.tolist(), quantities="ijS"
    )
    expected = _rows(i, j, shifts)
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, 5.0)
    got = _rows(edges.receivers, edges.senders, edges.shifts)
    assert len(got) == len(expected)
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(expected, axis=0))

    mask = np.random.default_rng(0).random(structure.n_atoms) < 0.4
    edges = neighbor_list(
        structure.positions,
        structure.cell,
        structure.pbc,
        5.0,
        receiver_mask=mask,
        senders_in_mask_first=True,
    )
    got = _rows(edges.receivers, edges.senders, edges.shifts)
    kept = expected[mask[expected[:, 0]]]
    assert len(got) == len(kept)
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(kept, axis=0))
    inside = mask[edges.senders].astype(np.int8)
    assert not (np.diff(inside) > 0).any()


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


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_edges_equal_ase_neighbor_list(name):
    """An independent implementation (ASE's own neighbour list) finds exactly the same directed
    edges (receiver, sender, image shift) and vectors."""
    from ase.neighborlist import primitive_neighbor_list

    atoms = SYSTEMS[name]()
    structure = Structure.from_ase(atoms)
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, 5.0)
    i, j, shifts, vectors = primitive_neighbor_list(
        "ijSD", atoms.pbc, atoms.cell.array, atoms.positions, 5.0, self_interaction=False
    )
    # ASE's i is the centre and D = x_j + S·cell − x_i: receiver i, sender j.
    ours = np.column_stack([edges.receivers, edges.senders, edges.shifts])
    theirs = np.column_stack([i, j, shifts]).astype(np.int64)
    assert len(ours) == len(theirs) > 0
    order_ours, order_theirs = np.lexsort(ours.T[::-1]), np.lexsort(theirs.T[::-1])
    np.testing.assert_array_equal(ours[order_ours], theirs[order_theirs])
    ours_vectors = (
        structure.positions[edges.senders]
        + edges.shifts @ structure.cell
        - structure.positions[edges.receivers]
    )
    np.testing.assert_allclose(ours_vectors[order_ours], vectors[order_theirs], rtol=0, atol=1e-12)
