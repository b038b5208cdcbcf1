"""The zygote's side of :mod:`distmlip.zygote`: the loop ``python -m distmlip._zygote`` runs,
which imports what workers need, then forks one worker per request."""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from multiprocessing.connection import Connection

from distmlip.zygote import MALLOPT_VARIABLES, WORKER_MODULES

__all__ = ["Child", "serve"]


@dataclass
class Child:
    """What a forked worker takes out of :func:`serve`: its socket to the driver and the
    driver's pid (the worker dies with the driver, not with the zygote)."""

    connection: Connection
    driver_pid: int


def serve(fd: int, pdeathsig: bool) -> Child | None:
    """The zygote's loop (see :mod:`distmlip._zygote`): returns None when the driver closed
    its socket, or, in a forked worker, that worker's :class:`Child`."""
    from distmlip.worker import die_with_parent

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
