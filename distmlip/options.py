"""Options of the worker processes, checked before anything starts (one ``ValueError`` each)."""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from dataclasses import dataclass

__all__ = [
    "WorkerOptions",
    "GraphOptions",
    "HALO_MODES",
    "ALLOCATORS",
    "DTYPES",
    "DEVICES",
    "BACKENDS",
    "MAX_TIMEOUT",
    "resolve_backend",
]

ALLOCATORS = ("keep", "system")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
PARTITIONER_NAMES = ("slab", "rcb", "metis")
"""The partitioners of :mod:`distmlip.graphs.partition`, for choices (the command line's)."""
MAX_TIMEOUT = 1e6
"""Seconds (11.6 days): beyond this the operating system's waits overflow."""
MAX_WORKERS_PER_CORE = 16
"""More CPU workers than this per core is a typo, not a plan (each one is a Python process)."""


def resolve_backend(device: str, backend: str) -> str:
    """The torch.distributed backend that ``backend`` means on ``device``: "nccl" or "gloo"."""
    if backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    return backend


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WorkerOptions:
    """How the workers run; every field is checked here, before anything starts.

    Attributes:
        nprocs: number of workers P (a positive integer).
        device: ``"cpu"`` or ``"cuda"`` (worker r on GPU r mod #GPUs).
        backend: ``"auto"`` (NCCL on ``"cuda"``, gloo on ``"cpu"``), ``"nccl"`` (one GPU per
            worker) or ``"gloo"`` (on ``"cuda"``: several workers may share a GPU; halo
            transfers go through host memory, so slower than NCCL).
        dtype: ``"float64"`` or ``"float32"``.
        timeout: seconds (finite, > 0); bounds every collective and every call.
        threads_per_worker: torch threads per worker (default: cores // P, at least 1). Where
            the cores suffice, each worker is pinned to its own cores.
        allocator: ``"keep"`` (workers keep freed memory mapped: no page faults at every
            step, somewhat higher peak memory; see :data:`KEEP_MEMORY_ENVIRONMENT`) or
            ``"system"`` (the C library's defaults: lowest peak memory).
        checkpoint: activation checkpointing: keep only each message-passing layer's
            boundaries for the backward and recompute its inside, its edges in chunks
            (``True``: :data:`DEFAULT_CHUNK_EDGES` edges per chunk; or a
            positive integer: that many). Same numbers to round-off; see docs/performance.md.
        memory_limit: GB (2^30 bytes) of memory each CPU worker may use, or None (no bound):
            its data segment is capped (Linux ``RLIMIT_DATA``) before the model loads, so a
            call that needs more raises :class:`~distmlip.OutOfMemoryError` instead of the
            kernel's out-of-memory killer ending the worker (:mod:`distmlip.worker.memory`).
        local_workers: workers on this machine, when ``nprocs`` spans several machines (a
            torchrun/SLURM job, :mod:`distmlip.cluster.launch`); None: all ``nprocs``. Sets the
            default threads per worker and the GPUs needed here.
    """

    nprocs: int = 2
    device: str = "cpu"
    dtype: str = "float64"
    timeout: float = 600.0
    threads_per_worker: int | None = None
    allocator: str = "keep"
    backend: str = "auto"
    checkpoint: bool | int = False
    memory_limit: float | None = None
    local_workers: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "nprocs", positive_int("nprocs", self.nprocs))
        if self.local_workers is not None:
            local = positive_int("local_workers", self.local_workers)
            object.__setattr__(self, "local_workers", min(local, self.nprocs))
        here = self.local_workers or self.nprocs
        if self.threads_per_worker is not None:
            threads = positive_int("threads_per_worker", self.threads_per_worker)
            object.__setattr__(self, "threads_per_worker", threads)
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, numbers.Real):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not (math.isfinite(self.timeout) and 0 < self.timeout <= MAX_TIMEOUT):
            raise ValueError(
                f"timeout must be a finite number of seconds > 0 and <= {MAX_TIMEOUT:g}, "
                f"got {self.timeout}"
            )
        object.__setattr__(self, "timeout", float(self.timeout))
        from distmlip.options import check_memory_limit

        object.__setattr__(self, "memory_limit", check_memory_limit(self.memory_limit))
        checkpoint = self.checkpoint
        if not isinstance(checkpoint, bool) and not (
            isinstance(checkpoint, numbers.Integral) and checkpoint >= MIN_CHUNK_EDGES
        ):
            raise ValueError(
                f"checkpoint must be True, False or a number of edges per chunk >= "
                f"{MIN_CHUNK_EDGES}, got {checkpoint!r}"
                + (" (use True for the default chunks)" if checkpoint == 1 else "")
            )
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("backend='nccl' needs device='cuda'; use backend='gloo' on the CPU")
        if self.device == "cuda" and self.memory_limit is not None:
            raise ValueError(
                "memory_limit bounds CPU workers; on device='cuda' the GPU's memory is the "
                "bound (running out of it is an OutOfMemoryError too): use memory_limit=None"
            )
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but torch sees no GPU; use device='cpu'")
            gpus = torch.cuda.device_count()
            # A launched job's tasks may each see only their own GPU: cuda:LOCAL_RANK mod count.
            nccl = resolve_backend(self.device, self.backend) == "nccl"
            if nccl and self.local_workers is None and here > gpus:
                raise ValueError(
                    f"nprocs={here} NCCL workers need one GPU each, but torch sees {gpus}; use "
                    f"nprocs <= {gpus}, or backend='gloo' to let several workers share a GPU "
                    "(slower: transfers go through host memory)"
                )
        cores = os.cpu_count() or 1
        if (self.threads_per_worker or 1) > MAX_WORKERS_PER_CORE * cores:
            raise ValueError(
                f"threads_per_worker={self.threads_per_worker} is more than "
                f"{MAX_WORKERS_PER_CORE} per core ({cores} cores here); use at most {cores}"
            )
        if self.device == "cpu" and here > MAX_WORKERS_PER_CORE * cores:
            raise ValueError(
                f"nprocs={here} is more than {MAX_WORKERS_PER_CORE} worker processes per "
                f"core ({cores} cores here); use nprocs <= {MAX_WORKERS_PER_CORE * cores}"
            )

    @property
    def threads(self) -> int:
        here = self.local_workers or self.nprocs
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // here)


