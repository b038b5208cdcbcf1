"""Property tests of local graphs and halo plans (pure numpy, no processes)."""

from __future__ import annotations

import numpy as np
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from distmlip.graphs.halo import build_all_local_graphs
from distmlip.graphs.neighbors import neighbor_list
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure


@st.composite
def structures(draw):
    # Up to 400 atoms in cells up to 32 Å (five 6 Å cutoffs): large enough that workers'
    # regions and halos are a part of the whole, small enough for hundreds of examples.
    n = draw(st.integers(2, 400))
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    lengths = np.array(draw(st.lists(st.floats(3.0, 32.0), min_size=3, max_size=3)))
    shear = np.array(draw(st.lists(st.floats(-0.3, 0.3), min_size=3, max_size=3)))
    cell = np.diag(lengths)
    cell[1, 0], cell[2, 0], cell[2, 1] = shear * lengths[[1, 2, 2]]
    seed = draw(st.integers(0, 2**31))
    fractional = np.random.default_rng(seed).uniform(-0.2, 1.2, size=(n, 3))
    positions = fractional @ cell
    if not pbc[2] and draw(st.booleans()):
        cell[2] = 0.0  # slabs and wires often come with no vector along a vacuum axis
    numbers = np.full(n, 29)
    return Structure(positions, numbers, cell, pbc)


def edge_keys(receivers, senders, shifts) -> np.ndarray:
    return np.concatenate([receivers[:, None], senders[:, None], shifts], axis=1)


def sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows


@settings(max_examples=examples(60))
@given(
    structure=structures(),
    nparts=st.integers(1, 6),
    method=st.sampled_from(["slab", "rcb", "metis"]),
    cutoff=st.floats(1.5, 6.0),
)
def test_plan_covers_every_edge_once_and_every_halo_row_has_one_sender(
    structure, nparts, method, cutoff
):
    nparts = min(nparts, structure.n_atoms)
    owner = partition(structure, nparts, method, cutoff)
    assert owner.shape == (structure.n_atoms,)
    assert owner.min() >= 0 and owner.max() < nparts
    graphs = build_all_local_graphs(structure, owner, nparts, cutoff)

    # Every edge of the global graph is computed by exactly one worker: the receiver's owner.
    full = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    expected = sorted_rows(edge_keys(full.receivers, full.senders, full.shifts))
    pieces = []
    for p, graph in enumerate(graphs):
        receivers = graph.global_index[graph.edges.receivers]
        senders = graph.global_index[graph.edges.senders]
        assert (owner[receivers] == p).all()
        # Interior edges (owned sender) first, then boundary edges: a prefix, then the rest.
        interior = graph.edges.senders < graph.n_owned
        assert not (np.diff(interior.astype(np.int8)) > 0).any()
        pieces.append(edge_keys(receivers, senders, graph.edges.shifts))
    got = sorted_rows(np.concatenate(pieces))
    np.testing.assert_array_equal(got, expected)

    for p, graph in enumerate(graphs):
        owned = graph.global_index[: graph.n_owned]
        np.testing.assert_array_equal(owned, np.flatnonzero(owner == p))
        halo = graph.global_index[graph.n_owned :]
        assert len(np.unique(halo)) == len(halo)
        np.testing.assert_array_equal(owner[halo], graph.halo_owner)
        assert graph.recv_counts[p] == 0
        # Each halo row has exactly one sender, its owner, which sends exactly those rows in order.
        offset = graph.n_owned
        for q in range(nparts):
            count = graph.recv_counts[q]
            wanted = graph.global_index[offset : offset + count]
            sent = graphs[q].global_index[graphs[q].send_index[p]]
            np.testing.assert_array_equal(sent, wanted)
            offset += count
        # Halo atoms are exactly the non-owned senders.
        senders = graph.global_index[graph.edges.senders]
        np.testing.assert_array_equal(np.sort(halo), np.unique(senders[owner[senders] != p]))


@settings(max_examples=examples(30))
@given(structure=structures(), nparts=st.integers(1, 8), method=st.sampled_from(["slab", "rcb"]))
def test_geometric_partitions_balance_atom_counts(structure, nparts, method):
    nparts = min(nparts, structure.n_atoms)
    counts = np.bincount(partition(structure, nparts, method), minlength=nparts)
    assert counts.max() - counts.min() <= (1 if method == "slab" else nparts)
    assert counts.sum() == structure.n_atoms
