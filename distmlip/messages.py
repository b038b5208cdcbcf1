"""What the driver and its workers send each other (both import this; neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    rank: int
    world_size: int
    init_method: str
    device: str
    dtype: str
    timeout: float
    threads: int
    parent_pid: int
    cores: tuple[int, ...] = ()
    partitioner: str = "slab"
    halo: str = "exchange"
    skin: float = 0.0
    checkpoint: bool | int = False
    backend: str = "auto"
    """``"auto"``, ``"nccl"`` or ``"gloo"`` (:func:`distmlip.options.resolve_backend`)."""
    memory_limit: float | None = None
    """GB, or None (:func:`distmlip.worker.memory.apply_memory_limit`)."""
    resident: bool = False
    """Per-call graph work in torch on the device (:mod:`distmlip.worker.resident`)."""
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
