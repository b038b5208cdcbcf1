"""How the ranks of a torchrun/SLURM job meet (:mod:`distmlip.cluster` says who they are).

Through the job's TCP store (torchrun's agent hosts it at ``MASTER_ADDR:MASTER_PORT``; under srun
rank 0 hosts one there): rank 0 publishes a record of where it listens, signed with a key only
the job's ranks can derive (:mod:`distmlip.jobsecret`: the store has no access control, so it
carries no secret and nothing read from it is unpickled); every other rank checks the
signature, connects, proves it holds the key (and makes rank 0 prove it), says who it is
(host, pid, :func:`~distmlip.cluster.identity`), and is accepted or refused. A connection that
fails the proof is logged and dropped, and the job goes on. A rank that fails before it
connects posts its error to the store, so the others stop at once. Then each rank serves rank
0 as worker ``RANK`` (:func:`serve`) until rank 0 closes.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from distmlip.cluster import Launch, identity, run_settings
from distmlip.errors import WorkerError
from distmlip.jobsecret import SECRET_ENVIRONMENT, JobKeys, job_secret, secret_file
from distmlip.jobstore import (
    JobEnded,
    await_rank_0,
    failures,
    host_store,
    job_store,
    present,
    report_failure,
)
from distmlip.network import job_addresses, keepalive, listen
from distmlip.processes import _ABORTED, io_timeout
from distmlip.worker import STARTUP_TIMEOUT, run_worker

__all__ = [
    "DriverRendezvous",
    "JobEnded",
    "serve",
    "report_failure",
    "host_store",
    "launched",
    "abort_on_uncaught",
]


@contextlib.contextmanager
def launched(launch: Launch | None):
    """Around what a rank does before it serves (options, model loading): rank 0 of an srun
    job hosts the store at once; ranks >= 1 send their standard output to stderr (a model's
    banner must not mix with rank 0's results); a failure is posted for the other ranks."""
    if launch is None:
        yield
        return
    host_store(launch)
    if launch.rank > 0:
        sys.stdout.flush()
        os.dup2(2, 1)
    try:
        yield
    except Exception as error:
        report_failure(launch, (str(error).strip().splitlines() or [type(error).__name__])[0])
        raise


def abort_on_uncaught(pool) -> None:
    """A script that dies on rank 0 with an uncaught exception ends the job as a failure: the
    other ranks are aborted (status 1), not stopped as after a clean end."""
    import weakref

    previous, reference = sys.excepthook, weakref.ref(pool)

    def hook(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        alive = reference()
        if alive is not None:
            alive._discard(grace=0.0)

    sys.excepthook = hook


HANDSHAKE_TIMEOUT = 10.0
"""Seconds each step of the authentication handshake may take (a silent client is dropped)."""


def _keys(launch: Launch) -> JobKeys:
    return JobKeys(job_secret(), launch.prefix)


SECRET_HINT = (
    f"every rank needs the same secret: the same {SECRET_ENVIRONMENT} in every rank's "
    "environment, or the same user-only file "
)


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


DROPPED_SHOWN = 10
"""Connections that fail authentication, logged one line each (the rest are counted)."""


class DriverRendezvous:
    """Rank 0's side of the meeting: publish where to connect, accept and check every rank."""

    def __init__(self, launch: Launch, timeout: float):
        self.launch, self.timeout = launch, timeout
        self.keys = _keys(launch)  # a missing secret fails here, before the store is touched
        self.store = job_store(launch, timeout, host=launch.host_store)
        addresses = job_addresses(
            launch.master_addr, launch.master_port, launch.world_size > launch.local_world_size
        )
        self.listeners = listen(addresses, backlog=launch.world_size)
        endpoints = [sock.getsockname()[:2] for sock in self.listeners]
        record, nonce = self.keys.record(endpoints)
        self.authkey = self.keys.authkey(nonce)
        self.dropped = 0
        self.store.set(f"{launch.prefix}/driver", record)

    @property
    def group_store(self) -> tuple[str, int, str]:
        """Where the workers form their process group: ``WorkerConfig.store``."""
        return (self.launch.master_addr, self.launch.master_port, f"{self.launch.prefix}/group")

    def accept(self, own: dict[str, str], settings: dict) -> dict[int, tuple[Connection, dict]]:
        """Every other rank's connection and hello, checked against ``own`` identity and the
        :func:`~distmlip.cluster.run_settings` of rank 0.

        Raises:
            ValueError: a rank runs a different model or installation (all are refused).
            WorkerError: a rank failed to start, or not all connected within the timeout.
        """
        waiting = set(range(1, self.launch.world_size))
        ranks: dict[int, tuple[Connection, dict]] = {}
        wait = max(self.timeout, STARTUP_TIMEOUT)
        deadline = time.monotonic() + wait
        try:
            while waiting:
                failure = failures(self.store, self.launch) or self._other_secret(waiting)
                if failure:
                    raise WorkerError(f"starting the job: {failure}")
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"starting the job: ranks {sorted(waiting)} did not connect to rank 0 "
                        f"within {wait:.0f} s; start the same command on every node (a script "
                        f"must make its DistributedCalculator on every rank); {SECRET_HINT}"
                        f"({secret_file()})"
                    )
                ready = select.select(self.listeners, [], [], 0.5)[0]
                if not ready:
                    continue
                sock, peer = ready[0].accept()
                accepted = self._authenticate(sock, peer)
                if accepted is not None:
                    rank, connection, hello = accepted
                    ranks[rank] = (connection, hello)
                    waiting.discard(rank)
            for rank, (_, hello) in sorted(ranks.items()):
                if hello["identity"] != own:
                    raise ValueError(_mismatch(rank, hello["host"], hello["identity"], own))
                if hello["settings"] != settings:
                    raise ValueError(_mismatch(rank, hello["host"], hello["settings"], settings))
        except BaseException as error:
            for connection, _ in ranks.values():
                try:
                    connection.send(("refused", str(error)))
                except OSError:
                    connection.close()
                else:  # open until this process exits: the ranks wait for rank 0's line first
                    _ABORTED.append(connection)
            raise
        finally:
            for listener in self.listeners:
                listener.close()
        return ranks

    def _other_secret(self, waiting: set[int]) -> str | None:
        """``rank R holds ...`` for a waiting rank whose posted key check is not rank 0's:
        it could never verify rank 0's record, so the job is ended now, not at the timeout."""
        own = self.keys.check()
        for rank in sorted(waiting):
            key = f"{self.launch.prefix}/keycheck/{rank}"
            if self.store.check([key]) and self.store.get(key).decode(errors="replace") != own:
                return (
                    f"rank {rank} holds a different job secret from rank 0's; {SECRET_HINT}"
                    f"({secret_file()})"
                )
        return None

    def _authenticate(self, sock: socket.socket, peer) -> tuple[int, Connection, dict] | None:
        """``(rank, connection, hello)`` of a peer that proves it holds this job's key (and
        gets rank 0's proof); None, with a line on stderr, for any other: nothing it sent is
        unpickled before its proof (the challenge's answer is read as bytes)."""
        keepalive(sock, self.timeout)
        connection = Connection(sock.detach())
        step = "authentication"
        try:
            io_timeout(connection, HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT)
            deliver_challenge(connection, self.authkey)
            answer_challenge(connection, self.authkey)
            step = "its hello"
            kind, rank, hello = connection.recv()
            if kind != "hello" or not 0 < rank < self.launch.world_size:
                raise ValueError(f"a {kind!r} message for rank {rank!r}")
            io_timeout(connection, 0.0, 0.0)
        except Exception as error:  # a port scanner, an intruder, another job, or it died
            connection.close()
            self.dropped += 1
            if self.dropped <= DROPPED_SHOWN:
                more = " (further ones are not shown)" if self.dropped == DROPPED_SHOWN else ""
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                sys.stderr.write(
                    f"distmlip: warning: dropped a connection to rank 0 from "
                    f"{peer[0]}:{peer[1]}: {step} failed ({reason[:200]}){more}\n"
                )
            return None
        return rank, connection, hello


def _mismatch(rank: int, host: str, theirs: dict, own: dict) -> str:
    differ = [
        f"{key} {theirs.get(key)} on rank {rank}, {value} on rank 0"
        for key, value in own.items()
        if theirs.get(key) != value
    ]
    return (
        f"rank {rank} (on {host}) was started with a different model, installation or "
        f"options: {'; '.join(differ)}; start every rank with the same command, model and "
        "versions"
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
    sys.stdout.flush()
    os.dup2(2, 1)  # nothing but rank 0's output on standard output (model banners included)
    try:
        status, message = ENDINGS[_serve(model, launch, options, graph_options)]
    except Exception as error:
        status, message = 1, (str(error).strip().splitlines() or [type(error).__name__])[0]
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
    keys = _keys(launch)
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
