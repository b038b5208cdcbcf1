"""Checks written for planted bugs that the rest of the suite let through or caught only
indirectly (issue 24, item 8). Each test here fails with one plausible one-line bug planted in
the numerical core and passes without it; all run in this process in about a second.

* The ghost baseline's region: ``build_ghost_graph`` dilates the owned atoms' neighbourhood
  once per layer before its hop search. One dilation too few passes every small system (one
  cell-list bin already spans the whole cell) but drops outer ghosts on the large structures of
  tests/locality.py; elsewhere only the slow tier's ghost locality test sees it (forces off by
  2e-10) and, by a margin under 1%, the ghost-versus-exchange edge-count check.
* The cutoff at reuse: a kept skin graph must select exactly the edges a fresh neighbour search
  at the cutoff finds, strictly shorter than the cutoff (vesin's rule), on the host path
  (``within_cutoff``) and on the resident path (``DeviceGraph.inputs``). ``<=`` instead of
  ``<`` adds the edges of pairs exactly at the cutoff, which no other test places there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from locality import CUTOFF, LARGE

from distmlip import ReferenceMPNN
from distmlip.exchange.comm import Communicator
from distmlip.graphs.ghost import build_ghost_graph
from distmlip.graphs.neighbors import neighbor_list
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure
from distmlip.options import GraphOptions
from distmlip.worker.main import graph_builder

CPU = torch.device("cpu")


def _hops(structure: Structure, owned: np.ndarray, cutoff: float, layers: int) -> np.ndarray:
    """(N,) graph distance of every atom from the owned ones (``layers + 1``: further), by a
    breadth-first search over the whole structure's neighbour list."""
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    hop = np.where(owned, 0, layers + 1)
    for k in range(1, layers + 1):
        reached = edges.senders[hop[edges.receivers] == k - 1]
        hop[reached] = np.minimum(hop[reached], k)
    return hop


@pytest.mark.parametrize(
    ("name", "nparts", "method"),
    [("gas", 6, "slab"), ("skewed", 6, "slab"), ("nanoparticle", 4, "rcb")],
)
def test_ghost_graph_holds_every_atom_within_the_receptive_field(name, nparts, method):
    """Rows of each worker's ghost graph are exactly the atoms at most ``layers`` hops from its
    owned ones, and its computed rows (hop < layers) carry every edge they have globally."""
    layers = 3
    structure = Structure.from_ase(LARGE[name]())
    owner = partition(structure, nparts, method, CUTOFF)
    full = neighbor_list(structure.positions, structure.cell, structure.pbc, CUTOFF)
    for rank in range(nparts):
        graph = build_ghost_graph(structure, owner, rank, nparts, CUTOFF, layers)
        hop = _hops(structure, owner == rank, CUTOFF, layers)
        np.testing.assert_array_equal(
            np.sort(graph.global_index), np.flatnonzero(hop <= layers), err_msg=f"rank {rank}"
        )
        computed = graph.global_index[: graph.n_computed]
        assert set(computed) == set(np.flatnonzero(hop < layers)), f"rank {rank}"
        expected = np.isin(full.receivers, computed).sum()
        assert len(graph.edges) == expected, f"rank {rank}: {len(graph.edges)} != {expected}"


def _pair_at_exactly(cutoff: float) -> Atoms:
    """Three atoms, not periodic: one pair exactly ``cutoff`` apart (|v|² == cutoff² in
    float64), one pair inside the cutoff."""
    positions = [[1.0, 1.0, 1.0], [1.0 + cutoff, 1.0, 1.0], [1.0, 3.5, 1.0]]
    atoms = Atoms("Cu3", positions=positions, cell=[20.0, 20.0, 20.0], pbc=False)
    vector = atoms.positions[1] - atoms.positions[0]
    assert vector @ vector == cutoff * cutoff
    return atoms


@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
def test_reused_graph_keeps_only_edges_strictly_inside_the_cutoff(resident):
    """A graph built with ``cutoff + skin`` and re-selected at the cutoff has the edges of a
    fresh search at the cutoff: a pair exactly at the cutoff is not an edge (vesin's ``<``)."""
    model = ReferenceMPNN(cutoff=5.0, num_layers=2, hidden=8, seed=0).double()
    structure = Structure.from_ase(_pair_at_exactly(model.cutoff))
    fresh = neighbor_list(structure.positions, structure.cell, structure.pbc, model.cutoff)
    assert len(fresh) == 2  # the inner pair, both directions
    graphs = graph_builder(
        model, GraphOptions("rcb", skin=0.5, resident=resident), CPU, torch.float64
    )
    comm = Communicator(0, 1, CPU)
    for step in range(2):  # the build, then a reuse
        call = graphs.get(structure, comm)
        assert call.built == (step == 0)
        assert call.skin_edges == 4  # the skin graph also holds the pair at the cutoff
        if resident:
            receivers, senders = call.inputs.receivers.numpy(), call.inputs.senders.numpy()
        else:
            receivers, senders = call.graph.edges.receivers, call.graph.edges.senders
        rows = call.graph.global_index
        got = sorted(zip(rows[receivers], rows[senders], strict=True))
        assert got == sorted(zip(fresh.receivers, fresh.senders, strict=True)), step
