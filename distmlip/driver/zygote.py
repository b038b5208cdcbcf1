"""CPU workers forked from a pre-started interpreter (a *zygote*) instead of started afresh.

A fresh worker spends most of its start-up importing torch and the model's package, paid again
by every worker of every pool (P workers on P cores import side by side; more workers than
cores, or several pools one after another, as in a test suite, a script that tries settings or
a pool restarted after a failure, pay it in full). Measured (``benchmarks/worker_start.py``,
P = 2): a restart takes 0.04-0.35 s forked, 1.4-5.9 s fresh.
The driver therefore starts one zygote per model family and environment (``python -m
distmlip.worker.zygote``), which imports them once; each worker is then an ``os.fork`` of it, ready
at once, and still a process of its own: own session, own environment
(the pool's, including ``allocator="keep"``'s glibc settings, applied with ``mallopt`` since
glibc reads them only at start), its own socket to the driver, exit codes as with
:class:`subprocess.Popen` (``-9``: killed).

Only for ``device="cpu"`` on Linux: a process that forks must not have started CUDA, and
packages may touch CUDA when imported. ``DISTMLIP_WORKER_START=exec`` turns it off (every
worker a fresh interpreter, as on CUDA). A zygote lives as long as the driver process (its
memory, about that of one idle worker before the model loads, is shared with its workers);
it exits when the driver exits. Any failure to use one falls back to a fresh interpreter.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading

from distmlip.environment import MALLOPT_VARIABLES

__all__ = [
    "START_ENVIRONMENT",
    "START_METHODS",
    "ForkedProcess",
    "start_method",
    "preload_modules",
    "fork_worker",
    "prestart",
    "discard_spares",
    "close_zygotes",
]

START_ENVIRONMENT = "DISTMLIP_WORKER_START"
START_METHODS = ("fork", "exec")
"""``fork``: CPU workers forked from a zygote (the default on Linux); ``exec``: each worker a
fresh interpreter (always so on CUDA, in torchrun/SLURM jobs and off Linux)."""


_PER_WORKER = ("OMP_NUM_THREADS", *MALLOPT_VARIABLES, "PYTEST_CURRENT_TEST", START_ENVIRONMENT)
"""Variables that may differ between a zygote and the workers it forks (set in each fork).
Any other difference in the environment gets a zygote of its own, which read it at start
as a fresh interpreter would; pytest changes ``PYTEST_CURRENT_TEST`` at every test."""

_REPLY_TIMEOUT = 30.0
"""Seconds a zygote has to answer a fork or status request (it does no work in between)."""


def start_method(device: str, launched: bool) -> str:
    """How this pool's local workers start: ``"fork"`` or ``"exec"``.

    Raises:
        ValueError: :data:`START_ENVIRONMENT` is set to something else than fork or exec.
    """
    requested = os.environ.get(START_ENVIRONMENT, "fork").strip().lower()
    if requested not in START_METHODS:
        raise ValueError(
            f"{START_ENVIRONMENT}={os.environ[START_ENVIRONMENT]!r}: use 'fork' (CPU workers "
            "forked from a pre-started interpreter, the default) or 'exec' (each a fresh one)"
        )
    forkable = sys.platform.startswith("linux") and hasattr(os, "pidfd_open")
    if requested == "exec" or device != "cpu" or launched or not forkable:
        return "exec"
    return "fork"


def preload_modules(model) -> tuple[str, ...]:
    """The installed modules that unpickling ``model`` imports, as far as its classes tell:
    the zygote imports them before forking (a worker imports anything missing itself)."""
    names = {type(model).__module__}
    if callable(getattr(model, "modules", None)):
        names |= {type(module).__module__ for module in model.modules()}
    return tuple(sorted(name for name in names if _installed(name)))


def _installed(name: str) -> bool:
    """A module from an installed package or distmlip (not a script's or a test's own)."""
    path = getattr(sys.modules.get(name), "__file__", None) or ""
    package = os.path.dirname(os.path.abspath(__file__))
    return path.startswith(package + os.sep) or any(
        part in ("site-packages", "dist-packages") for part in path.split(os.sep)
    )


class ForkedProcess:
    """A worker forked by a zygote: what :class:`subprocess.Popen` offers the driver (``pid``,
    ``poll``, ``wait``, ``kill``, ``returncode``). It is watched and signalled through a
    pidfd (no pid-reuse race); its exit code comes from the zygote, its parent (1 if the
    zygote is gone: the code is lost, the worker is not)."""

    def __init__(self, zygote: _Zygote, pid: int):
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and self._exited():
            self.returncode = self.zygote.status(self.pid)
            os.close(self._pidfd)
            self._pidfd = None
        return self.returncode

    def _exited(self, timeout: float = 0.0) -> bool:
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._exited(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.poll()

    def kill(self) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # exited just now
                pass

    def __del__(self):
        if getattr(self, "_pidfd", None) is not None:
            os.close(self._pidfd)


class _Zygote:
    """The driver's handle on one zygote: its process and its request socket."""

    def __init__(self, environment: dict[str, str]):
        # PR_SET_PDEATHSIG would kill the zygote when the starting thread ends.
        flags = [] if threading.current_thread() is threading.main_thread() else ["no-pdeathsig"]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "distmlip.worker.zygote", str(theirs.fileno()), *flags],
                pass_fds=[theirs.fileno()],
                # One thread: OpenMP and OpenBLAS start no thread pool here, whose threads a
                # fork would lack (libgomp hangs in a child of a process that used its pool).
                env={**environment, "OMP_NUM_THREADS": "1"},
                stdin=subprocess.DEVNULL,
                # What importing a model's package prints is not the driver's output (which
                # may be JSON); its workers get the driver's streams when forked.
                stdout=2 if _is_open(2) else subprocess.DEVNULL,
                start_new_session=True,  # as a worker: Ctrl-C in a terminal is the driver's
            )
        finally:
            theirs.close()
        self.channel = ours
        self.lock = threading.RLock()
        self.broken = False
        self.modules: set[str] | None = None  # imported so far; None: not yet heard from
        self.awaiting: tuple[str, ...] | None = None  # sent ahead by preload_later, unanswered

    def alive(self) -> bool:
        return not self.broken and self.process.poll() is None

    def request(self, message: tuple, fds: tuple[int, ...] = (), timeout: float | None = None):
        """Send ``message`` (and ``fds``), return the reply within ``timeout`` s (default
        :data:`_REPLY_TIMEOUT`). Any failure (also an interrupt) leaves the zygote unusable:
        it is killed, and the caller falls back."""
        with self.lock:
            if not self.alive():
                raise OSError("the zygote is gone")
            try:
                self.channel.settimeout(_REPLY_TIMEOUT if timeout is None else timeout)
                if self.awaiting is not None:  # the answer to preload_later comes first
                    self._reply()
                    self.modules = {*(self.modules or ()), *self.awaiting}
                    self.awaiting = None
                socket.send_fds(self.channel, [pickle.dumps(message)], list(fds))
                return self._reply()
            except BaseException:
                self.discard()
                raise

    def _reply(self):
        reply = self.channel.recv(1 << 16)
        if not reply:
            raise OSError("the zygote closed its socket")
        return pickle.loads(reply)

    def preload_later(self, modules: tuple[str, ...]) -> None:
        """Have ``modules`` imported without waiting: the answer is read by the next request
        (whose timeout then covers this import too)."""
        with self.lock:
            try:
                socket.send_fds(self.channel, [pickle.dumps(("preload", modules))], [])
            except OSError:
                self.discard()
                raise
            self.awaiting = modules

    def fork(self, environment: dict[str, str], worker_socket: socket.socket) -> ForkedProcess:
        # The worker writes where this process's standard output and error go now (as a
        # Popen'ed one would), not where they went when the zygote started: the command line
        # points stdout at stderr while it runs, keeping a model's banner out of its JSON.
        streams = tuple(fd for fd in (1, 2) if _is_open(fd))
        with self.lock:  # the pidfd opens before any other request could reap the worker
            message = ("fork", (environment, streams))
            _, pid = self.request(message, (worker_socket.fileno(), *streams))
            return ForkedProcess(self, pid)

    def preload(self, modules: tuple[str, ...], timeout: float) -> None:
        """Have ``modules`` imported; the first answer (also for none) waits ``timeout`` s,
        while a new zygote imports torch."""
        with self.lock:
            known = {*(self.modules or ()), *(self.awaiting or ())}
            missing = tuple(name for name in modules if name not in known)
            if missing or self.modules is None:
                self.request(("preload", missing), timeout=timeout)
                self.modules = {*(self.modules or ()), *missing}

    def status(self, pid: int) -> int:
        """The exit code of ``pid``, which has exited."""
        try:
            code = self.request(("status", pid))[1]
        except (OSError, EOFError, pickle.UnpicklingError):
            code = None
        return 1 if code is None else code  # None: the zygote is gone, or it was not its

    def discard(self) -> None:
        self.broken = True
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_ZYGOTES: dict[tuple, _Zygote] = {}
"""Zygotes by (environment, working directory, packages)."""
_SPARES: dict[tuple, tuple[frozenset, _Zygote]] = {}
"""Zygotes started by :func:`prestart`, by (environment, working directory): their packages
and themselves, until a pool claims one."""
_ZYGOTES_LOCK = threading.Lock()
_OWNER = [os.getpid()]


