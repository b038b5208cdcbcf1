"""One worker process: set-up, then a loop that answers the driver's requests.

The driver (:mod:`distmlip.driver.pool`) starts ``python -m distmlip.worker FD``. Messages on the
socket are tuples ``(kind, request_id, payload)``:

* driver → worker: ``("evaluate", id, pickled EvaluationRequest)``, ``("stop", 0, None)``,
  and to a worker on another rank of a torchrun/SLURM job (:mod:`distmlip.cluster.launch`)
  ``("abort", 0, reason)`` when the driver ends the job after an error;
* worker → driver: ``("ready", 0, pid)`` once after set-up, then per request
  ``("ok", id, WorkerResult)`` or ``("error", id, (summary, traceback))``.

Every reply echoes its request's id, so the driver can tell a reply to the request it is
waiting for from one to a request it abandoned (see :func:`distmlip.driver.pool.collect_replies`).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import NoReturn

import torch

from distmlip import trace
from distmlip.errors import StructureRejected, error_summary
from distmlip.exchange.comm import Communicator
from distmlip.messages import (
    STARTUP_ID,
    STARTUP_TIMEOUT,
    EvaluationRequest,
    Moved,
    WorkerConfig,
)
from distmlip.options import GraphOptions
from distmlip.worker.builders import GhostGraphs, SkinGraphs
from distmlip.worker.engine import call_exchange, evaluate
from distmlip.worker.memory import (
    PeakMemory,
    apply_memory_limit,
    graph_sizes,
    memory_report,
    out_of_memory_kind,
)
from distmlip.worker.resident import ResidentSkinGraphs
from distmlip.worker.store import StructureStore

__all__ = [
    "worker_main",
    "run_worker",
    "exit_process",
    "die_with_parent",
    "die_with_driver",
    "graph_builder",
]


def exit_process(status: int = 0) -> NoReturn:
    """End a worker process (or a zygote) now, once its output is flushed.

    Not through the interpreter's shutdown, which finalises every module and object: with
    torch and a model's package loaded that takes up to seconds of CPU per worker, during
    which a closing pool waits: 0.2 s after importing torch alone, 1.75 s after fairchem, more
    with a model loaded; a pool of two closes in 0.03-0.12 s (``python
    benchmarks/worker_start.py``). A worker holds nothing that the shutdown would save: it
    writes no files, and its process group is destroyed before."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader is gone
            pass
    os._exit(status)


