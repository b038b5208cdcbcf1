"""Persistent local worker processes and the worker loop.

The calling process is a *driver*: it validates input, partitions, sends the replicated
structure to the P workers and assembles their owned-atom results. It never joins the process
group itself. Why: a driver that is not a rank can always time out, notice a dead worker through
its closed socket, kill the rest and stay usable; several calculators can live in one Python
process (torch.distributed allows one default group per process); and the user's process holds
no model activations. The cost is one copy of positions per call (24 bytes per atom).

Workers are fresh interpreters (``python -m distmlip._worker``), not ``multiprocessing`` children:
the user's script is never re-imported, so no ``if __name__ == "__main__"`` guard is needed. Each
talks to the driver over its own socket pair; a worker's death closes its end, which the driver
sees at once. Workers die with their parent (``PR_SET_PDEATHSIG`` on Linux, socket EOF
elsewhere) and are stopped by :meth:`WorkerPool.close`, the context manager, garbage collection
or interpreter exit.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

__all__ = ["WorkerPool", "WorkerError", "WorkerConfig", "EvaluationRequest"]


STARTUP_TIMEOUT = 300.0
"""Seconds allowed for workers to start, unless the call timeout is longer."""


KEEP_MEMORY_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc settings of workers with ``allocator="keep"`` (unless the caller's environment sets
them): serve all allocations from the heap and never give freed memory back to the kernel.
A worker's tensors have about the same sizes at every MD step; with glibc's defaults the large
ones are mapped afresh and unmapped when freed, so every step pays a page fault per 4 KiB it
touches. Measured (docs/performance.md, P=2): reference model, 32k atoms, 3.2-3.5 s
→ 1.3-1.4 s per MD step, peak RSS up to +40 % (heap fragmentation, bounded after a few steps);
CHGNet, 21,952 atoms, 49.8 s → 18.5 s per call after the first, peak RSS +21 %."""

ALLOCATORS = ("keep", "system")


class WorkerError(RuntimeError):
    """A worker died, raised, or did not answer within the timeout. The pool is closed."""


@dataclass(frozen=True)
class EvaluationRequest:
    """What the driver sends every worker for one evaluation.

    Attributes:
        structure: the replicated :class:`~distmlip.graph.Structure`.
        owner: (N,) int64 owning rank of each atom.
        compute_forces: also forces and virial.
        halo: ``"exchange"`` or ``"ghost"``.
        skin: Å added to the cutoff when a graph is built, so it can be reused.
        reuse: re-select the edges of the graph built at the last rebuild instead of building
            one (the driver checked that it still holds; ``owner`` is then the same as then).
    """

    structure: object
    owner: np.ndarray
    compute_forces: bool = True
    halo: str = "exchange"
    skin: float = 0.0
    reuse: bool = False


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


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_device(config: WorkerConfig):
    import torch

    if config.device == "cuda":
        local = config.rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(config.device)


