"""The ghost baseline's graph: each worker's owned atoms and ``num_layers`` hops of ghosts."""

from __future__ import annotations

import numpy as np

from distmlip.graphs.halo import LocalGraph
from distmlip.graphs.neighbors import neighbor_list, neighborhood_mask
from distmlip.graphs.structure import EdgeList, Structure


def build_ghost_graph(
    structure: Structure,
    owner: np.ndarray,
    rank: int,
    world_size: int,
    cutoff: float,
    layers: int,
) -> LocalGraph:
    """The conventional spatial-decomposition graph: owned atoms plus ``layers`` hops of ghosts.

    The baseline that zero-redundancy exchange is measured against (LAMMPS-style, as in
    SevenNet's and MACE's parallel modes): every atom within ``layers − 1`` graph hops of an owned
    atom is *computed* (its features updated at every layer, all of its edges local), atoms at
    exactly ``layers`` hops contribute species only. No features are exchanged between layers;
    ghost work is done again on every worker that needs it. Owned atoms' final features are
    exact because a node ``k`` hops out is correct up to layer ``layers − k``.

    Rows are sorted by hop, then global index: owned (hop 0), computed ghosts, outer ghosts.
    ``recv_counts`` are zero and ``send_index`` empty: forces on ghost rows are summed by the
    driver, not exchanged.
    """
    positions, cell, pbc = structure.positions, structure.cell, structure.pbc
    owned_mask = owner == rank
    region = owned_mask
    for _ in range(layers):  # each dilation reaches at least one cutoff further
        region = neighborhood_mask(positions, cell, pbc, region, cutoff)
    region_atoms = np.flatnonzero(region)
    edges = neighbor_list(positions[region_atoms], cell, pbc, cutoff)
    unreached = layers + 1
    hop = np.where(owned_mask[region_atoms], 0, unreached)
    for k in range(1, layers + 1):
        frontier = hop[edges.receivers] == k - 1
        reached = edges.senders[frontier]
        hop[reached] = np.minimum(hop[reached], k)
    kept_atoms = np.flatnonzero(hop <= layers)
    order = kept_atoms[np.lexsort((region_atoms[kept_atoms], hop[kept_atoms]))]
    local_row = np.full(len(region_atoms), -1, dtype=np.int64)
    local_row[order] = np.arange(len(order))
    computed = hop[edges.receivers] <= layers - 1
    local_edges = EdgeList(
        receivers=local_row[edges.receivers[computed]],
        senders=local_row[edges.senders[computed]],
        shifts=edges.shifts[computed],
    )
    return LocalGraph(
        rank=rank,
        world_size=world_size,
        global_index=region_atoms[order],
        n_owned=int(owned_mask.sum()),
        edges=local_edges,
        recv_counts=np.zeros(world_size, dtype=np.int64),
        send_index=[np.zeros(0, dtype=np.int64) for _ in range(world_size)],
        n_computed=int(np.sum(hop <= layers - 1)),
        ghost=True,
    )
