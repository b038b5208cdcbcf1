"""The driver's handles on its workers: local child processes, and remote ranks of a
torchrun/SLURM job (:mod:`distmlip.cluster.launch`), each with its socket to the driver."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from multiprocessing.connection import Connection, wait

from distmlip.cluster.network import ABORTED_CONNECTIONS, io_timeout
from distmlip.driver.failures import KILLED_HINT
from distmlip.errors import StructureRejected
from distmlip.messages import STARTUP_ID

__all__ = [
    "Workers",
    "RemoteProcess",
    "collect_replies",
    "io_timeout",
    "heartbeat",
    "heartbeat_interval",
    "driver_silence",
]


class ReplyFailure(Exception):
    """Raised by :func:`collect_replies`: ``rank`` died (``report`` None) or raised."""

    def __init__(self, rank: int, report: tuple[str, str] | None):
        super().__init__(rank, report)
        self.rank, self.report = rank, report


class NoAnswer(Exception):
    def __init__(self, ranks: list[int]):
        super().__init__(ranks)
        self.ranks = ranks


def collect_replies(connections: list[Connection], request_id: int, timeout: float) -> list:
    """One payload per connection, from the replies that echo ``request_id``.

    Replies to any other id answer an abandoned request and are discarded.

    Raises:
        ReplyFailure: a worker's socket closed (it died) or it replied with an error.
        NoAnswer: some workers did not answer within ``timeout`` seconds.
    """
    payloads: list = [None] * len(connections)
    pending = dict(enumerate(connections))
    deadline = time.monotonic() + timeout
    while pending:
        ready = wait(list(pending.values()), timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            raise NoAnswer(sorted(pending))
        for rank, connection in list(pending.items()):
            if connection not in ready:
                continue
            try:
                kind, reply_id, payload = connection.recv()
            except Exception as error:  # EOF: died; anything else: an unreadable reply
                report = None if isinstance(error, EOFError | OSError) else (repr(error), "")
                raise ReplyFailure(rank, report) from error
            if reply_id != request_id:
                continue
            if kind == "error":
                raise ReplyFailure(rank, payload)
            payloads[rank] = StructureRejected(payload) if kind == "rejected" else payload
            del pending[rank]
    return payloads


class RemoteProcess:
    """A worker that another rank of the job runs (maybe on another machine): the driver
    cannot signal or reap it, only talk to it. ``kill`` sends ``abort`` (the rank exits 1);
    ``poll`` is 1 once its socket is closed (it died, or its node or the network failed)."""

    def __init__(self, connection: Connection, pid: int, host: str, node: int):
        self.connection, self.pid, self.host, self.node = connection, pid, host, node
        self._lost = False
        self._sending = threading.Lock()  # the driver's thread and its heartbeat both send

    def send(self, message) -> None:
        with self._sending:
            self.connection.send(message)

    def poll(self) -> int | None:
        if not self._lost:
            try:
                probe = socket.socket(fileno=os.dup(self.connection.fileno()))
            except (OSError, ValueError):  # our end is closed already
                return 1
            try:
                # Nothing to read but a closed (b"") or reset socket: the rank is gone.
                self._lost = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                pass
            except OSError:
                self._lost = True
            finally:
                probe.close()
        return 1 if self._lost else None

    def kill(self, reason: str = "the driver (rank 0) ended the job after an error") -> None:
        try:
            io_timeout(self.connection, send=1.0)  # a stuck rank must not hold the driver
            self.send(("abort", STARTUP_ID, reason))
        except (OSError, ValueError):
            pass
        else:
            ABORTED_CONNECTIONS.append(self.connection)

    def describe(self, rank: int) -> str:
        where = f"pid {self.pid} on {self.host}, node {self.node}"
        if self.poll() is not None:
            return (
                f"worker {rank} ({where}) closed its connection: it died, or its node or the "
                "network failed"
            )
        return f"worker {rank} ({where}) is connected"


class Workers:
    """Worker processes (``subprocess.Popen``, :class:`~distmlip.driver.zygote.ForkedProcess` or
    :class:`RemoteProcess`) and their sockets, by rank. :meth:`stop` is idempotent, so one
    interrupted by a signal is simply run again."""

    def __init__(self):
        self.processes: list = []  # subprocess.Popen, ForkedProcess or RemoteProcess
        self.connections: list[Connection] = []
        self.owner_pid = os.getpid()
        self.meeting_dir: str | None = None
        """A user-only directory holding the local workers' rendezvous file (no listener:
        another user of the machine can neither read nor join the group), removed on stop."""

    def meeting_place(self) -> str:
        """The ``file://`` init method of a fresh, user-only (0700) directory."""
        import tempfile

        self.meeting_dir = tempfile.mkdtemp(prefix="distmlip-")
        return f"file://{self.meeting_dir}/store"

    def send(self, rank: int, message) -> None:
        process = self.processes[rank]
        if isinstance(process, RemoteProcess):
            process.send(message)
        else:
            self.connections[rank].send(message)

    def stop(self, grace: float) -> None:
        """Ask idle workers to leave, wait ``grace`` s, kill the rest, reap all (remote ranks:
        ``stop`` when idle, else ``abort``; they exit themselves)."""
        if os.getpid() != self.owner_pid:
            # A forked copy of the driver: the workers are its parent's; only drop our sockets.
            for connection in self.connections:
                connection.close()
            return
        if grace > 0:
            for rank in range(len(self.connections)):
                try:
                    self.send(rank, ("stop", STARTUP_ID, None))
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + grace
            for process in self.processes:
                if not isinstance(process, RemoteProcess):
                    try:
                        process.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
        else:
            for process in self.processes:
                if isinstance(process, RemoteProcess):
                    process.kill()
        for process in self.processes:
            if not isinstance(process, RemoteProcess) and process.poll() is None:
                process.kill()
        for process in self.processes:
            if not isinstance(process, RemoteProcess):
                process.wait()
        for connection in self.connections:
            if not any(connection is aborted for aborted in ABORTED_CONNECTIONS):
                connection.close()
        if self.meeting_dir is not None:
            import shutil

            shutil.rmtree(self.meeting_dir, ignore_errors=True)
            self.meeting_dir = None

    def _status(self, rank: int) -> str:
        try:
            import psutil

            return psutil.Process(self.processes[rank].pid).status()
        except Exception:  # psutil missing, or the process vanished just now
            return "unknown"

    def in_trouble(self, rank: int) -> bool:
        """Worker ``rank`` has exited or is stopped (a remote one: its socket closed)."""
        process = self.processes[rank]
        if isinstance(process, RemoteProcess):
            return process.poll() is not None
        return process.poll() is not None or self._status(rank) == "stopped"

    def describe(self, rank: int, closed: bool = False) -> str:
        """What is wrong with worker ``rank``, as far as the operating system can tell
        (``closed``: its socket closed, so it is exiting: wait a moment for its exit code)."""
        process = self.processes[rank]
        if isinstance(process, RemoteProcess):
            return process.describe(rank)
        if closed:
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        code = process.poll()
        if code is not None:
            hint = KILLED_HINT if code == -9 else ""  # the kernel's out-of-memory killer?
            return f"worker {rank} (pid {process.pid}) died with exit code {code}{hint}"
        status = self._status(rank)
        if status == "stopped":
            return f"worker {rank} (pid {process.pid}) is stopped (SIGSTOP or Ctrl-Z)"
        return f"worker {rank} (pid {process.pid}) is {status}"


def heartbeat_interval(timeout: float) -> float:
    """Seconds between the driver's heartbeats to the remote ranks of a launched job."""
    return min(5.0, max(0.5, timeout / 4))


def driver_silence(timeout: float) -> float:
    """Seconds without a word from the driver after which a remote rank leaves."""
    interval = heartbeat_interval(timeout)
    return max(timeout, 4 * interval) + 2 * interval


def heartbeat(pool_reference, workers: Workers, interval: float) -> None:
    """Tell the remote ranks that the driver is alive, every ``interval`` s for as long as
    ``workers`` serve the pool: a rank that hears nothing (no request, no heartbeat) for
    :func:`driver_silence` exits, so a stopped or frozen driver cannot keep it waiting."""
    while True:
        time.sleep(interval)
        pool = pool_reference()
        if pool is None or pool._workers is not workers:
            return
        del pool
        for process in workers.processes:
            if isinstance(process, RemoteProcess):
                try:
                    process.send(("ping", STARTUP_ID, None))
                except (OSError, ValueError):
                    pass  # gone: the next call reports it
