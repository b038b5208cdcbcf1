"""``python -m distmlip.worker.zygote FD``: the pre-started interpreter that forks CPU workers.

See :mod:`distmlip.driver.zygote` (the driver's side) for why and when. Requests arrive on the
socket ``FD`` as one pickled tuple each, a worker's socket riding along as ``SCM_RIGHTS``:

* ``("preload", [module, ...])``: import them here (what the next workers' model needs);
  reply ``("ok", [module that failed, ...])``.
* ``("fork", (environment, streams))`` + a socket + the driver's ``streams`` (of stdout=1 and
  stderr=2, those open): fork a worker serving that socket with that environment, writing
  where the driver's standard output and error go at that moment; reply ``("pid", pid)``.
* ``("status", pid)``: that worker's exit code (it exited and was reaped); reply
  ``("status", code or None)``, codes as :attr:`subprocess.Popen.returncode` gives them
  (``-9``: SIGKILL).

The zygote never starts a thread pool, a process group or CUDA, so its forks start clean. It
exits when the driver closes its socket or dies. Its workers watch the driver (a pidfd), not
the zygote: a zygote that is stopped or fails leaves the workers of running pools alone.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

from distmlip.environment import MALLOPT_VARIABLES

__all__ = ["Child", "serve"]


@dataclass
class Child:
    """What a forked worker takes out of :func:`serve`: its socket to the driver and the
    driver's pid (the worker dies with the driver, not with the zygote)."""

    connection: Connection
    driver_pid: int


def serve(fd: int, pdeathsig: bool) -> Child | None:
    """The zygote's loop (see :mod:`distmlip.worker.zygote`): returns None when the driver closed
    its socket, or, in a forked worker, that worker's :class:`Child`."""
    from distmlip.worker.main import die_with_parent

    driver = os.getppid()
    die_with_parent(driver, pdeathsig)
    for name in WORKER_MODULES:
        __import__(name)
    channel = socket.socket(fileno=fd)
    codes: dict[int, int] = {}  # exit codes of reaped workers, until the driver asks
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1 << 20, 4)
        except OSError:
            return None
        if not data:
            return None
        _reap_all(codes)
        kind, argument = pickle.loads(data)
        if kind == "preload":
            channel.send(pickle.dumps(("ok", _import_all(argument))))
        elif kind == "status":
            channel.send(pickle.dumps(("status", codes.pop(argument, None))))
        elif kind == "fork":
            environment, streams = argument
            pid = os.fork()
            if pid == 0:
                try:
                    channel.close()
                    os.setsid()
                    for target, fd in zip(streams, fds[1:], strict=True):
                        os.dup2(fd, target)  # the driver's standard output and error, as now
                        os.close(fd)
                    _adopt(environment)
                    return Child(Connection(fds[0]), driver)
                except BaseException:
                    os._exit(1)
            for descriptor in fds:
                os.close(descriptor)
            channel.send(pickle.dumps(("pid", pid)))


def _import_all(modules) -> list[str]:
    failed = []
    for name in modules:
        try:
            __import__(name)
        except Exception:  # the worker will import it itself, and report what fails
            failed.append(name)
    return failed


def _reap_all(codes: dict[int, int]) -> None:
    """Collect the exit codes of every worker that has exited (no zombies are left)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no children
            return
        if pid == 0:
            return
        codes[pid] = os.waitstatus_to_exitcode(status)


def _adopt(environment: dict[str, str]) -> None:
    """This fork's environment: the pool's, with glibc's allocator variables applied."""
    import ctypes

    for name, option in MALLOPT_VARIABLES.items():
        if name in environment and environment[name] != os.environ.get(name):
            try:
                value = min(int(environment[name]), 2**31 - 1)
                ctypes.CDLL("libc.so.6").mallopt(option, value)
            except (OSError, AttributeError, ValueError):  # not glibc, or not a number
                pass
    os.environ.clear()
    os.environ.update(environment)


WORKER_MODULES = (
    "torch",
    "torch.distributed",
    "psutil",
    "distmlip.worker.main",
    "distmlip.worker.builders",
    "distmlip.exchange.comm",
    "distmlip.worker.store",
    "distmlip.worker.engine",
    "distmlip.exchange",
    "distmlip.trace",
)
"""What every worker imports, so every zygote imports it before it forks."""


if __name__ == "__main__":
    # A Ctrl-C that reaches the whole process group is the driver's to handle.
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from distmlip.worker.main import exit_process, worker_main

    child = serve(int(sys.argv[1]), pdeathsig=sys.argv[2:] != ["no-pdeathsig"])
    if child is not None:  # a forked worker, out of the zygote's loop: serve the driver
        worker_main(child.connection, driver_pid=child.driver_pid)
    exit_process(0)