HALO_MODES = ("exchange", "ghost")


@dataclass(frozen=True)
class GraphOptions:
    """How each worker gets its graph; checked here, before anything starts.

    Attributes:
        partitioner: ``"slab"``, ``"rcb"`` or ``"metis"`` (needs pymetis).
        halo: ``"exchange"`` (zero redundancy) or ``"ghost"`` (the recomputing baseline).
        skin: Å (finite, >= 0): graphs are built with ``cutoff + skin`` and reused while they
            hold (exchange mode only: ``halo="ghost"`` rebuilds at every call).
        resident: the per-call graph work (skin check, edge vectors, edge selection, model
            inputs) in torch on the worker's device, and the neighbour search with vesin-torch
            there (:mod:`distmlip.worker.resident`); ``None`` (default): on for ``device="cuda"``,
            off on the CPU. Same numbers as off, to round-off. Exchange mode only.
    """

    partitioner: str = "slab"
    halo: str = "exchange"
    skin: float = 0.0
    resident: bool | None = None

    def __post_init__(self):
        from distmlip.graphs.partition import check_partitioner

        check_partitioner(self.partitioner)
        if self.halo not in HALO_MODES:
            raise ValueError(f"halo must be one of {HALO_MODES}, got {self.halo!r}")
        skin = self.skin
        if (
            isinstance(skin, bool)
            or not isinstance(skin, numbers.Real)
            or not math.isfinite(skin)
            or skin < 0
        ):
            raise ValueError(f"skin must be a finite number of Å >= 0, got {skin!r}")
        if skin > 0 and self.halo != "exchange":
            raise ValueError(
                f"skin={skin} needs halo='exchange': the ghost baseline rebuilds its graphs "
                "at every call; use skin=0 with halo='ghost'"
            )
        object.__setattr__(self, "skin", float(skin))
        if not (self.resident is None or isinstance(self.resident, bool)):
            raise ValueError(f"resident must be True, False or None, got {self.resident!r}")
        if self.resident and self.halo != "exchange":
            raise ValueError("resident=True needs halo='exchange'; use resident=False with ghost")

    def resident_on(self, device: str) -> bool:
        """Whether the workers on ``device`` take the resident path (``None``: on CUDA)."""
        resident = self.resident
        if resident is None:
            resident = device == "cuda" and self.halo == "exchange"
        if resident and importlib.util.find_spec("vesin_torch") is None:
            raise ValueError(
                "resident=True (the default on device='cuda') needs vesin-torch: "
                "pip install vesin-torch, or pass resident=False"
            )
        return resident

    def check_model(self, model) -> None:
        """Refuse settings the model cannot run with."""
        if self.halo == "ghost" and not model.num_layers:
            raise ValueError(
                f"halo='ghost' needs the model's number of message-passing layers, which "
                f"{type(model).__name__} does not declare; use halo='exchange'"
            )
        max_skin = model.max_skin or model.cutoff
        if self.skin > max_skin:
            raise ValueError(
                f"skin={self.skin} Å is more than {type(model).__name__} supports "
                f"({max_skin:g} Å); 0.5-1 Å suits MD at 1-2 fs"
            )


def check_memory_limit(value) -> float | None:
    """``value`` as a float number of GB (positive, finite), or None; else ``ValueError``."""
    import numbers

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"memory_limit must be a number of GB > 0 or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"memory_limit must be a finite number of GB > 0, got {value!r}")
    if not sys.platform.startswith("linux"):
        raise ValueError("memory_limit needs Linux (RLIMIT_DATA); use memory_limit=None")
    return float(value)


DEFAULT_CHUNK_EDGES = 32768
"""Edges per chunk with ``checkpoint=True``. Adapters sum a layer's edge messages chunk by
chunk, each chunk a checkpoint region, so the backward holds one chunk's edge activations at a
time (MACE-MP-medium: ~30 kB per edge in float32, so ~1 GB per chunk; CHGNet ~3 kB)."""


MIN_CHUNK_EDGES = 64
"""Fewer edges per chunk than this is a typo (``checkpoint=1`` for ``True``), not a plan."""
