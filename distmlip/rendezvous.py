"""How the ranks of a torchrun/SLURM job meet (:mod:`distmlip.cluster` says who they are).

Through the job's TCP store (torchrun's agent hosts it at ``MASTER_ADDR:MASTER_PORT``; under srun
rank 0 hosts one there): rank 0 publishes the addresses of a listening socket and an
authentication key; every other rank connects, authenticates, says who it is (host, pid,
:func:`~distmlip.cluster.identity`), and is accepted or refused; a rank that fails before it
connects posts its error there, so the others stop at once. Then each rank serves rank 0 as
worker ``RANK`` (:func:`serve`) until rank 0 closes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import select
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from distmlip.cluster import Launch, identity, run_settings
from distmlip.errors import WorkerError
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

INTERFACE_ENVIRONMENT = "DISTMLIP_SOCKET_IFNAME"
"""Network interface whose address the driver publishes (default: ``GLOO_SOCKET_IFNAME``,
then ``NCCL_SOCKET_IFNAME``, then the one that routes to ``MASTER_ADDR``)."""


class JobEnded(RuntimeError):
    """Another rank failed to start, or rank 0 refused this one: nothing more to report."""


_HOSTED: dict = {}
"""The store this process hosts (rank 0 under srun), by job: one server per process."""


def _store(launch: Launch, timeout: float, host: bool = False):
    """A client of the job's TCP store, or (``host``) the store itself, kept for the process's
    lifetime so that the other ranks can post and read while rank 0 works."""
    from torch.distributed import TCPStore

    where = f"{launch.master_addr}:{launch.master_port}"
    if host or launch.job in _HOSTED:
        if launch.job not in _HOSTED:
            try:
                _HOSTED[launch.job] = TCPStore(
                    launch.master_addr,
                    launch.master_port,
                    is_master=True,
                    timeout=datetime.timedelta(seconds=timeout),
                    wait_for_workers=False,
                )
            except Exception as error:
                if "EADDRINUSE" not in str(error) and "in use" not in str(error):
                    raise
                raise ValueError(
                    f"MASTER_PORT={launch.master_port} is in use on this machine (another job "
                    "or program): give each job its own, e.g. "
                    "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"
                ) from None
        return _HOSTED[launch.job]

    def connect():
        return TCPStore(
            launch.master_addr,
            launch.master_port,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )

    # TCPStore's own timeout does not bound a handshake with a listener that is not a store.
    return _within(connect, timeout + 5.0, f"connecting to the job's store at {where}")


def _within(function, seconds: float, what: str):
    """``function()``, or RuntimeError if it has not returned within ``seconds``."""
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="distmlip-store", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RuntimeError(
            f"{what}: no answer within {seconds:.0f} s; is another program listening on "
            "MASTER_PORT?"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def host_store(launch: Launch) -> None:
    """On rank 0 of an srun job, start the job's store now, before reading any input, so the
    other ranks hear at once if rank 0 fails (torchrun's agent hosts it already)."""
    if launch.rank == 0 and launch.host_store:
        _store(launch, STARTUP_TIMEOUT, host=True)


def report_failure(launch: Launch, message: str) -> None:
    """Tell the other ranks (through the store) that this rank failed before it could serve,
    so they stop at once instead of waiting for it. Best effort: a few seconds at most."""
    try:
        store = _store(launch, 5.0)
        store.set(f"{launch.prefix}/failed/{launch.rank}", message)
        store.add(f"{launch.prefix}/failures", 1)
    except Exception:  # the store is gone: the job is ending anyway
        pass


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


def _failures(store, launch: Launch) -> str | None:
    """The first failure another rank posted, as ``rank R: message``, or None."""
    if store.add(f"{launch.prefix}/failures", 0) == 0:
        return None
    for rank in range(launch.world_size):
        key = f"{launch.prefix}/failed/{rank}"
        if store.check([key]):
            return f"rank {rank} failed to start: {store.get(key).decode()}"
    return None


HANDSHAKE_TIMEOUT = 10.0
"""Seconds each step of the authentication handshake may take (a silent client is dropped)."""


def _keepalive(sock: socket.socket, timeout: float) -> None:
    """Notice a peer whose machine or network vanished (no FIN): idle, by keep-alive probes
    within ~30 s; with data unacknowledged, after ``timeout`` s (``TCP_USER_TIMEOUT``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", 15),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(timeout * 1000)),
    )
    for option, value in options:
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _interfaces_named(spec: str, names) -> list[str]:
    """The interfaces an ``NCCL_SOCKET_IFNAME``-style value selects: comma-separated name
    prefixes, ``=`` for exact names, ``^`` to exclude (``^lo,docker``: all but those)."""
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    wanted = [name for name in spec.lstrip("=").split(",") if name]

    def named(interface: str) -> bool:
        return any(interface == w if exact else interface.startswith(w) for w in wanted)

    return [interface for interface in sorted(names) if named(interface) != exclude]


def _published_addresses(launch: Launch) -> list[str]:
    """This machine's addresses for the other ranks to try, best first: the named interface's
    alone, else the one that routes to the store's host, then every other IPv4 address
    (loopback last: a hostname may resolve to 127.0.1.1, which other machines cannot reach)."""
    import psutil

    interfaces = psutil.net_if_addrs()
    for variable in (INTERFACE_ENVIRONMENT, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        spec = os.environ.get(variable, "")
        if not spec:
            continue
        chosen = _interfaces_named(spec, interfaces)
        addresses = [
            a.address for name in chosen for a in interfaces[name] if a.family == socket.AF_INET
        ]
        if not addresses:
            raise ValueError(
                f"{variable}={spec!r} selects no network interface with an IPv4 address here; "
                f"this machine has {', '.join(sorted(interfaces))}"
            )
        return sorted(addresses, key=lambda address: address.startswith("127."))
    found = []
    try:  # the interface that routes to the store's host (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(launch.master_addr), launch.master_port))
            found.append(probe.getsockname()[0])
    except OSError:
        pass
    found += [
        a.address for values in interfaces.values() for a in values if a.family == socket.AF_INET
    ]
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda address: address.startswith("127."))


def _connect(addresses: list[str], port: int, authkey: bytes, timeout: float) -> Connection:
    """The first of the driver's ``addresses`` that answers, authenticated both ways."""
    failures = []
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=5.0)
        except OSError as error:
            failures.append(f"{address}: {error.strerror or error}")
            continue
        sock.settimeout(None)
        _keepalive(sock, timeout)
        connection = Connection(sock.detach())
        io_timeout(connection, HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT)
        answer_challenge(connection, authkey)
        deliver_challenge(connection, authkey)
        io_timeout(connection, 0.0, 0.0)
        return connection
    raise RuntimeError(
        f"cannot reach rank 0 at port {port} ({'; '.join(failures)}); name the interface the "
        "machines reach each other on: GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME) on every node"
    )


