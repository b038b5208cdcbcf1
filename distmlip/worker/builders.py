"""Each worker's graph for each call: partition, local graph, halo plan and ``prepare``.

Every worker receives the whole (replicated) structure and decides for itself, by the same
deterministic rule, whether to rebuild. All ranks therefore agree without a message:

* :class:`SkinGraphs` (halo exchange): partition, build the local graph with ``cutoff + skin``,
  resolve the halo plan with the peers, run the model's ``prepare``. With ``skin > 0`` the
  build is kept, and later calls re-select its edges shorter than the cutoff for as long as no
  atom has moved more than ``skin / 2`` and the cell, pbc and species are unchanged (a Verlet
  list): no partition, neighbour search, plan handshake or ``prepare``.
* :class:`~distmlip.worker.resident.ResidentSkinGraphs` (``resident``): the same, with the per-call
  work in torch on the worker's device and the neighbour search with vesin-torch.
* :class:`GhostGraphs`: the ghost baseline (:mod:`distmlip.exchange.ghost`), rebuilt at every call.

The geometric partitioners are deterministic (same code, same input bytes on every rank); a
rebuild still checks that every rank computed the same owners, because ranks that disagreed
would give wrong numbers without an error. ``metis`` runs on rank 0 only and is broadcast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from distmlip import trace
from distmlip.graphs.ghost import build_ghost_graph
from distmlip.graphs.halo import (
    LocalGraph,
    build_local_graph,
    edge_vectors,
    resolve_send_index,
    within_cutoff,
)
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure
from distmlip.options import GraphOptions
from distmlip.worker.engine import CallGraph, Prepared, call_graph, prepare, timed

__all__ = ["SkinGraphs", "GhostGraphs", "owners"]


def owners(structure: Structure, comm, partitioner: str, cutoff: float) -> np.ndarray:
    """The partition, the same on every rank (collective).

    ``metis`` needs the whole atom graph (O(N) memory and time), so only rank 0 computes it
    and sends the owners; the geometric partitioners are cheap numpy on the replicated
    positions, computed by every rank and checked to agree.
    """
    if partitioner == "metis" and comm.world_size > 1:
        owner = (
            partition(structure, comm.world_size, partitioner, cutoff) if comm.rank == 0 else None
        )
        return comm.broadcast_int64(owner, structure.n_atoms)
    owner = partition(structure, comm.world_size, partitioner, cutoff)
    if comm.world_size > 1:
        digest = int.from_bytes(hashlib.blake2b(owner.tobytes(), digest_size=7).digest())
        if comm.allreduce_int(digest, "max") != -comm.allreduce_int(-digest, "max"):
            raise RuntimeError(
                f"the workers computed different {partitioner!r} partitions of the same "
                "structure (a bug: please report it)"
            )
    return owner


@dataclass(frozen=True)
class _Built:
    """The structure a kept skin graph was built for."""

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray

    def holds(self, structure: Structure, skin: float) -> bool:
        """Every edge shorter than the cutoff is still in the graph built with ``skin``.

        Raw displacements, not minimum-image ones: an atom wrapped back into the cell changes
        the image shifts of its edges, so it must trigger a rebuild.
        """
        if structure.positions.shape != self.positions.shape or not (
            np.array_equal(structure.cell, self.cell)
            and np.array_equal(structure.pbc, self.pbc)
            and np.array_equal(structure.numbers, self.numbers)
        ):
            return False
        displacement = structure.positions - self.positions
        largest = np.sqrt(np.einsum("ij,ij->i", displacement, displacement).max())
        # Two atoms approach by at most twice the largest displacement.
        return bool(2.0 * largest < skin)


class _Graphs:
    """What every builder holds: the model, the partitioner, and the device and dtype its
    call graphs' inputs are made in."""

    def __init__(self, model, options: GraphOptions, device: torch.device, dtype: torch.dtype):
        self.model, self.partitioner = model, options.partitioner
        self.device, self.dtype = torch.device(device), dtype

    def _call(self, graph, structure, comm, vectors, prepared, timings, **selection) -> CallGraph:
        """``graph`` as a call graph (``selection``: ``kept_edges``, ``built``, ``skin_edges``)."""
        return call_graph(
            self.model,
            graph,
            structure,
            comm,
            self.dtype,
            self.device,
            vectors=vectors,
            prepared=prepared,
            timings=timings,
            **selection,
        )