def _place(environment: dict[str, str], modules: tuple[str, ...]):
    """(environment, working directory), packages: where a zygote may serve ``modules``."""
    shared = {name: value for name, value in environment.items() if name not in _PER_WORKER}
    packages = frozenset(name.partition(".")[0] for name in modules) - {"distmlip", "torch"}
    # The working directory is on a worker's sys.path (python -m), as the environment's
    # PYTHONPATH is: a zygote, started in the driver's, serves one of each.
    return (tuple(sorted(shared.items())), os.getcwd()), packages


def _owned() -> None:
    """Forget a parent's zygotes in a forked copy of the driver (call with the lock held)."""
    if _OWNER[0] != os.getpid():
        _ZYGOTES.clear()
        _SPARES.clear()
        _OWNER[0] = os.getpid()


def _zygote_for(environment: dict[str, str], modules: tuple[str, ...]) -> _Zygote:
    """The live zygote for this environment and these packages: the one serving them, else
    a spare that imported none other (it imports the rest on request), else a new one."""
    place, packages = _place(environment, modules)
    with _ZYGOTES_LOCK:
        _owned()
        zygote = _ZYGOTES.get((*place, packages))
        if zygote is None or not zygote.alive():
            spare_packages, spare = _SPARES.pop(place, (None, None))
            if spare is not None and spare.alive() and spare_packages <= packages:
                zygote = spare
            else:
                if spare is not None:  # another model's: not to be forked for this one
                    spare.discard()
                zygote = _Zygote(dict(place[0]))
            _ZYGOTES[(*place, packages)] = zygote
        return zygote


