"""The resident step: a kept skin graph's per-call work in torch, on the worker's device.

With ``resident`` (:class:`distmlip.options.GraphOptions`; on by default for
``device="cuda"``) a worker's graphs come from :class:`ResidentSkinGraphs`. The same code runs
on CPU tensors, which is how CI tests it against the numpy path of
:class:`distmlip.worker.builders.SkinGraphs`.

Per call, host → device: the positions, once (N × 3 float64; the cell stays on the host: a
kept graph is only reused while the cell is unchanged, so its shift vectors are fixed).
Everything else of a kept graph went to the device when it was built (:class:`DeviceGraph`):
the global atom of each edge's sender and receiver, its shift vector S·cell, its local rows,
the species of the local rows and the halo plans' send rows. On the device, with torch:
the largest displacement since the build (the skin check), the float64 edge vectors
x_sender + S·cell − x_receiver, the selection of the edges shorter than the cutoff and the
model inputs. The only device → host syncs per call are two scalars the host needs to go on:
the skin decision (one ``bool``) and, with ``skin > 0``, the number of selected edges
(``torch.nonzero``); then the model's own (e.g. CHGNet's angle count) and the results.

A rebuild stays on the host as without ``resident`` (partition, halo plan, the model's
``prepare``: numpy), except the neighbour search, which vesin-torch runs on the device; its
half list (i, j, S) comes to the host once for the plan (:func:`device_pairs`).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import torch

from distmlip import trace
from distmlip.errors import first_line
from distmlip.graphs.halo import HaloPlan, LocalGraph
from distmlip.graphs.neighbors import search_box
from distmlip.graphs.structure import Structure
from distmlip.models.base import GraphInputs
from distmlip.options import GraphOptions
from distmlip.worker.builders import SkinGraphs, owners
from distmlip.worker.engine import CallGraph, Prepared, timed

__all__ = ["DeviceGraph", "ResidentSkinGraphs", "device_pairs", "largest_displacement"]


def device_pairs(
    positions: torch.Tensor, cell: np.ndarray, pbc: np.ndarray, atoms: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """vesin-torch's half list ``(i, j, S)`` of ``positions[atoms]``, searched on their device
    and copied to the host once (the halo plan is numpy); the same pairs as vesin's.

    None where vesin-torch refuses the system (its CUDA search rejects, for instance, periodic
    cells thinner than twice the cutoff, which vesin's CPU search handles): the caller then
    searches on the host, exactly as without ``resident``.
    """
    from vesin_torch import NeighborList

    device = positions.device
    points = positions[torch.as_tensor(atoms, device=device)]
    box = torch.as_tensor(search_box(cell, pbc), dtype=torch.float64, device=device)
    periodic = torch.as_tensor(np.asarray(pbc, dtype=bool), device=device)
    try:
        with trace.span("vesin_torch"):
            # copy=True: tensors of their own (views into the search's buffers would dangle
            # once it is freed; on the CPU ``.cpu()`` does not copy).
            i, j, shifts = NeighborList(cutoff=float(cutoff), full_list=False).compute(
                points, box, periodic, quantities="ijS", copy=True
            )
            return i.cpu().numpy(), j.cpu().numpy(), shifts.cpu().numpy()
    except RuntimeError as error:
        trace.event("host_search", reason=first_line(error, ""))
        return None


def largest_displacement(positions: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max_i |x_i − x_i^ref| (a 0-d tensor), in the same float64 operations as the numpy path,
    elementwise then ``max`` (exact), so every rank and every device decides alike."""
    d = positions - reference
    return torch.sqrt((d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]).max())


def _plan_on(plan: HaloPlan, device: torch.device) -> HaloPlan:
    """``plan`` with its send rows as int64 tensors on ``device`` (uploaded once, here)."""
    rows = tuple(
        torch.as_tensor(index, dtype=torch.int64, device=device) for index in plan.send_index
    )
    return replace(plan, send_index=rows)


