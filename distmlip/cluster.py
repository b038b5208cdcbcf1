"""Jobs started by torchrun or SLURM's srun: global rank 0 drives, every rank is a worker.

Under ``torchrun --nnodes N --nproc-per-node K ...`` (or ``srun``) the same command or script
runs as N·K processes. Global rank 0 is the *driver*: it runs the command (reads the input,
writes the output) and starts worker 0 as its own child, as in one process. Every other rank
becomes worker ``RANK``: it loads its own model, serves the driver's requests until the driver
closes, and exits (status 0; 1 after an error anywhere in the job).

The ranks meet through the job's TCP store (torchrun's agent hosts it at
``MASTER_ADDR:MASTER_PORT``; under srun rank 0 hosts one there). The driver publishes the
address of a listening socket and an authentication key; each rank connects, says who it is
(host, pid, and the :func:`identity` of its model and installation), and the driver refuses the
job at once if any rank differs from itself. Workers then form their process group through the
same store, and exchange halo features point to point with their neighbours only
(:mod:`distmlip.transport`).

Faults: a rank that fails before it connects posts its error to the store, so the driver
stops at once, naming it. After the start, a worker's death closes its socket (the driver sees
it at once) and a hung worker or lost network is caught by the call timeout; the driver then
aborts every other rank, which exits with a one-line error, and its command fails cleanly (a
trajectory keeps its last complete frame). A remote worker cannot be restarted, so in a
launched job a failed or abandoned call ends the job.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import select
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge

from distmlip.errors import WorkerError
from distmlip.worker import STARTUP_TIMEOUT, run_worker

__all__ = [
    "Launch",
    "JobEnded",
    "detect_launch",
    "identity",
    "DriverRendezvous",
    "serve",
    "report_failure",
    "host_store",
]

LAUNCH_ENVIRONMENT = "DISTMLIP_LAUNCH"
"""``=local``: ignore torchrun/SLURM variables; calculators start their own workers."""

INTERFACE_ENVIRONMENT = "DISTMLIP_SOCKET_IFNAME"
"""Network interface whose address the driver publishes (default: ``GLOO_SOCKET_IFNAME``,
then ``NCCL_SOCKET_IFNAME``, then the one that routes to ``MASTER_ADDR``)."""


class JobEnded(RuntimeError):
    """Another rank failed to start, or rank 0 refused this one: nothing more to report."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a launched job (from the launcher's environment)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node: int
    master_addr: str
    master_port: int
    host_store: bool
    """Rank 0 must host the TCP store (srun); torchrun's agent hosts it otherwise."""
    job: str
    """Keys in the store are under ``distmlip/<job>``."""
    source: str
    cpus_per_task: int | None = None

    @property
    def prefix(self) -> str:
        return f"distmlip/{self.job}"

    def threads(self, explicit: int | None) -> int:
        """Torch threads of this rank's worker: ``explicit``, SLURM's cpus per task, or this
        machine's cores (this process's affinity) shared by its workers."""
        if explicit:
            return explicit
        if self.cpus_per_task:
            return self.cpus_per_task
        return max(1, len(_available_cores()) // self.local_world_size)

    def cores(self, threads: int) -> tuple[int, ...]:
        """Cores to pin this rank's worker to: its own share, where there are enough."""
        available = _available_cores()
        if len(available) < self.local_world_size * threads:
            return ()
        return tuple(available[self.local_rank * threads : (self.local_rank + 1) * threads])


def _available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _tasks_per_node(text: str) -> list[int]:
    """SLURM's ``2(x3),1`` → ``[2, 2, 2, 1]``."""
    counts = []
    for part in text.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def _integer(environ, name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise ValueError(f"the launcher set {name}={environ.get(name)!r}, not an integer") from None


def detect_launch(environ=None) -> Launch | None:
    """The job this process belongs to (torchrun, or srun with several tasks), or None.

    Raises:
        ValueError: a launch whose variables are incomplete (srun without ``MASTER_ADDR``).
    """
    environ = os.environ if environ is None else environ
    if environ.get(LAUNCH_ENVIRONMENT, "auto") == "local":
        return None
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, or any env:// launcher
        world = _integer(environ, "WORLD_SIZE")
        if world < 2:
            return None
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise ValueError("RANK and WORLD_SIZE are set but MASTER_ADDR or MASTER_PORT is not")
        return Launch(
            rank=_integer(environ, "RANK"),
            world_size=world,
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
            node=int(environ.get("GROUP_RANK", 0)),
            master_addr=environ["MASTER_ADDR"],
            master_port=_integer(environ, "MASTER_PORT"),
            host_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
            job=".".join(
                environ.get(name, "0")
                for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
            ),
            source="torchrun",
        )
    # srun sets SLURM_STEP_NUM_TASKS in its tasks only; a batch script or salloc shell that
    # runs python directly is one process, not a launch.
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        if "MASTER_ADDR" not in environ:
            raise ValueError(
                "srun started several tasks but MASTER_ADDR is not set; in the batch script: "
                'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            )
        node = int(environ.get("SLURM_NODEID", 0))
        per_node = _tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        cpus = environ.get("SLURM_CPUS_PER_TASK")
        return Launch(
            rank=_integer(environ, "SLURM_PROCID"),
            world_size=_integer(environ, "SLURM_STEP_NUM_TASKS"),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            local_world_size=per_node[min(node, len(per_node) - 1)],
            node=node,
            master_addr=environ["MASTER_ADDR"],
            master_port=int(environ.get("MASTER_PORT", 29500)),
            host_store=True,
            job=f"{environ.get('SLURM_JOB_ID', 'job')}.{environ.get('SLURM_STEP_ID', 0)}",
            source="SLURM",
            cpus_per_task=int(cpus) if cpus and cpus.isdigit() else None,
        )
    return None


def identity(model) -> dict[str, str]:
    """What every rank must share: distmlip, torch and Python versions, the model's class and
    a hash of its weights and settings (sha256 over every parameter and buffer)."""
    import torch

    import distmlip

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    for name in ("cutoff", "num_layers", "max_skin"):
        digest.update(f"{name}={getattr(model, name, None)!r}".encode())
    return {
        "distmlip": distmlip.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": digest.hexdigest()[:16],
    }


_HOSTED: dict = {}
"""The store this process hosts (rank 0 under srun), by job: one server per process."""


def _store(launch: Launch, timeout: float, host: bool = False):
    """A client of the job's TCP store, or (``host``) the store itself, kept for the process's
    lifetime so that the other ranks can post and read while rank 0 works."""
    from torch.distributed import TCPStore

    if host or launch.job in _HOSTED:
        if launch.job not in _HOSTED:
            _HOSTED[launch.job] = TCPStore(
                launch.master_addr,
                launch.master_port,
                is_master=True,
                timeout=datetime.timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        return _HOSTED[launch.job]
    return TCPStore(
        launch.master_addr,
        launch.master_port,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout),
        wait_for_workers=False,
    )


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


def _failures(store, launch: Launch) -> str | None:
    """The first failure another rank posted, as ``rank R: message``, or None."""
    if store.add(f"{launch.prefix}/failures", 0) == 0:
        return None
    for rank in range(launch.world_size):
        key = f"{launch.prefix}/failed/{rank}"
        if store.check([key]):
            return f"rank {rank} failed to start: {store.get(key).decode()}"
    return None


def _keepalive(sock: socket.socket) -> None:
    """Notice a peer whose machine or network vanished (no FIN) within ~30 s when idle."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _published_address(launch: Launch) -> str:
    """The address of this machine that the other ranks can reach."""
    import psutil

    for variable in (INTERFACE_ENVIRONMENT, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        name = os.environ.get(variable, "").split(",")[0].lstrip("=^")
        if not name:
            continue
        interfaces = psutil.net_if_addrs()
        addresses = [a.address for a in interfaces.get(name, ()) if a.family == socket.AF_INET]
        if not addresses:
            raise ValueError(
                f"{variable}={name!r}: no such network interface with an IPv4 address here; "
                f"this machine has {', '.join(sorted(interfaces))}"
            )
        return addresses[0]
    # The interface that routes to the store's host (no packet is sent).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(launch.master_addr), launch.master_port))
        return probe.getsockname()[0]


class DriverRendezvous:
    """Rank 0's side of the meeting: publish where to connect, accept and check every rank."""

    def __init__(self, launch: Launch, timeout: float):
        self.launch, self.timeout = launch, timeout
        self.store = _store(launch, timeout, host=launch.host_store)
        address = _published_address(launch)
        self.listener = socket.create_server((address, 0), backlog=launch.world_size)
        self.authkey = os.urandom(32)
        port = self.listener.getsockname()[1]
        self.store.set(f"{launch.prefix}/driver", pickle.dumps((address, port, self.authkey)))

    @property
    def group_store(self) -> tuple[str, int, str]:
        """Where the workers form their process group: ``WorkerConfig.store``."""
        return (self.launch.master_addr, self.launch.master_port, f"{self.launch.prefix}/group")

    def accept(self, own: dict[str, str]) -> dict[int, tuple[Connection, dict]]:
        """Every other rank's connection and hello, checked against ``own`` identity.

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
                        f"within {wait:.0f} s; start the same command on every node"
                    )
                if not select.select([self.listener], [], [], 0.5)[0]:
                    continue
                sock, _ = self.listener.accept()
                _keepalive(sock)
                connection = Connection(sock.detach())
                try:
                    deliver_challenge(connection, self.authkey)
                    answer_challenge(connection, self.authkey)
                    _, rank, hello = connection.recv()
                except Exception:  # not one of ours (a port scanner), or it died meanwhile
                    connection.close()
                    continue
                ranks[rank] = (connection, hello)
                waiting.discard(rank)
            for rank, (_, hello) in sorted(ranks.items()):
                if hello["identity"] != own:
                    raise ValueError(_mismatch(rank, hello, own))
        except BaseException as error:
            for connection, _ in ranks.values():
                try:
                    connection.send(("refused", str(error)))
                except OSError:
                    pass
                connection.close()
            raise
        finally:
            self.listener.close()
        return ranks


def _mismatch(rank: int, hello: dict, own: dict) -> str:
    theirs = hello["identity"]
    differ = [
        f"{key} {theirs.get(key)} on rank {rank}, {value} on rank 0"
        for key, value in own.items()
        if theirs.get(key) != value
    ]
    return (
        f"rank {rank} (on {hello['host']}) was started with a different model or installation: "
        f"{'; '.join(differ)}; start every rank with the same command, model and versions"
    )


def _await_driver(launch: Launch, store, deadline: float) -> tuple[str, int, bytes]:
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
    "failed": (1, "could not start its worker (rank 0's message says why)"),
}


def serve(model, launch: Launch, options) -> None:
    """Be worker ``launch.rank`` of the job until the driver closes it, then exit the process
    (``SystemExit``: 0 after a clean end, 1 after an error, with one line on stderr)."""
    sys.stdout.flush()
    os.dup2(2, 1)  # nothing but rank 0's output on standard output (model banners included)
    try:
        status, message = ENDINGS[_serve(model, launch, options)]
    except Exception as error:
        status, message = 1, (str(error).strip().splitlines() or [type(error).__name__])[0]
        if not isinstance(error, JobEnded):
            report_failure(launch, message)
    if message:
        print(f"distmlip: error: rank {launch.rank}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def _serve(model, launch: Launch, options) -> str:
    import signal

    # Ctrl-C reaches every process of a terminal's job: rank 0 handles it, and ends the job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + max(options.timeout, STARTUP_TIMEOUT)
    store = _store(launch, max(options.timeout, STARTUP_TIMEOUT))
    address, port, authkey = _await_driver(launch, store, deadline)
    connection = Client((address, port), authkey=authkey)
    with socket.socket(fileno=os.dup(connection.fileno())) as sock:
        _keepalive(sock)
    hello = {"host": socket.gethostname(), "pid": os.getpid(), "node": launch.node}
    connection.send(("hello", launch.rank, {**hello, "identity": identity(model)}))
    kind, payload = connection.recv()
    if kind == "refused":
        raise JobEnded(f"refused by rank 0: {payload}")
    threads = launch.threads(options.threads_per_worker)
    config = replace(
        payload,
        threads=threads,
        cores=launch.cores(threads),
        local_rank=launch.local_rank,
        parent_pid=os.getppid(),
    )
    return run_worker(connection, config, lambda: model)
