"""How the ranks of a torchrun/SLURM job meet (:mod:`distmlip.cluster.launch` says who they are).

Through the job's TCP store (torchrun's agent hosts it at ``MASTER_ADDR:MASTER_PORT``; under srun
rank 0 hosts one there): rank 0 publishes a record of where it listens, signed with a key only
the job's ranks can derive (:mod:`distmlip.cluster.secret`: the store has no access control, so it
carries no secret and nothing read from it is unpickled); every other rank checks the
signature, connects, proves it holds the key (and makes rank 0 prove it), says who it is
(host, pid, :func:`~distmlip.cluster.launch.identity`), and is accepted or refused. A connection
that fails the proof is logged and dropped, and the job goes on. A rank that fails before it
connects posts its error to the store, so the others stop at once. Then each rank serves rank
0 as worker ``RANK`` (:func:`serve`) until rank 0 closes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from distmlip.cluster.launch import Launch
from distmlip.cluster.network import (
    ABORTED_CONNECTIONS,
    io_timeout,
    job_addresses,
    keepalive,
    listen,
)
from distmlip.cluster.secret import SECRET_ENVIRONMENT, JobKeys, job_secret, secret_file
from distmlip.cluster.store import (
    failures,
    host_store,
    job_store,
    report_failure,
)
from distmlip.errors import WorkerError, first_line, stdout_to_stderr
from distmlip.messages import STARTUP_TIMEOUT

__all__ = ["DriverRendezvous", "launched", "abort_on_uncaught", "job_keys", "HANDSHAKE_TIMEOUT"]


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
        stdout_to_stderr()
    try:
        yield
    except Exception as error:
        report_failure(launch, first_line(error))
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


def job_keys(launch: Launch) -> JobKeys:
    return JobKeys(job_secret(), launch.prefix)


SECRET_HINT = (
    f"every rank needs the same secret: the same {SECRET_ENVIRONMENT} in every rank's "
    "environment, or the same user-only file "
)


DROPPED_SHOWN = 10
"""Connections that fail authentication, logged one line each (the rest are counted)."""


class DriverRendezvous:
    """Rank 0's side of the meeting: publish where to connect, accept and check every rank."""

    def __init__(self, launch: Launch, timeout: float):
        self.launch, self.timeout = launch, timeout
        self.keys = job_keys(launch)  # a missing secret fails here, before the store is touched
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
        :func:`~distmlip.cluster.launch.run_settings` of rank 0.

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
                    ABORTED_CONNECTIONS.append(connection)
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
                reason = first_line(error)
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