def prestart(modules: tuple[str, ...] = ()) -> None:
    """Start now the zygote that this process's next CPU pool will fork its workers from,
    importing torch, the worker's modules and ``modules`` (the model's package, when known)
    while the caller goes on, e.g. loading the model. The command line does this: the two
    imports then take one core each instead of one after the other (seconds less per run).

    Claimed by the first pool with the same environment and working directory whose model
    needs at least these packages; :func:`discard_spares` stops one nobody claimed. Nothing
    is started where workers would not be forked (:func:`start_method`) or where a zygote
    for these packages is already running."""
    if start_method("cpu", launched=False) != "fork":
        return
    from distmlip.environment import worker_environment
    from distmlip.options import WorkerOptions

    # The environment a default CPU pool's workers get (its per-worker variables aside).
    place, packages = _place(worker_environment(WorkerOptions()), modules)
    with _ZYGOTES_LOCK:
        _owned()
        running = _ZYGOTES.get((*place, packages))
        if (running is not None and running.alive()) or place in _SPARES:
            return
        try:
            spare = _Zygote(dict(place[0]))
            spare.preload_later(modules)
        except OSError:
            return
        _SPARES[place] = (packages, spare)


def discard_spares() -> None:
    """Stop the zygotes :func:`prestart` started that no pool claimed."""
    with _ZYGOTES_LOCK:
        _owned()
        for _, spare in _SPARES.values():
            if not spare.broken:
                spare.discard()
        _SPARES.clear()


def fork_worker(
    environment: dict[str, str],
    modules: tuple[str, ...],
    worker_socket: socket.socket,
    timeout: float,
) -> ForkedProcess | None:
    """A worker forked from the zygote for ``environment`` (with ``modules`` imported),
    serving ``worker_socket``; None if no zygote could do it (start a fresh interpreter).
    ``timeout``: seconds for a new zygote to import torch and ``modules``."""
    try:
        zygote = _zygote_for(environment, modules)
        zygote.preload(modules, timeout)
        return zygote.fork(environment, worker_socket)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def close_zygotes() -> None:
    """Stop this process's zygotes, spares included (workers they forked live on: they
    watch the driver, not the zygote)."""
    discard_spares()
    with _ZYGOTES_LOCK:
        _owned()
        for zygote in _ZYGOTES.values():
            if not zygote.broken:
                zygote.discard()
        _ZYGOTES.clear()
