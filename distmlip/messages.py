"""What the driver and its workers send each other (both import this; neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distmlip.options import GraphOptions, WorkerOptions

STARTUP_ID = 0
"""Request id of the ``ready`` message; evaluation requests count from 1."""


STARTUP_TIMEOUT = 300.0
"""Seconds allowed for workers to start, unless the call timeout is longer."""


@dataclass(frozen=True)
class EvaluationRequest:
    """What the driver sends every worker for one evaluation.

    Attributes:
        structure: the replicated :class:`~distmlip.graphs.structure.Structure`. Each worker
        partitions
            it and decides alone, by the same rule as its peers, whether its kept graph still
            holds (:mod:`distmlip.worker.builders`). Or a :class:`distmlip.messages.Moved`: new
            positions and cell for the structure of an earlier request, which the worker kept.
        compute_forces: also forces and virial.
        trace: record a :class:`~distmlip.trace.Trace` of the call and return it.
    """

    structure: object
    compute_forces: bool = True
    trace: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker is told once, at start: who it is, where the workers meet, and the
    calculator's settings whole, as the driver validated them.

    Attributes:
        rank, world_size: this worker's rank among ``world_size``.
        init_method: where the process group meets (a private file store), unless ``store``.
        parent_pid: the driver's pid (a worker that finds another parent exits).
        options: the workers' :class:`~distmlip.options.WorkerOptions` (device, dtype,
            timeout, backend, checkpoint, memory_limit, ...).
        graph: the :class:`~distmlip.options.GraphOptions` (partitioner, halo, skin), with
            ``resident`` resolved to a bool for the device.
        threads: torch threads of this worker; ``cores``: the cores it is pinned to, if any.
    """

    rank: int
    world_size: int
    init_method: str
    parent_pid: int
    options: WorkerOptions
    graph: GraphOptions
    threads: int
    cores: tuple[int, ...] = ()
    store: tuple[str, int, str] | None = None
    """``(host, port, prefix)``: form the process group through the TCP store of a
    torchrun/SLURM job (:mod:`distmlip.cluster.launch`) instead of ``init_method``."""
    local_rank: int | None = None
    """This worker's index on its machine (its GPU); None: ``rank``."""
    silence: float | None = None
    """Seconds without a word from the driver (requests or heartbeats) after which a worker
    on another rank of a launched job decides the driver is stopped or unreachable."""
    keep_memory: bool = False
    """Apply ``allocator="keep"`` in-process (workers not started by the driver)."""


@dataclass(frozen=True)
class Moved:
    """Request ``base``'s structure with new positions and cell (numbers, pbc, system kept)."""

    base: int
    positions: np.ndarray
    cell: np.ndarray


class StaleBase(RuntimeError):
    """A worker was asked to amend a structure it does not hold (a bug: the driver resends the
    complete structure to fresh workers)."""


def is_stale(error: BaseException) -> bool:
    """``error`` is the driver's report of a worker's :class:`StaleBase`."""
    return f"raised {StaleBase.__name__}: " in str(error)