class SkinGraphs(_Graphs):
    """Halo-exchange graphs, kept and re-selected under a Verlet skin (``options.skin > 0``),
    as :class:`~distmlip.worker.engine.CallGraph` s with their inputs on ``device`` in
    ``dtype``."""

    def __init__(self, model, options: GraphOptions, device: torch.device, dtype: torch.dtype):
        super().__init__(model, options, device, dtype)
        self.skin = options.skin
        self._kept: tuple[_Built, LocalGraph, Prepared, np.ndarray] | None = None

    def get(self, structure: Structure, comm) -> CallGraph:
        """This call's graph (collective when it rebuilds; every rank decides alike)."""
        kept, cutoff = self._kept, self.model.cutoff
        timings = {"partition": 0.0, "prepare": 0.0}
        if kept is not None and kept[0].holds(structure, self.skin):
            _, skin_graph, prepared, shift_vectors = kept
            with timed(timings, "graph"):
                graph, vectors, index = within_cutoff(skin_graph, structure, cutoff, shift_vectors)
            return self._call(
                graph,
                structure,
                comm,
                vectors,
                prepared,
                timings,
                kept_edges=index,
                built=False,
                skin_edges=len(skin_graph.edges),
            )
        self._kept = None  # a failure below must not leave the previous graph to be reused
        with timed(timings, "partition"):
            owner = owners(structure, comm, self.partitioner, cutoff)
        index, skin_edges = None, 0  # without a skin: the graph built, every edge of it
        with timed(timings, "graph"):  # includes "prepare"
            graph, vectors, prepared = self._build(structure, comm, owner, timings)
            if self.skin > 0:
                shift_vectors = graph.edges.shifts @ structure.cell
                built = _Built(
                    structure.positions.copy(),
                    structure.cell.copy(),
                    structure.pbc.copy(),
                    structure.numbers.copy(),
                )
                self._kept = (built, graph, prepared, shift_vectors)
                skin_edges = len(graph.edges)
                graph, vectors, index = within_cutoff(
                    graph, structure, cutoff, shift_vectors, vectors
                )
        return self._call(
            graph,
            structure,
            comm,
            vectors,
            prepared,
            timings,
            kept_edges=index,
            skin_edges=skin_edges,
        )

    def _build(self, structure: Structure, comm, owner: np.ndarray, timings, pair_search=None):
        """The local graph with ``cutoff + skin``, its halo plan (the handshake with the peers),
        its (E, 3) edge vectors and the model's ``prepare`` of it (collective)."""
        cutoff = self.model.cutoff + self.skin
        graph = build_local_graph(structure, owner, comm.rank, comm.world_size, cutoff, pair_search)
        with trace.span("plan"):
            resolve_send_index(graph, comm.exchange_requests(graph.requests()))
        vectors = edge_vectors(graph, structure)
        with timed(timings, "prepare"):
            prepared = prepare(self.model, graph, structure, comm, vectors, owner, self.skin)
        return graph, vectors, prepared


class GhostGraphs(_Graphs):
    """The ghost baseline's graphs: owned atoms plus ``num_layers`` hops, every call."""

    def get(self, structure: Structure, comm) -> CallGraph:
        model, timings = self.model, {}
        with timed(timings, "partition"):
            owner = owners(structure, comm, self.partitioner, model.cutoff)
        with timed(timings, "graph"):
            graph = build_ghost_graph(
                structure, owner, comm.rank, comm.world_size, model.cutoff, model.num_layers
            )
            vectors = edge_vectors(graph, structure)
            with timed(timings, "prepare"):
                prepared = prepare(model, graph, structure, comm, vectors, owner)
        return self._call(graph, structure, comm, vectors, prepared, timings)