def _worker_main(connection: Connection) -> None:
    """Entry point of one worker process: set up, then serve requests until told to stop."""
    config, model_bytes = connection.recv()
    _die_with_parent(config.parent_pid)
    os.environ["OMP_NUM_THREADS"] = str(config.threads)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(config.threads)
    if config.cores and hasattr(os, "sched_setaffinity"):
        # One disjoint set of cores per worker: no two workers' threads fight over a core.
        os.sched_setaffinity(0, config.cores)
    try:
        device = _worker_device(config)
        dtype = getattr(torch, config.dtype)
        model = pickle.loads(model_bytes)
        model = model.to(device=device, dtype=dtype).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if config.world_size > 1:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo",
                init_method=config.init_method,
                rank=config.rank,
                world_size=config.world_size,
                # Start-up (importing torch, rendezvous) can be slow on a loaded machine; each
                # exchange still waits at most `config.timeout` (see distmlip.comm).
                timeout=datetime.timedelta(seconds=max(config.timeout, STARTUP_TIMEOUT)),
            )
        connection.send(("ready", os.getpid()))
    except Exception:
        connection.send(("error", traceback.format_exc()))
        return
    try:
        _serve(config, model, device, dtype, connection)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _WorkerGraphs:
    """This worker's graph for each request: built, or re-selected from the last build.

    With ``skin > 0`` the graph built with ``cutoff + skin`` is kept; the driver says when it
    still holds (no atom moved more than skin / 2, same cell and owners) by sending
    ``reuse=True``, and its edges shorter than the cutoff are re-selected.
    """

    def __init__(self, config: WorkerConfig, model):
        self.config, self.model = config, model
        self.skin_graph = None
        self.shift_vectors = None  # skin_graph's shifts @ cell (the cell is fixed while reused)

    def get(self, request: EvaluationRequest, comm):
        """(local graph, its edge vectors or None) for ``request``; collective on a rebuild."""
        from distmlip.halo import (
            build_ghost_graph,
            build_local_graph,
            resolve_send_index,
            within_cutoff,
        )

        config, model, structure = self.config, self.model, request.structure
        if request.halo == "ghost":
            self.skin_graph = self.shift_vectors = None
            graph = build_ghost_graph(
                structure,
                request.owner,
                config.rank,
                config.world_size,
                model.cutoff,
                model.num_layers,
            )
            return graph, None
        if request.reuse and self.skin_graph is None:
            raise RuntimeError("asked to reuse a graph this worker has not built")
        if not request.reuse:
            cutoff = model.cutoff + request.skin
            graph = build_local_graph(
                structure, request.owner, config.rank, config.world_size, cutoff
            )
            resolve_send_index(graph, comm.exchange_requests(graph.requests()))
            if request.skin == 0:
                self.skin_graph = self.shift_vectors = None
                return graph, None
            self.skin_graph = graph
            self.shift_vectors = graph.edges.shifts @ structure.cell
        return within_cutoff(self.skin_graph, structure, model.cutoff, self.shift_vectors)


