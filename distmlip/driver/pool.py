"""The driver's side of the worker processes: start, send a request, collect, stop.

The calling process is a *driver*: it validates input, partitions, sends the replicated
structure to the P workers and assembles their owned-atom results. It never joins the process
group itself. Why: a driver that is not a rank can always time out, notice a dead worker through
its closed socket, kill the rest and stay usable; several calculators can live in one Python
process (torch.distributed allows one default group per process); and the user's process holds
no model activations. The cost is one copy of positions per call (24 bytes per atom).

Workers are fresh interpreters (``python -m distmlip.worker``, see :mod:`distmlip.worker.main`)
or, for CPU pools on Linux, forks of a pre-started interpreter that has imported torch and the
model (:mod:`distmlip.driver.zygote`); never ``multiprocessing`` children: the user's script is
never
re-imported, so no ``if __name__ == "__main__"`` guard is needed. Each talks to the driver over
its own socket pair; a worker's death closes its end, which the driver sees at once. Workers
die with the driver (``PR_SET_PDEATHSIG`` or a pidfd on Linux, socket EOF elsewhere) and are
stopped by :meth:`WorkerPool.close`, the context manager, garbage collection or interpreter
exit.

No stale results: every request carries an id that its replies echo, and a call that does not
complete (a signal handler's exception, Ctrl-C, a failure) kills the workers at once, so the
next call starts fresh ones; a structure every worker refused together is a ``ValueError`` and
keeps them. The pool is ``ready`` only between complete calls; any other state found at the
start of a call means an interrupted one, and is cleaned up first.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import replace
from multiprocessing.connection import Connection

from distmlip.driver.failures import reply_error
from distmlip.driver.processes import (  # noqa: F401  (collect_replies re-exported)
    NoAnswer,
    RemoteProcess,
    ReplyFailure,
    Workers,
    collect_replies,
    driver_silence,
    heartbeat,
    heartbeat_interval,
    io_timeout,
)
from distmlip.driver.sender import StructureSender, resend_if_stale
from distmlip.driver.zygote import fork_worker, preload_modules, start_method
from distmlip.environment import (  # noqa: F401  (re-exported)
    CUDA_ALLOCATOR_ENVIRONMENT,
    KEEP_MEMORY_ENVIRONMENT,
    worker_environment,
)
from distmlip.errors import StructureRejected, WorkerError
from distmlip.messages import STARTUP_ID, STARTUP_TIMEOUT, EvaluationRequest, WorkerConfig
from distmlip.options import GraphOptions, WorkerOptions

__all__ = ["WorkerPool", "WorkerError", "WorkerOptions", "collect_replies"]


STOP_GRACE = 5.0
"""Seconds idle workers get to leave cleanly on :meth:`WorkerPool.close` before being killed."""

_LAUNCHED = []
"""Pools this process made for a torchrun/SLURM job: the job's other ranks serve one only."""


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_LIVE_POOLS):
        pool.close(wait=1.0)


