"""A rank other than 0 of a torchrun/SLURM job: it finds rank 0 through the job's store,
proves it holds the job's secret, then serves as one worker until rank 0 closes the job."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from distmlip.cluster.launch import Launch, identity, run_settings
from distmlip.cluster.network import (
    io_timeout,
    keepalive,
)
from distmlip.cluster.rendezvous import HANDSHAKE_TIMEOUT, SECRET_HINT, job_keys
from distmlip.cluster.secret import JobKeys, secret_file
from distmlip.cluster.store import (
    JobEnded,
    await_rank_0,
    failures,
    job_store,
    present,
    report_failure,
)
from distmlip.errors import first_line, stdout_to_stderr
from distmlip.messages import STARTUP_TIMEOUT
from distmlip.worker.main import run_worker

__all__ = ["serve", "ENDINGS", "ABORT_GRACE"]


def _connect(endpoints: list[tuple[str, int]], authkey: bytes, timeout: float) -> Connection:
    """The first of the driver's ``endpoints`` that answers, authenticated both ways: this
    rank proves it holds ``authkey``, then the listener must prove it too."""
    failures = []
    for address, port in endpoints:
        try:
            sock = socket.create_connection((address, port), timeout=5.0)
        except OSError as error:
            failures.append(f"{address}:{port}: {error.strerror or error}")
            continue
        sock.settimeout(None)
        keepalive(sock, timeout)
        connection = Connection(sock.detach())
        try:
            io_timeout(connection, HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT)
            answer_challenge(connection, authkey)
            deliver_challenge(connection, authkey)
            io_timeout(connection, 0.0, 0.0)
        except Exception as error:  # not rank 0, or rank 0 holds another secret
            connection.close()
            failures.append(f"{address}:{port}: authentication failed ({error})")
            continue
        return connection
    raise RuntimeError(
        f"cannot reach rank 0 ({'; '.join(failures)}); name the interface the machines reach "
        "each other on: GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME) on every node; "
        f"{SECRET_HINT}({secret_file()})"
    )


def _await_driver(
    launch: Launch, store, keys: JobKeys, deadline: float
) -> tuple[list[tuple[str, int]], bytes]:
    """Rank 0's endpoints and the connection key, from the first record in the store signed
    with this job's key (anything else there, planted or garbage, is ignored)."""
    key = f"{launch.prefix}/driver"
    unsigned = 0
    while True:
        if present(store, key, launch):
            opened = keys.open_record(store.get(key))
            if opened is not None:
                endpoints, nonce = opened
                return endpoints, keys.authkey(nonce)
            unsigned += 1
        failure = failures(store, launch)
        if failure:
            await_rank_0(store, launch, ABORT_GRACE)
            raise JobEnded(failure)
        if time.monotonic() > deadline:
            seen = (
                f"; what is there is not signed with this rank's secret: {SECRET_HINT}"
                f"({secret_file()})"
                if unsigned
                else ""
            )
            raise RuntimeError(
                f"rank 0 did not start the job within {STARTUP_TIMEOUT:.0f} s (no driver in "
                f"the store at {launch.master_addr}:{launch.master_port}{seen})"
            )
        time.sleep(0.2)


ENDINGS = {
    "stop": (0, None),
    "abort": (1, "the driver (rank 0) ended the job after an error; its message says why"),
    "lost": (1, "lost the connection to the driver (rank 0): it died, or the network failed"),
    "silent": (
        1,
        "no word from the driver (rank 0), not even its heartbeat: it is stopped or "
        "frozen, or its machine is unreachable",
    ),
    "failed": (1, "could not start its worker (rank 0's message says why)"),
}


ABORT_GRACE = 10.0
"""Seconds an aborted rank waits for the driver to print its error and exit before it exits."""


def _until_closed(connection: Connection, seconds: float) -> None:
    """Wait (at most ``seconds``) until the driver closes ``connection``."""
    deadline = time.monotonic() + seconds
    try:
        while connection.poll(max(0.0, deadline - time.monotonic())):
            connection.recv()
    except (EOFError, OSError):
        pass


def serve(model, launch: Launch, options, graph_options) -> None:
    """Be worker ``launch.rank`` of the job until the driver closes it, then exit the process
    (``SystemExit``: 0 after a clean end, 1 after an error, with one line on stderr)."""
    stdout_to_stderr()  # nothing but rank 0's output on standard output (model banners included)
    try:
        status, message = ENDINGS[_serve(model, launch, options, graph_options)]
    except Exception as error:
        status, message = 1, first_line(error)
        if not isinstance(error, JobEnded):
            report_failure(launch, message)
    # Ending already: a launcher's SIGTERM now would only add a second line for this rank.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if message:  # one write: lines of ranks sharing a terminal do not interleave
        sys.stderr.write(f"distmlip: error: rank {launch.rank}: {message}\n")
        sys.stderr.flush()
    raise SystemExit(status)


def _terminated(launch: Launch):
    def handler(signum, frame) -> None:
        os.write(
            2,
            f"distmlip: error: rank {launch.rank}: stopped by SIGTERM (its launcher or the "
            "scheduler ended the job; rank 0's message says why)\n".encode(),
        )
        os._exit(128 + signum)

    return handler


def _serve(model, launch: Launch, options, graph_options) -> str:
    import signal

    # Ctrl-C reaches every process of a terminal's job: rank 0 handles it, and ends the job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminated(launch))
    wait = max(options.timeout, STARTUP_TIMEOUT)
    deadline = time.monotonic() + wait
    keys = job_keys(launch)
    store = job_store(launch, wait)
    store.set(f"{launch.prefix}/keycheck/{launch.rank}", keys.check())
    endpoints, authkey = _await_driver(launch, store, keys, deadline)
    connection = _connect(endpoints, authkey, options.timeout)
    hello = {"host": socket.gethostname(), "pid": os.getpid(), "node": launch.node}
    hello.update(identity=identity(model), settings=run_settings(options, graph_options))
    connection.send(("hello", launch.rank, hello))
    if not connection.poll(max(0.0, deadline - time.monotonic())):
        raise JobEnded(f"rank 0 accepted this rank but did not start the job within {wait:.0f} s")
    kind, payload = connection.recv()
    if kind == "refused":
        _until_closed(connection, ABORT_GRACE)  # rank 0 prints why and exits first
        raise JobEnded(f"refused by rank 0: {payload}")
    threads = launch.threads(options.threads_per_worker)
    config = replace(
        payload,
        threads=threads,
        cores=launch.cores(threads),
        local_rank=launch.local_rank,
        parent_pid=os.getppid(),
    )
    ending = run_worker(connection, config, lambda: model)
    if ending == "abort":
        _until_closed(connection, ABORT_GRACE)  # rank 0 prints its error and exits first
    return ending
