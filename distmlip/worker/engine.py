"""One distributed evaluation on one worker: energies, forces and virial from its local graph.

All workers run :func:`evaluate` at the same time (SPMD). The model's forward exchanges halo
features between layers; the backward pass, run on every rank together, returns halo gradients
to their owners through the same exchange. Forces and virial come from the gradient of the
energy with respect to the edge vectors g_e = ∂E/∂v_e:

    ∂E/∂x_sender += g_e,   ∂E/∂x_receiver −= g_e        (summed back to owners for halo rows)
    virial contribution  Σ_e g_e ⊗ v_e  = V σ  (ASE sign: σ = (1/V) ∂E/∂ε)

The caller sums the per-worker energies and virials; forces of owned atoms are disjoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from distmlip import trace
from distmlip.exchange.comm import Communicator
from distmlip.exchange.ghost import GhostExchange
from distmlip.exchange.protocol import Exchange, GraphTopology, RowDeclarer
from distmlip.graphs.halo import HaloPlan, LocalGraph, edge_vectors
from distmlip.graphs.structure import Structure
from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.trace import Trace

__all__ = [
    "WorkerResult",
    "Prepared",
    "CallGraph",
    "prepare",
    "call_graph",
    "call_exchange",
    "evaluate",
    "graph_inputs",
    "timed",
]


@dataclass
class WorkerResult:
    """What one worker returns for its owned atoms.

    Attributes:
        global_index: (n_owned,) global indices of the owned atoms.
        energy: Σ of owned per-atom energies, eV.
        energies: (n_owned,) per-atom energies, eV.
        forces: (k, 3) eV/Å, contributions to the atoms ``force_index``, or None. With halo
            exchange these are the owned atoms' total forces; in the ghost baseline they include
            partial forces on ghost atoms, which the driver adds to their owners'.
        force_index: (k,) global atom index of each ``forces`` row.
        virial: (3, 3) Σ_e g_e ⊗ v_e over local edges, eV (symmetrised by the caller), or None.
        timings: seconds spent per phase.
        stats: sizes (atoms, halo, edges, bytes exchanged).
        site_properties: extra per-owned-atom outputs of the model, name → (n_owned, ...)
            array (e.g. CHGNet's ``magmoms``); see ``DistributedModel.site_properties``.
        trace: the worker's :class:`~distmlip.trace.Trace` of the call when one was asked for.
    """

    global_index: np.ndarray
    energy: float
    energies: np.ndarray
    forces: np.ndarray | None
    force_index: np.ndarray | None
    virial: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    site_properties: dict[str, np.ndarray] = field(default_factory=dict)
    trace: Trace | None = None


@dataclass
class Prepared:
    """What ``model.prepare`` derived from one graph build, and the plans of its row kinds."""

    value: Any
    row_plans: dict[str, HaloPlan]


def topology(
    graph: LocalGraph,
    structure: Structure,
    vectors: np.ndarray | None = None,
    owner: np.ndarray | None = None,
    skin: float = 0.0,
) -> GraphTopology:
    """The numpy view of a local graph that ``prepare`` sees."""
    if owner is not None:
        row_owner = np.asarray(owner, dtype=np.int64)[graph.global_index]
    else:
        row_owner = np.concatenate(
            [np.full(graph.n_owned, graph.rank, dtype=np.int64), graph.halo_owner]
        ).astype(np.int64)
    edges = graph.edges
    return GraphTopology(
        rank=graph.rank,
        world_size=graph.world_size,
        n_atoms=structure.n_atoms,
        n_owned=graph.n_owned,
        global_index=graph.global_index,
        row_owner=row_owner,
        receivers=edges.receivers,
        senders=edges.senders,
        shifts=edges.shifts,
        vectors=edge_vectors(graph, structure) if vectors is None else vectors,
        skin=float(skin),
    )


def prepare(
    model: DistributedModel,
    graph: LocalGraph,
    structure: Structure,
    comm: Communicator,
    vectors: np.ndarray | None = None,
    owner: np.ndarray | None = None,
    skin: float = 0.0,
) -> Prepared:
    """Run ``model.prepare`` on a newly built graph (collective: every rank calls it)."""
    declarer = RowDeclarer(comm)
    value = model.prepare(topology(graph, structure, vectors, owner, skin), declarer)
    return Prepared(value, declarer.plans)


@dataclass
class CallGraph:
    """One call's graph, ready for :func:`evaluate`, and what it took to get it.

    Attributes:
        graph: the local graph: rows, halo plan and (on the host) the call's edges; built for
            this call, or the kept one the edges were selected from (``inputs.kept_edges``).
        inputs: the model inputs on the worker's device, in its dtype, with the model's
            ``prepare`` value (``inputs.prepared``) and the kept edges' index.
        prepared: what ``model.prepare`` gave for the graph built last, and its row plans.
        built: True if this call partitioned and built (False: reused under the skin).
        timings: seconds of ``partition``, ``graph`` (build, plan, prepare), ``prepare`` and
            ``inputs``.
        skin_edges: edges of the kept skin graph (0 without skin).
        on_device: the inputs were made on the device (:mod:`distmlip.worker.resident`), not
            copied from the host.
    """

    graph: LocalGraph
    inputs: GraphInputs
    prepared: Prepared
    built: bool
    timings: dict[str, float]
    skin_edges: int = 0
    on_device: bool = False


def call_graph(
    model: DistributedModel,
    graph: LocalGraph,
    structure: Structure,
    comm: Communicator,
    dtype: torch.dtype,
    device: torch.device,
    *,
    vectors: np.ndarray | None = None,
    prepared: Prepared | None = None,
    kept_edges: np.ndarray | None = None,
    built: bool = True,
    timings: dict[str, float] | None = None,
    skin_edges: int = 0,
) -> CallGraph:
    """A host-built ``graph`` (its (E, 3) float64 edge ``vectors`` computed if not given) as a
    :class:`CallGraph`: ``prepare`` run if no ``prepared`` (collective), inputs on ``device``."""
    timings = {} if timings is None else timings
    if vectors is None:
        vectors = edge_vectors(graph, structure)
    if prepared is None:
        with timed(timings, "prepare"):
            prepared = prepare(model, graph, structure, comm, vectors)
    with timed(timings, "inputs"):
        inputs = graph_inputs(graph, structure, dtype, device, vectors)
        if kept_edges is not None:
            inputs.kept_edges = torch.as_tensor(kept_edges, dtype=torch.int64, device=device)
        inputs.prepared = prepared.value
    return CallGraph(graph, inputs, prepared, built, timings, skin_edges)


def call_exchange(
    call: CallGraph, comm: Communicator, checkpoint: bool | int = False
) -> Exchange | GhostExchange:
    """The ``exchange`` the model gets for ``call``: halo exchange through ``comm``, or the
    ghost baseline's (nothing exchanged). ``checkpoint``: :mod:`distmlip.exchange.checkpoint`."""
    graph = call.graph
    if graph.ghost:
        return GhostExchange(graph.n_computed, graph.n_local, checkpoint)
    return Exchange(comm, graph.plan, call.prepared.row_plans, checkpoint)


def graph_inputs(
    graph: LocalGraph,
    structure: Structure,
    dtype: torch.dtype,
    device: torch.device,
    vectors: np.ndarray | torch.Tensor | None = None,
) -> GraphInputs:
    """Tensors of the local graph; edge vectors (given, or computed here) are float64, then cast.

    ``vectors`` may be a tensor on ``device`` already (then only cast, never copied via the host).
    """
    edges = graph.edges
    if vectors is None:
        vectors = edge_vectors(graph, structure)
    return GraphInputs(
        numbers=torch.as_tensor(structure.numbers[graph.global_index], device=device),
        vectors=torch.as_tensor(vectors, dtype=dtype, device=device),
        receivers=torch.as_tensor(edges.receivers, device=device),
        senders=torch.as_tensor(edges.senders, device=device),
        n_owned=graph.n_computed,
        system=dict(structure.system),
    )


class timed:  # noqa: N801 (used like a function: ``with timed(timings, "forward"):``)
    """Time a block into ``timings[name]`` (s) and mark it as a trace span."""

    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name
        self.span = trace.span(name)

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.span.__enter__()

    def __exit__(self, *exc) -> None:
        self.span.__exit__(*exc)
        self.timings[self.name] = time.perf_counter() - self.start


def _edge_gradients(energy: torch.Tensor, vectors: torch.Tensor, outputs: list) -> torch.Tensor:
    """(E, 3) ∂E/∂v_e. Collective: every rank runs the backward of every exchange."""
    # Zero-weighted ties make every exchange part of this rank's backward graph, so each
    # rank answers every reverse exchange its peers post (same order on every rank).
    ties = sum((out.sum() * 0.0 for out in outputs), energy.new_zeros(()))
    objective = energy + ties
    gradient = None
    if objective.requires_grad:
        (gradient,) = torch.autograd.grad(objective, vectors, allow_unused=True)
    return torch.zeros_like(vectors) if gradient is None else gradient.detach()


def evaluate(
    model: DistributedModel,
    call: CallGraph,
    exchange: Exchange | GhostExchange,
    comm: Communicator,
    compute_forces: bool = True,
) -> WorkerResult:
    """Run the model on this worker's call graph; see the module docstring.

    ``exchange``: :func:`call_exchange` of ``call`` (through ``comm``, whose counters and
    outputs this call starts afresh). ``compute_forces``: also forces and virial (the backward).
    Collective: every worker evaluates its call graph of the same structure at the same time.
    """
    graph, inputs = call.graph, call.inputs
    timings: dict[str, float] = {}
    phase = partial(timed, timings)
    inputs.vectors.requires_grad_(compute_forces)
    comm.reset()

    direct = bool(getattr(model, "direct_forces", False))
    with phase("forward"), torch.set_grad_enabled(compute_forces and not direct):
        output = model(inputs, exchange)
        energies, site_outputs = output if isinstance(output, tuple) else (output, {})
        site_outputs = dict(site_outputs)
        predicted_forces = site_outputs.pop("forces", None) if direct else None
        if direct and (predicted_forces is None or predicted_forces.shape[-1:] != (3,)):
            raise RuntimeError(
                f"{type(model).__name__} declares direct_forces but returned no (n, 3) forces"
            )
        if set(site_outputs) != set(model.site_properties):
            raise RuntimeError(
                f"{type(model).__name__} returned per-atom outputs {sorted(site_outputs)}, "
                f"but declares site_properties {sorted(model.site_properties)}"
            )
        if energies.shape != (graph.n_computed,):
            raise RuntimeError(
                f"{type(model).__name__} returned energies of shape {tuple(energies.shape)}, "
                f"expected ({graph.n_computed},)"
            )
        energies = energies[: graph.n_owned]
        energy = energies.sum()
        site_properties = {
            name: value[: graph.n_owned].detach().double().cpu().numpy()
            for name, value in site_outputs.items()
        }

    forces = virial = None
    if compute_forces and direct:  # owned rows only, also in the ghost baseline; no virial
        forces = predicted_forces[: graph.n_owned].detach().double().cpu().numpy()
    elif compute_forces:
        with phase("backward"):
            edge_gradients = _edge_gradients(energy, inputs.vectors, comm.outputs)
        with phase("forces"):
            gradient = edge_gradients.new_zeros((graph.n_local, 3))
            gradient.index_add_(0, inputs.senders, edge_gradients)
            gradient.index_add_(0, inputs.receivers, -edge_gradients)
            if graph.ghost:  # the driver sums ghost rows into their owners
                forces = -gradient.double().cpu().numpy()
            else:
                forces = -comm.reverse_sum(gradient, graph.plan).double().cpu().numpy()
            vectors64 = inputs.vectors.detach().double()
            virial = (edge_gradients.double().T @ vectors64).cpu().numpy()

    # The exchange outputs reference their autograd nodes, whose contexts reference the
    # communicator that holds the outputs: a cycle through C++ that Python's collector cannot
    # break (it leaked ~1 MB per call). Drop the outputs and the model's per-call tensors.
    comm.outputs.clear()
    stats = {
        "owned_atoms": graph.n_owned,
        "halo_atoms": graph.n_halo,
        "computed_atoms": graph.n_computed,
        "edges": int(inputs.receivers.shape[0]),
        "exchanges": comm.calls,
        "bytes_sent": comm.bytes_sent,
        "checkpoint_regions": getattr(exchange, "regions", 0),
    }
    timings["communication"] = comm.seconds
    return WorkerResult(
        global_index=graph.global_index[: graph.n_owned],
        force_index=graph.global_index[: len(forces)] if forces is not None else None,
        energy=float(energy.detach().double()),
        energies=energies.detach().double().cpu().numpy(),
        forces=forces,
        virial=virial,
        timings=timings,
        stats=stats,
        site_properties=site_properties,
    )
