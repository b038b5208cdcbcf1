"""The ghost baseline: what zero-redundancy exchange is measured against.

The conventional spatial decomposition (LAMMPS-style, as in SevenNet's and MACE's parallel
modes): each worker recomputes ``num_layers`` graph hops of ghost atoms around its owned ones
and exchanges nothing between layers. Results are identical to halo exchange; the cost is the
redundant ghost work. Used with ``DistributedCalculator(..., halo="ghost")`` for benchmarks.
Everything the baseline needs is here: its graph builder and its ``exchange``.
"""

from __future__ import annotations

import numpy as np
import torch

from distmlip.checkpoint import CheckpointRegions
from distmlip.exchange import StructureRejected
from distmlip.graph import EdgeList, Structure, neighbor_list, neighborhood_mask
from distmlip.halo import LocalGraph

__all__ = ["build_ghost_graph", "GhostExchange"]


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


class GhostExchange(CheckpointRegions):
    """The ghost baseline's ``exchange``: ghost rows are recomputed, nothing is fetched.

    The outermost ghosts only ever matter through their species (layer 0); at later layers they
    feed nodes whose features are already out of their exact range, so zeros serve.
    """

    def __init__(self, n_computed: int, n_local: int, checkpoint: bool | int = False):
        self.n_owned, self.n_local = n_computed, n_local
        self._init_checkpointing(checkpoint)  # no collectives: nothing to replay

    def _outer(self, computed: torch.Tensor) -> torch.Tensor:
        return computed.new_zeros((self.n_local - self.n_owned, *computed.shape[1:]))

    def __call__(self, computed: torch.Tensor) -> torch.Tensor:
        return torch.cat([computed, self._outer(computed)])

    def start(self, computed: torch.Tensor):
        return computed, _Ready(self._outer(computed))

    def rows(self, kind: str):
        raise NotImplementedError("the ghost baseline does not exchange declared row kinds")

    def sum_over_ranks(self, value: int) -> int:
        raise NotImplementedError("the ghost baseline runs no collectives")

    def reject_if(self, condition: bool, message: str) -> None:
        # No collectives here, and none to leave waiting: a worker refuses on its own.
        if condition:
            raise StructureRejected(message)

    def forward_exchange(self, feats: torch.Tensor, out: torch.Tensor, width: int) -> None:
        out.copy_(feats)

    def reverse_exchange(self, grad: torch.Tensor, gout: torch.Tensor, width: int) -> None:
        gout.zero_()
        gout[: self.n_owned] = grad[: self.n_owned]


class _Ready:
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def finish(self) -> torch.Tensor:
        return self.rows