def _serve(config: WorkerConfig, model, device, dtype, connection: Connection) -> None:
    import torch

    from distmlip.comm import Communicator
    from distmlip.engine import evaluate

    graphs = _WorkerGraphs(config, model)
    while True:
        try:
            command, payload = connection.recv()
        except EOFError:  # the driver is gone
            return
        if command == "stop":
            return
        try:
            request: EvaluationRequest = pickle.loads(payload)
            structure = request.structure
            start = time.perf_counter()
            comm = Communicator(config.rank, config.world_size, device, config.timeout)
            graph, vectors = graphs.get(request, comm)
            graph_time = time.perf_counter() - start
            result = evaluate(
                model, graph, structure, comm, dtype, device, request.compute_forces, vectors
            )
            result.timings = {"graph": graph_time, **result.timings}
            result.stats["graph_reused"] = int(request.reuse)
            skin_graph = graphs.skin_graph
            result.stats["skin_edges"] = len(skin_graph.edges) if skin_graph is not None else 0
            # ru_maxrss is in KiB on Linux: the worker's high-water mark since it started.
            result.stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if device.type == "cuda":
                result.stats["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            connection.send(("ok", result))
            # Free this call's graph and tensors before the next request arrives, not during it.
            del graph, comm, result, vectors
        except Exception:
            connection.send(("error", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_processes(processes, connections, grace: float = 5.0) -> None:
    for connection in connections:
        try:
            connection.send(("stop", None))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
    for connection in connections:
        connection.close()


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close()


class WorkerPool:
    """P persistent worker processes that evaluate one model on partitioned structures.

    Args:
        model: a :class:`~distmlip.models.base.DistributedModel` (pickled to each worker once).
        nprocs: number of workers P.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, worker r on GPU r mod #GPUs).
        dtype: ``"float64"`` or ``"float32"``.
        timeout: seconds; bounds start-up, every collective and every call.
        threads_per_worker: torch threads per worker (default: cores // P, at least 1).
            Where the cores suffice, each worker is pinned to its own ``threads_per_worker``
            cores.
        allocator: ``"keep"`` (workers keep freed memory mapped: no page faults at every step,
            somewhat higher peak memory; see :data:`KEEP_MEMORY_ENVIRONMENT`) or ``"system"``
            (the C library's defaults: lowest peak memory).
    """

    def __init__(
        self,
        model,
        nprocs: int,
        device: str = "cpu",
        dtype: str = "float64",
        timeout: float = 600.0,
        threads_per_worker: int | None = None,
        allocator: str = "keep",
    ):
        if nprocs < 1:
            raise ValueError(f"nprocs must be at least 1, got {nprocs}")
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
        self.allocator = allocator
        self.nprocs = int(nprocs)
        self.device = device
        self.dtype = dtype
        self.timeout = float(timeout)
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // self.nprocs)
        self._model_bytes = pickle.dumps(model)
        self._processes: list = []
        self._connections: list[Connection] = []
        self._finalizer = None
        self.generation = 0
        """Incremented at every start: graphs cached by workers belong to one generation."""

    @property
    def running(self) -> bool:
        return bool(self._processes)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def start(self) -> None:
        if self.running:
            return
        self.generation += 1
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        keep = self.allocator == "keep"
        environment = dict(KEEP_MEMORY_ENVIRONMENT if keep else {}, **os.environ)
        environment["OMP_NUM_THREADS"] = str(self.threads)
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pin = len(available) >= self.nprocs * self.threads
        for rank in range(self.nprocs):
            parent_socket, child_socket = socket.socketpair()
            process = subprocess.Popen(
                [sys.executable, "-m", "distmlip._worker", str(child_socket.fileno())],
                pass_fds=[child_socket.fileno()],
                env=environment,
                stdin=subprocess.DEVNULL,
            )
            child_socket.close()
            connection = Connection(parent_socket.detach())
            config = WorkerConfig(
                rank=rank,
                world_size=self.nprocs,
                init_method=init_method,
                device=self.device,
                dtype=self.dtype,
                timeout=self.timeout,
                threads=self.threads,
                parent_pid=os.getpid(),
                cores=tuple(available[rank * self.threads : (rank + 1) * self.threads])
                if pin
                else (),
            )
            connection.send((config, self._model_bytes))
            self._processes.append(process)
            self._connections.append(connection)
        self._finalizer = weakref.finalize(
            self, _stop_processes, list(self._processes), list(self._connections)
        )
        _LIVE_POOLS.add(self)
        self._collect("starting workers", max(self.timeout, STARTUP_TIMEOUT))

    def _collect(self, what: str, timeout: float | None = None) -> list:
        """Wait for one reply per worker; on death, error or timeout close the pool and raise.

        A dead worker's socket reads as EOF, so death is noticed as soon as it happens.
        """
        replies: list = [None] * self.nprocs
        pending = dict(enumerate(self._connections))
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            ready = wait(list(pending.values()), timeout=max(remaining, 0))
            if not ready:
                self.close()
                raise WorkerError(
                    f"{what}: no answer from worker(s) {sorted(pending)} within "
                    f"{timeout:.0f} s; increase `timeout` for larger systems"
                )
            for rank, connection in list(pending.items()):
                if connection in ready:
                    try:
                        status, reply = connection.recv()
                    except (EOFError, OSError):
                        status, reply = "died", None
                    if status not in ("ok", "ready"):
                        self._fail(rank, what, reply)
                    replies[rank] = reply
                    del pending[rank]
        return replies

    def _fail(self, rank: int, what: str, message: str | None) -> None:
        process = self._processes[rank]
        self.close()
        if message is None:
            raise WorkerError(
                f"{what}: worker {rank} (pid {process.pid}) died with exit code "
                f"{process.poll()}; all workers were stopped and restart on the next call"
            )
        raise WorkerError(f"{what}: worker {rank} failed:\n{message}")

    def evaluate(
        self,
        structure,
        owner: np.ndarray,
        compute_forces: bool = True,
        halo: str = "exchange",
        skin: float = 0.0,
        reuse: bool = False,
    ) -> list:
        """Send one structure to every worker; their :class:`~distmlip.engine.WorkerResult` s.

        ``halo``: ``"exchange"`` (zero redundancy) or ``"ghost"`` (the recomputing baseline).
        ``skin`` and ``reuse``: see :class:`EvaluationRequest`; ``reuse`` is only honoured while
        the workers that built the graph are still running (same :attr:`generation`).
        """
        if reuse and not self.running:
            raise RuntimeError("cannot reuse graphs: the workers that built them have stopped")
        self.start()
        request = EvaluationRequest(structure, owner, compute_forces, halo, float(skin), reuse)
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, connection in enumerate(self._connections):
            try:
                connection.send(("evaluate", payload))
            except (OSError, ValueError):
                self._fail(rank, "sending the structure", None)
        return self._collect("evaluating")

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._processes = []
        self._connections = []
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
