"""Local graphs and halo plans: what each worker computes and what it exchanges.

Worker p holds

* its *owned* atoms V_p (``owner == p``), first, in increasing global index;
* its *halo* H_p: atoms owned elsewhere that send an edge into V_p, after the owned rows,
  grouped by owner rank (ascending) and by global index within a group, so the rows arriving
  from each peer are one contiguous slice;
* exactly the edges whose receiver is owned, those with an owned sender (interior) first. Every
  edge of the global graph is therefore computed by exactly one worker, and every node update
  too (zero redundancy).

After each message-passing layer, worker q sends the rows of its owned atoms that p requested
(``send_index[p]``) and p overwrites its halo slice from q. The plan is resolved once per graph:
p tells q which global atoms it needs (``requests``), q turns them into local rows.
Everything here is numpy; :mod:`distmlip.exchange.comm` moves the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from distmlip import trace
from distmlip.graphs.neighbors import neighbor_list, neighborhood_mask
from distmlip.graphs.structure import EdgeList, Structure

__all__ = [
    "HaloPlan",
    "LocalGraph",
    "build_local_graph",
    "resolve_send_index",
    "build_all_local_graphs",
    "edge_vectors",
    "within_cutoff",
]


@dataclass(frozen=True)
class HaloPlan:
    """Which rows one rank sends to and receives from each peer, for any kind of row.

    Local rows are ``[owned..., halo...]``; halo rows from rank q form the contiguous slice
    ``n_owned + sum(recv_counts[:q]) ...`` (halo rows grouped by owner rank, ascending).
    The atom graph has one plan; models with bond features (CHGNet) build a second.

    Attributes:
        rank, world_size: this rank and P.
        n_owned: owned rows.
        recv_counts: (P,) int64 halo rows received from each rank (0 for ``rank``).
        send_index: P arrays of owned local rows to send to each rank (empty for ``rank``).
    """

    rank: int
    world_size: int
    n_owned: int
    recv_counts: np.ndarray
    send_index: tuple[np.ndarray, ...]

    @property
    def n_local(self) -> int:
        return self.n_owned + int(self.recv_counts.sum())

    @property
    def send_counts(self) -> np.ndarray:
        return np.array([len(index) for index in self.send_index], dtype=np.int64)


@dataclass
class LocalGraph:
    """The part of the atom graph one worker computes.

    Attributes:
        rank: this worker's rank p.
        world_size: number of workers P.
        global_index: (n_owned + n_halo,) int64 global atom index of each local row.
        n_owned: number of owned atoms (rows ``[0, n_owned)``).
        edges: edges in local row indices; every receiver is owned (< n_owned).
        recv_counts: (P,) int64, halo rows received from each rank; rows from rank q are
            ``[n_owned + offset_q, n_owned + offset_q + recv_counts[q])``, offsets ascending in q.
        send_index: per rank q, (k_q,) int64 owned local rows to send to q (empty for p itself);
            ``None`` until resolved with the peers' requests.
        n_computed: rows whose features the model updates (receivers of the edges). Equal to
            ``n_owned`` with halo exchange; larger in the ghost baseline
            (:func:`distmlip.graphs.ghost.build_ghost_graph`), where ghost rows are recomputed
            instead of exchanged.
        ghost: True for a ghost-baseline graph (no exchange; halo rows are ghosts).
    """

    rank: int
    world_size: int
    global_index: np.ndarray
    n_owned: int
    edges: EdgeList
    recv_counts: np.ndarray
    send_index: list[np.ndarray] | None = field(default=None)
    n_computed: int = -1
    ghost: bool = False

    def __post_init__(self) -> None:
        if self.n_computed < 0:
            self.n_computed = self.n_owned

    @property
    def n_local(self) -> int:
        return len(self.global_index)

    @property
    def n_halo(self) -> int:
        return self.n_local - self.n_owned

    @property
    def halo_owner(self) -> np.ndarray:
        """(n_halo,) owner rank of each halo row."""
        return np.repeat(np.arange(self.world_size), self.recv_counts)

    def requests(self) -> list[np.ndarray]:
        """Per rank q, the global indices of the halo rows this worker needs from q, in order."""
        halo = self.global_index[self.n_owned :]
        return np.split(halo, np.cumsum(self.recv_counts)[:-1])

    @property
    def plan(self) -> HaloPlan:
        """The resolved atom halo plan."""
        assert self.send_index is not None, "halo plan not resolved"
        return HaloPlan(
            self.rank, self.world_size, self.n_owned, self.recv_counts, tuple(self.send_index)
        )


def build_local_graph(
    structure: Structure,
    owner: np.ndarray,
    rank: int,
    world_size: int,
    cutoff: float,
    pair_search: Callable[[np.ndarray, float], tuple | None] | None = None,
) -> LocalGraph:
    """Build worker ``rank``'s local graph from the replicated structure and owner array.

    Only the owned atoms and a one-cell-list-bin shell around them enter the neighbour search,
    so time and memory are O(N/P + shell) beyond reading the O(N) positions.
    ``pair_search(region_atoms, cutoff)``: the half list ``(i, j, S)`` of those atoms from
    another search (vesin-torch on the device, :mod:`distmlip.worker.resident`), or None for
    vesin's.
    """
    owned_mask = owner == rank
    with trace.span("mask"):
        region = neighborhood_mask(
            structure.positions, structure.cell, structure.pbc, owned_mask, cutoff
        )
    region_atoms = np.flatnonzero(region)  # ascending global index; owned atoms included
    owned_in_region = owned_mask[region_atoms]
    # Only edges into owned atoms, in region indices (R ≈ N/P + shell). All bookkeeping below
    # is gathers from R-sized tables: no search or sort over the edges.
    # Interior edges (sender owned) come first: models that overlap the halo exchange with
    # interior work take them as one slice.
    with trace.span("neighbor_list"):
        pairs = None
        if pair_search is not None and len(region_atoms):
            pairs = pair_search(region_atoms, cutoff)
        local_edges = neighbor_list(
            structure.positions[region_atoms],
            structure.cell,
            structure.pbc,
            cutoff,
            receiver_mask=owned_in_region,
            senders_in_mask_first=True,
            pairs=pairs,
        )
    receivers, senders = local_edges.receivers, local_edges.senders

    owned_region = np.flatnonzero(owned_in_region)
    owned = region_atoms[owned_region]  # == np.flatnonzero(owned_mask)
    is_halo = np.zeros(len(region_atoms), dtype=bool)
    is_halo[senders] = True
    is_halo &= ~owned_in_region
    halo_region = np.flatnonzero(is_halo)  # ascending global index
    # Group by owner rank, global index within a group (stable sort keeps index order).
    halo_region = halo_region[np.argsort(owner[region_atoms[halo_region]], kind="stable")]
    halo = region_atoms[halo_region]
    global_index = np.concatenate([owned, halo])
    recv_counts = np.bincount(owner[halo], minlength=world_size).astype(np.int64)

    # Region index -> local row: owned rows first, then halo rows in plan order.
    local_row = np.full(len(region_atoms), -1, dtype=np.int64)
    local_row[owned_region] = np.arange(len(owned_region), dtype=np.int64)
    local_row[halo_region] = len(owned_region) + np.arange(len(halo_region), dtype=np.int64)
    edges = EdgeList(
        receivers=local_row[receivers], senders=local_row[senders], shifts=local_edges.shifts
    )
    return LocalGraph(
        rank=rank,
        world_size=world_size,
        global_index=global_index,
        n_owned=len(owned),
        edges=edges,
        recv_counts=recv_counts,
    )


def edge_vectors(
    graph: LocalGraph, structure: Structure, shift_vectors: np.ndarray | None = None
) -> np.ndarray:
    """(E, 3) float64 edge vectors v = x_sender + shift @ cell − x_receiver of ``graph``, Å.

    ``shift_vectors``: ``graph.edges.shifts @ structure.cell`` if the caller has it already.
    """
    positions = structure.positions[graph.global_index]
    edges = graph.edges
    if shift_vectors is None:
        shift_vectors = edges.shifts @ structure.cell
    vectors = positions[edges.senders]
    vectors -= positions[edges.receivers]
    vectors += shift_vectors
    return vectors


def within_cutoff(
    graph: LocalGraph,
    structure: Structure,
    cutoff: float,
    shift_vectors: np.ndarray | None = None,
    vectors: np.ndarray | None = None,
) -> tuple[LocalGraph, np.ndarray, np.ndarray]:
    """``graph`` cut down to the edges shorter than ``cutoff`` at ``structure``'s positions.

    The Verlet-skin reuse of a graph: one built with ``cutoff + skin`` still holds every edge
    shorter than ``cutoff`` as long as no atom has moved more than ``skin / 2`` since it was
    built (and the cell and the partition are unchanged), so re-selecting its edges gives the
    exact graph without a neighbour search. Rows, halo and plan are kept (halo rows that lost
    all their edges are still exchanged, harmlessly).

    ``shift_vectors``: as for :func:`edge_vectors` (the cell is the same at every reuse, so a
    caller can keep them). ``vectors``: ``graph``'s (E, 3) edge vectors at ``structure``'s
    positions, if the caller has computed them already (right after a build).

    Returns:
        The restricted graph (a new :class:`LocalGraph` sharing rows and plan), its
        (E', 3) float64 edge vectors, Å, and the (E',) index of each kept edge in ``graph``.
    """
    if vectors is None:
        vectors = edge_vectors(graph, structure, shift_vectors)
    kept = np.flatnonzero(np.einsum("ij,ij->i", vectors, vectors) < cutoff * cutoff)
    edges = graph.edges
    restricted = EdgeList(
        receivers=edges.receivers[kept], senders=edges.senders[kept], shifts=edges.shifts[kept]
    )
    return replace(graph, edges=restricted), vectors[kept], kept


def rows_of(owned_keys: np.ndarray, requests_from_peers: list[np.ndarray], rank: int) -> list:
    """Local rows of the keys each peer requested; ``owned_keys`` must be sorted ascending."""
    send_index = []
    for peer, requested in enumerate(requests_from_peers):
        rows = np.searchsorted(owned_keys, requested)
        if len(requested) and (
            rows.max() >= len(owned_keys) or not np.array_equal(owned_keys[rows], requested)
        ):
            raise RuntimeError(f"rank {peer} asked rank {rank} for rows it does not own")
        send_index.append(rows.astype(np.int64))
    return send_index


def resolve_send_index(graph: LocalGraph, requests_from_peers: list[np.ndarray]) -> None:
    """Fill ``graph.send_index`` from the global indices each peer asked this worker for."""
    graph.send_index = rows_of(graph.global_index[: graph.n_owned], requests_from_peers, graph.rank)


def build_all_local_graphs(
    structure: Structure, owner: np.ndarray, world_size: int, cutoff: float
) -> list[LocalGraph]:
    """Every worker's local graph with resolved plans, in one process (tests, benchmarks)."""
    graphs = [build_local_graph(structure, owner, p, world_size, cutoff) for p in range(world_size)]
    requests = [graph.requests() for graph in graphs]
    for p, graph in enumerate(graphs):
        resolve_send_index(graph, [requests[q][p] for q in range(world_size)])
    return graphs