class DriverRendezvous:
    """Rank 0's side of the meeting: publish where to connect, accept and check every rank."""

    def __init__(self, launch: Launch, timeout: float):
        self.launch, self.timeout = launch, timeout
        self.store = _store(launch, timeout, host=launch.host_store)
        addresses = _published_addresses(launch)
        self.listener = socket.create_server(("", 0), backlog=launch.world_size)
        self.authkey = os.urandom(32)
        port = self.listener.getsockname()[1]
        self.store.set(f"{launch.prefix}/driver", pickle.dumps((addresses, port, self.authkey)))

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
                failure = _failures(self.store, self.launch)
                if failure:
                    raise WorkerError(f"starting the job: {failure}")
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"starting the job: ranks {sorted(waiting)} did not connect to rank 0 "
                        f"within {wait:.0f} s; start the same command on every node (a script "
                        "must make its DistributedCalculator on every rank)"
                    )
                if not select.select([self.listener], [], [], 0.5)[0]:
                    continue
                sock, _ = self.listener.accept()
                _keepalive(sock, self.timeout)
                connection = Connection(sock.detach())
                try:
                    io_timeout(connection, HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT)
                    deliver_challenge(connection, self.authkey)
                    answer_challenge(connection, self.authkey)
                    _, rank, hello = connection.recv()
                    io_timeout(connection, 0.0, 0.0)
                except Exception:  # not one of ours (a port scanner), silent, or it died
                    connection.close()
                    continue
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
            self.listener.close()
        return ranks


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


def _await_driver(launch: Launch, store, deadline: float) -> tuple[list[str], int, bytes]:
    key = f"{launch.prefix}/driver"
    while not _present(store, key, launch):
        failure = _failures(store, launch)
        if failure:
            raise JobEnded(failure)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"rank 0 did not start the job within {STARTUP_TIMEOUT:.0f} s (no driver in "
                f"the store at {launch.master_addr}:{launch.master_port})"
            )
        time.sleep(0.2)
    return pickle.loads(store.get(key))


def _present(store, key: str, launch: Launch) -> bool:
    try:
        return store.check([key])
    except Exception:  # the store's host (rank 0's machine) ended or is unreachable
        raise JobEnded(
            f"lost the job's store at {launch.master_addr}:{launch.master_port}: rank 0 ended "
            "or its machine is unreachable (rank 0's message says why)"
        ) from None


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
    store = _store(launch, wait)
    addresses, port, authkey = _await_driver(launch, store, deadline)
    connection = _connect(addresses, port, authkey, options.timeout)
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