class DeviceGraph:
    """One built local graph and what each call needs of it, on the device (uploaded once).

    Attributes:
        graph: the built :class:`~distmlip.graphs.halo.LocalGraph` (``cutoff + skin``), its halo
            plan's send rows on the device (so no call uploads them again).
        prepared: the model's ``prepare`` of it, its row kinds' plans on the device.
        n_edges: edges of the built graph.
    """

    def __init__(
        self, graph: LocalGraph, structure: Structure, prepared: Prepared, positions: torch.Tensor
    ):
        device = positions.device

        def put(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(array), device=device)

        edges = graph.edges
        # What the graph was built for: private copies, never written to.
        self.positions = positions
        self.cell, self.pbc = structure.cell.copy(), structure.pbc.copy()
        self.numbers = structure.numbers.copy()
        self.sender_atoms = put(graph.global_index[edges.senders])
        self.receiver_atoms = put(graph.global_index[edges.receivers])
        self.shift_vectors = put(edges.shifts @ structure.cell)  # as the numpy path computes it
        self.receivers, self.senders = put(edges.receivers), put(edges.senders)
        self.local_numbers = put(structure.numbers[graph.global_index])
        self.graph = replace(graph, send_index=[put(rows) for rows in graph.send_index])
        plans = {kind: _plan_on(plan, device) for kind, plan in prepared.row_plans.items()}
        self.prepared = Prepared(prepared.value, plans)
        self.n_edges = len(edges)

    def holds(self, structure: Structure, positions: torch.Tensor, skin: float) -> bool:
        """Every edge shorter than the cutoff is still in the graph (see ``_Built.holds``)."""
        if tuple(positions.shape) != tuple(self.positions.shape) or not (
            np.array_equal(structure.cell, self.cell)
            and np.array_equal(structure.pbc, self.pbc)
            and np.array_equal(structure.numbers, self.numbers)
        ):
            return False
        # Host sync 1 of a call: the skin decision.
        return bool(2.0 * largest_displacement(positions, self.positions) < skin)

    def inputs(
        self, structure: Structure, positions: torch.Tensor, cutoff: float, select: bool
    ) -> GraphInputs:
        """The model inputs at ``positions`` (float64 vectors: the engine casts them).

        ``select``: only the edges shorter than ``cutoff`` (a graph built with a skin), with
        ``kept_edges`` their index in the built graph; else every edge, ``kept_edges`` None.
        """
        # x_sender − x_receiver + S·cell, in the numpy path's order of operations.
        vectors = positions[self.sender_atoms]
        vectors -= positions[self.receiver_atoms]
        vectors += self.shift_vectors
        receivers, senders, kept = self.receivers, self.senders, None
        if select:
            squared = (
                vectors[:, 0] * vectors[:, 0]
                + vectors[:, 1] * vectors[:, 1]
                + vectors[:, 2] * vectors[:, 2]
            )
            # Host sync 2 of a call: nonzero must know how many edges it selects.
            kept = torch.nonzero(squared < cutoff * cutoff).view(-1)
            vectors, receivers, senders = vectors[kept], receivers[kept], senders[kept]
        return GraphInputs(
            numbers=self.local_numbers,
            vectors=vectors,
            receivers=receivers,
            senders=senders,
            n_owned=self.graph.n_computed,
            kept_edges=kept,
            system=dict(structure.system),
        )


class ResidentSkinGraphs(SkinGraphs):
    """:class:`~distmlip.worker.builders.SkinGraphs` whose per-call work runs in torch on
    ``device``.

    The kept graph is a :class:`DeviceGraph`; it is dropped before any rebuild, so a failed
    rebuild never leaves the previous one to be reused.
    """

    def __init__(self, model, options: GraphOptions, device: torch.device, dtype: torch.dtype):
        super().__init__(model, options, device, dtype)
        self._kept: DeviceGraph | None = None

    def get(self, structure: Structure, comm) -> CallGraph:
        """This call's graph and its model inputs on the device (collective when rebuilding)."""
        # The call's one host → device copy. torch.tensor copies also on the CPU: the kept
        # graph's reference positions must not change with the caller's array.
        positions = torch.tensor(structure.positions, dtype=torch.float64, device=self.device)
        kept, cutoff, skin = self._kept, self.model.cutoff, self.skin
        timings = {"partition": 0.0, "prepare": 0.0}
        if kept is not None and kept.holds(structure, positions, skin):
            with timed(timings, "graph"):
                inputs = kept.inputs(structure, positions, cutoff, select=True)
            return self._on_device(kept, inputs, False, timings, kept.n_edges)
        self._kept = None
        with timed(timings, "partition"):
            owner = owners(structure, comm, self.partitioner, cutoff)
        with timed(timings, "graph"):  # includes "prepare"
            search = partial(device_pairs, positions, structure.cell, structure.pbc)
            graph, _, prepared = self._build(structure, comm, owner, timings, search)
            built = DeviceGraph(graph, structure, prepared, positions)
            if skin > 0:
                self._kept = built
            inputs = built.inputs(structure, positions, cutoff, select=skin > 0)
        return self._on_device(built, inputs, True, timings, built.n_edges if skin > 0 else 0)

    def _on_device(
        self, device_graph: DeviceGraph, inputs: GraphInputs, built: bool, timings, edges
    ):
        with timed(timings, "inputs"):  # on the device already: a cast there, no host copy
            inputs.vectors = inputs.vectors.detach().to(self.dtype)
            inputs.prepared = device_graph.prepared.value
        graph, prepared = device_graph.graph, device_graph.prepared
        return CallGraph(graph, inputs, prepared, built, timings, edges, on_device=True)