class WorkerPool:
    """P persistent worker processes that evaluate one model on partitioned structures.

    Thread-safe: calls from several threads are serialised.

    Args:
        model: a :class:`~distmlip.models.base.DistributedModel` (pickled to each worker once).
        options: :class:`WorkerOptions`.
        graph_options: :class:`GraphOptions` (partitioner, halo mode, skin).
    """

    def __init__(
        self,
        model,
        options: WorkerOptions,
        graph_options: GraphOptions | None = None,
        launch=None,
    ):
        self.options = options
        self.graph_options = graph_options or GraphOptions()
        self.nprocs = options.nprocs
        self.timeout = options.timeout
        self.threads = options.threads
        self._model_bytes = pickle.dumps(model)
        self.start_method = start_method(options.device, launch is not None)
        self._preload = preload_modules(model) if self.start_method == "fork" else ()
        self._lock = threading.RLock()
        self._workers: Workers | None = None
        self._finalizer = None
        self._state = "stopped"  # → starting → ready ⇄ busy; anything else → stopping → stopped
        self._request_id = STARTUP_ID
        self.resident = self.graph_options.resident_on(options.device)
        self._sender = StructureSender()  # positions-only requests (distmlip.driver.sender)
        # A torchrun/SLURM job (distmlip.cluster.launch): worker 0 is our child, the others are the
        # job's other ranks, met once; they cannot be restarted.
        self.launch = launch
        self._rendezvous = None
        self._identity = None
        if launch is not None:
            from distmlip.cluster.launch import identity, run_settings
            from distmlip.cluster.rendezvous import DriverRendezvous, abort_on_uncaught

            if _LAUNCHED:
                raise WorkerError(
                    f"this {launch.source} job has a DistributedCalculator already, and its "
                    "other ranks serve only that one: reuse it (one calculator per job)"
                )
            _LAUNCHED.append(weakref.ref(self))
            self.threads = launch.threads(options.threads_per_worker)
            self._identity = identity(model), run_settings(options, self.graph_options)
            self._rendezvous = DriverRendezvous(launch, options.timeout)
            abort_on_uncaught(self)

    @property
    def running(self) -> bool:
        """Workers are up and idle: the last start and the last call completed."""
        return self._state == "ready"

    @property
    def pids(self) -> list[int]:
        workers = self._workers
        return [process.pid for process in workers.processes] if workers else []

    def start(self) -> None:
        """Start the workers unless they are ready; clean up after an interrupted call first."""
        with self._lock:
            if self._state == "ready":
                return
            if self.launch is not None and self._rendezvous is None:
                raise WorkerError(
                    f"the workers on the job's other ranks ({self.launch.source}) stopped when "
                    "this calculator was closed or a call failed, and cannot be restarted: one "
                    "calculator per job; start the job again"
                )
            self._discard(grace=0.0)
            workers = self._workers = Workers()
            self._finalizer = weakref.finalize(self, workers.stop, STOP_GRACE)
            self._state = "starting"
            _LIVE_POOLS.add(self)
            try:
                self._spawn(workers)
                self._collect(STARTUP_ID, "starting workers", max(self.timeout, STARTUP_TIMEOUT))
            except BaseException:
                self._discard(grace=0.0)
                raise
            self._state = "ready"

    def _spawn(self, workers: Workers) -> None:
        if self.launch is None:
            # A file in a user-only directory, not a TCP store (which would listen on every
            # interface): only this user's processes can join the group.
            init = {"init_method": workers.meeting_place()}
            for rank in range(self.nprocs):
                self._start_local(workers, rank, rank, init)
            return
        rendezvous, self._rendezvous = self._rendezvous, None  # once: remote ranks serve once
        init = {"init_method": "", "store": rendezvous.group_store}
        local_rank = self.launch.local_rank
        self._start_local(workers, 0, local_rank, init)
        for rank, (connection, hello) in sorted(rendezvous.accept(*self._identity).items()):
            workers.processes.append(
                RemoteProcess(connection, hello["pid"], hello["host"], hello["node"])
            )
            workers.connections.append(connection)
            io_timeout(connection, send=self.timeout)
            remote = {
                "silence": driver_silence(self.timeout),
                "keep_memory": self.options.allocator == "keep",
            }
            workers.send(rank, ("config", self._config(rank, {**init, **remote}, ())))
        # From now on, until these workers stop, also while they start and during calls.
        threading.Thread(
            target=heartbeat,
            args=(weakref.ref(self), workers, heartbeat_interval(self.timeout)),
            name="distmlip-heartbeat",
            daemon=True,
        ).start()

    def _config(self, rank: int, init: dict, cores: tuple) -> WorkerConfig:
        return WorkerConfig(
            rank=rank,
            world_size=self.nprocs,
            parent_pid=os.getpid(),
            options=self.options,
            graph=replace(self.graph_options, resident=self.resident),
            threads=self.threads,
            cores=tuple(cores),
            **init,
        )

    def _start_local(self, workers: Workers, rank: int, local_rank: int, init: dict) -> None:
        """Start worker ``rank`` as a child process, on this machine's ``local_rank`` share."""
        environment = worker_environment(self.options)
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pin = len(available) >= self.nprocs * self.threads
        # PR_SET_PDEATHSIG would kill the workers when the starting thread ends.
        flags = [] if threading.current_thread() is threading.main_thread() else ["no-pdeathsig"]
        parent_socket, child_socket = socket.socketpair()
        try:
            process = None
            if self.start_method == "fork":
                timeout = max(self.timeout, STARTUP_TIMEOUT)
                process = fork_worker(environment, self._preload, child_socket, timeout)
            process = process or subprocess.Popen(
                [sys.executable, "-m", "distmlip.worker", str(child_socket.fileno()), *flags],
                pass_fds=[child_socket.fileno()],
                env=environment,
                stdin=subprocess.DEVNULL,
                # Own session: a Ctrl-C in the terminal reaches only the driver, which
                # stops the workers (no worker tracebacks, also while they import torch).
                start_new_session=True,
            )
        finally:
            child_socket.close()
        workers.processes.append(process)
        connection = Connection(parent_socket.detach())
        workers.connections.append(connection)
        io_timeout(connection, send=self.timeout)
        threads = self.threads
        cores = available[local_rank * threads : (local_rank + 1) * threads] if pin else ()
        if self.launch is not None:  # the same rule as the job's other ranks
            cores = self.launch.cores(threads)
        config = self._config(rank, init, cores)
        if local_rank != rank:
            config = replace(config, local_rank=local_rank)
        connection.send((config, self._model_bytes))

    def _collect(self, request_id: int, what: str, timeout: float | None = None) -> list:
        """Replies to ``request_id``; on death, error or timeout stop the workers and raise."""
        workers = self._workers
        timeout = self.timeout if timeout is None else timeout
        try:
            return collect_replies(workers.connections, request_id, timeout)
        except ReplyFailure as failure:
            rank, report = failure.rank, failure.report
            if report is None:
                message = f"{what}: {workers.describe(rank, closed=True)}"
            else:
                message = f"{what}: worker {rank} raised {report[0]}"
            others = [r for r in range(self.nprocs) if r != rank]
            if report is not None and report[0].startswith("CommunicationError"):
                # A failed exchange is usually a peer that died: give it a moment to be
                # reaped, then name it first, as the cause.
                deadline = time.monotonic() + 2.0
                while not any(workers.in_trouble(r) for r in others):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            troubled = [r for r in others if workers.in_trouble(r)]
            causes = "; ".join(workers.describe(r) for r in troubled)
            if report is not None and report[0].startswith("CommunicationError") and troubled:
                message = f"{what}: {causes}; worker {rank} raised {report[0]}"
            elif troubled:
                message += f"; {causes}"
            limit = self.options.memory_limit
            refused = report is not None and "Resource temporarily unavailable" in report[0]
            if limit is not None and (request_id == STARTUP_ID or refused):
                # Near what torch and the model need, a worker fails in ways that do not say
                # "memory" (an allocator's or a new thread's EAGAIN, OpenBLAS exiting).
                message += (
                    f" (memory_limit={limit:g} GB may be less than a worker needs to start: "
                    "torch and the model alone take 0.25 GB or more; raise it)"
                )
            self._discard(grace=0.0)
            raise reply_error(what, rank, report, self.nprocs, message, self._after) from None
        except NoAnswer as silence:
            states = "; ".join(workers.describe(rank) for rank in silence.ranks)
            self._discard(grace=0.0)
            raise WorkerError(
                f"{what}: no answer from worker(s) {silence.ranks} within {timeout:g} s "
                f"({states}). A worker may be stuck (stopped, deadlocked or swapping), or the "
                f"system needs more time: then increase `timeout`. {self._after.capitalize()}"
            ) from None

    @property
    def _after(self) -> str:
        """What became of the workers after a failure."""
        if self.launch is None:
            return "all workers were stopped and restart on the next call"
        return f"every rank of the {self.launch.source} job was stopped"

    def evaluate(self, structure, compute_forces: bool = True, trace: bool = False) -> list:
        """Send one structure to every worker; their :class:`~distmlip.worker.engine.WorkerResult`
        s.

        Each worker partitions it and builds (or reuses) its graph itself
        (:mod:`distmlip.worker.builders`). ``trace``: workers record a
        :class:`~distmlip.trace.Trace`.
        Only positions and cell are sent while the rest is unchanged
        (:mod:`distmlip.driver.sender`).
        """
        return resend_if_stale(self._evaluate, structure, compute_forces, trace)

    def _evaluate(self, structure, compute_forces: bool, trace: bool) -> list:
        with self._lock:
            workers = self._workers
            if workers is not None and workers.owner_pid != os.getpid():
                raise RuntimeError(
                    f"this calculator's workers belong to process {workers.owner_pid}, not to "
                    "this forked copy; create a DistributedCalculator in each process"
                )
            self.start()
            sent, rest = self._sender.message(structure, self._workers)
            request = EvaluationRequest(sent, bool(compute_forces), bool(trace))
            payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            self._request_id += 1
            request_id = self._request_id
            self._state = "busy"
            try:
                for rank in range(self.nprocs):
                    try:
                        self._workers.send(rank, ("evaluate", request_id, payload))
                    except (OSError, ValueError):
                        # The clean-up below stops the workers.
                        raise WorkerError(
                            f"sending the structure: {self._workers.describe(rank)} (not "
                            f"reading within {self.timeout:g} s, or gone); {self._after}"
                        ) from None
                replies = self._collect(request_id, "evaluating")
            except BaseException:
                # Interrupted (Ctrl-C, an exception from a signal handler) or failed: the
                # workers may still be computing, or a reply may be half read. Never reuse them.
                self._discard(grace=0.0)
                raise
            # Before "ready": an interruption between the two leaves "busy", so fresh workers.
            self._sender.delivered(self._workers, request_id, rest)
            self._state = "ready"
            # Every worker answered (some refused the structure together): they stay in step.
            refused = [reply for reply in replies if isinstance(reply, StructureRejected)]
            if refused:
                raise refused[0]
            return replies

    def _discard(self, grace: float) -> None:
        """Stop the workers (idempotent; safe to repeat if a signal interrupts it)."""
        self._state = "stopping"
        workers, finalizer = self._workers, self._finalizer
        if workers is not None:
            workers.stop(grace)
        if finalizer is not None:
            finalizer.detach()
        self._workers = self._finalizer = None
        self._state = "stopped"
        _LIVE_POOLS.discard(self)

    def close(self, wait: float | None = None) -> None:
        """Stop all workers (idempotent). A call in progress in another thread is waited for,
        at most ``wait`` seconds if given; then the workers are killed under it."""
        if self._lock.acquire(timeout=-1 if wait is None else wait):
            try:
                self._discard(grace=STOP_GRACE if self._state == "ready" else 0.0)
            finally:
                self._lock.release()
        else:  # e.g. interpreter exit while a daemon thread waits for the workers
            workers = self._workers
            if workers is not None:
                workers.stop(0.0)

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