def die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """Exit when the driver process is gone, even while computing.

    ``PR_SET_PDEATHSIG`` (Linux) fires when the *thread* that started this process ends, so it
    is only used when the driver started the workers from its main thread; a watchdog thread
    that notices the parent's exit within a second covers every case.
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent_pid:  # the parent died already
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="distmlip-parent-watch", daemon=True).start()


def _worker_device(config: WorkerConfig):
    if config.options.device == "cuda":
        index = config.rank if config.local_rank is None else config.local_rank
        local = index % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(config.options.device)


@dataclass
class WorkerContext:
    """What one worker holds from start to end: its settings, device and dtype, its
    communicator (one per worker; each call starts its counters afresh) and graph builder."""

    config: WorkerConfig
    device: torch.device
    dtype: torch.dtype
    comm: Communicator
    graphs: SkinGraphs | GhostGraphs


def die_with_driver(driver_pid: int) -> None:
    """Exit as soon as the driver process ``driver_pid`` (not this process's parent: a
    worker forked by a zygote, :mod:`distmlip.driver.zygote`) is gone, even while computing."""
    import select

    try:
        pidfd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="distmlip-driver-watch", daemon=True).start()


def worker_main(
    connection: Connection, pdeathsig: bool = True, driver_pid: int | None = None
) -> None:
    """Entry point of one worker process: set up, then serve requests until told to stop.

    ``driver_pid``: a worker forked by a zygote, which watches the driver, not its parent."""
    # Ctrl-C in a terminal signals the whole process group: the driver handles it (and stops
    # the workers), so workers must not print a KeyboardInterrupt traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if driver_pid is None:
        die_with_parent(os.getppid(), pdeathsig)  # also while waiting for the configuration
    else:
        die_with_driver(driver_pid)
    try:
        config, model_bytes = connection.recv()
    except EOFError:  # the driver gave up on this worker before sending its configuration
        return
    if (os.getppid() if driver_pid is None else driver_pid) != config.parent_pid:
        os._exit(1)
    run_worker(connection, config, lambda: pickle.loads(model_bytes))


def run_worker(connection: Connection, config: WorkerConfig, load_model) -> str:
    """Set up (threads, device, ``load_model()``, process group), say ``ready``, then serve.

    Returns how it ended: ``"stop"`` (the driver closed), ``"abort"`` (the driver ended the
    job after an error), ``"lost"`` (the driver's socket closed) or ``"failed"`` (set-up
    failed; the driver was told why)."""
    os.environ["OMP_NUM_THREADS"] = str(config.threads)
    if config.silence is not None:  # a rank of a launched job, not started by the driver
        from distmlip.environment import adopt_in_process

        adopt_in_process(config.keep_memory, config.options.device)
    import torch.distributed as dist

    from distmlip.options import resolve_backend

    torch.set_num_threads(config.threads)
    if config.cores and hasattr(os, "sched_setaffinity"):
        # One disjoint set of cores per worker: no two workers' threads fight over a core.
        os.sched_setaffinity(0, config.cores)
    try:
        options = config.options
        apply_memory_limit(options.memory_limit)  # before the model loads
        device = _worker_device(config)
        dtype = getattr(torch, options.dtype)
        model = load_model()
        model = model.to(device=device, dtype=dtype).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if options.checkpoint:
            # torch's checkpoint imports ~70 MB of modules (dynamo, fsdp) at its first use: at
            # start-up, not in the middle of the first call, under the memory limit.
            from distmlip.exchange.checkpoint import warm_up

            warm_up()
        if config.world_size > 1:
            # Start-up (importing torch, rendezvous) can be slow on a loaded machine; each
            # exchange still waits at most `options.timeout` (see distmlip.exchange.comm).
            timeout = datetime.timedelta(seconds=max(options.timeout, STARTUP_TIMEOUT))
            if config.store is None:
                meeting = {"init_method": config.init_method}
                _gloo_on_loopback()
            else:
                host, port, prefix = config.store
                job = dist.TCPStore(host, port, is_master=False, timeout=timeout)
                meeting = {"store": dist.PrefixStore(prefix, job)}
            dist.init_process_group(
                backend=resolve_backend(device.type, options.backend),
                rank=config.rank,
                world_size=config.world_size,
                timeout=timeout,
                **meeting,
            )
        comm = Communicator(config.rank, config.world_size, device, options.timeout)
        graphs = graph_builder(model, config.graph, device, dtype)
        context = WorkerContext(config, device, dtype, comm, graphs)
        connection.send(("ready", STARTUP_ID, os.getpid()))
    except Exception as error:
        connection.send(("error", STARTUP_ID, _failure(error, config, None, "starting")))
        return "failed"
    try:
        return _serve(context, model, connection)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _gloo_on_loopback() -> None:
    """Workers on one machine connect to each other over the loopback interface only (gloo
    would otherwise listen on the address the host name resolves to), unless the user named
    an interface."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def _serve(context: WorkerContext, model, connection: Connection) -> str:
    config = context.config
    structures = StructureStore()  # the last complete structure (positions-only requests)
    peaks = PeakMemory(context.device)
    sizes: dict = {}  # what this call's graph holds, for an out-of-memory report
    while True:
        try:
            if config.silence is not None and not connection.poll(config.silence):
                return "silent"
            command, request_id, payload = connection.recv()
        except (EOFError, OSError):  # the driver is gone (or, remote, the network failed)
            return "lost"
        if command in ("stop", "abort"):
            return command
        if command == "ping":
            continue
        try:
            sizes.clear()
            peaks.start()
            request: EvaluationRequest = pickle.loads(payload)
            moved = isinstance(request.structure, Moved)
            request = structures.resolve(request_id, request)  # before any collective
            sizes["n_atoms"] = request.structure.n_atoms
            with trace.recording() if request.trace else nullcontext() as record:
                result = _evaluate(request, context, model, sizes)
            result.trace = record
            result.stats.update(peaks.stats())  # peak RSS (and GPU) of the call, and since start
            result.stats["positions_only"] = int(moved)
            connection.send(("ok", request_id, result))
            # Free this call's graph and tensors before the next request arrives, not during it.
            del result, record
        except StructureRejected as error:  # refused by every worker together: stay in step
            connection.send(("rejected", request_id, str(error)))
        except Exception as error:
            report = _failure(error, config, context.device, "evaluating", sizes)
            connection.send(("error", request_id, report))


def _failure(error: Exception, config: WorkerConfig, device, phase: str, sizes=None) -> tuple:
    """An ``error`` reply's payload: ``(summary, traceback)``, and a third item, the
    :func:`~distmlip.worker.memory.memory_report`, if the worker ran out of memory."""
    report = (error_summary(error), traceback.format_exc())
    kind = out_of_memory_kind(error)
    if kind is None:
        return report
    # The traceback's frames hold the failed call's tensors: free them before reporting.
    traceback.clear_frames(error.__traceback__)
    details = memory_report(error, kind, sizes, config.options.memory_limit, device, phase)
    details["checkpoint"] = bool(config.options.checkpoint)
    return (*report, details)


def _evaluate(request: EvaluationRequest, context: WorkerContext, model, sizes=None):
    """One request: this call's graph (kept or built), then the evaluation on it."""
    comm = context.comm  # evaluate starts its counters and outputs afresh
    call = context.graphs.get(request.structure, comm)
    if sizes is not None:
        sizes.update(graph_sizes(call.graph, request.structure.n_atoms, call.inputs))
    exchange = call_exchange(call, comm, context.config.options.checkpoint)
    result = evaluate(model, call, exchange, comm, request.compute_forces)
    # "graph" includes "prepare" (the model's per-graph structure, e.g. CHGNet's bonds).
    result.timings = {**call.timings, **result.timings}
    result.stats["graph_reused"] = int(not call.built)
    result.stats["prepared"] = int(call.built)
    result.stats["skin_edges"] = call.skin_edges
    return result


def graph_builder(
    model, options: GraphOptions, device: torch.device, dtype: torch.dtype
) -> SkinGraphs | GhostGraphs:
    """The worker's graph builder for ``options``: the ghost baseline's (``halo="ghost"``),
    the resident one (``options.resident``: the per-call work in torch on ``device``,
    :mod:`distmlip.worker.resident`) or the host one; call graphs' inputs in ``dtype``."""
    if options.halo == "ghost":
        return GhostGraphs(model, options, device, dtype)
    if options.resident:
        return ResidentSkinGraphs(model, options, device, dtype)
    return SkinGraphs(model, options, device, dtype)
