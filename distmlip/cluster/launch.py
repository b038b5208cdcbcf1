"""Jobs started by torchrun or SLURM's srun: global rank 0 drives, every rank is a worker.

Under ``torchrun --nnodes N --nproc-per-node K ...`` (or ``srun``) the same command or script
runs as N·K processes. Global rank 0 is the *driver*: it runs the command (reads the input,
writes the output) and starts worker 0 as its own child, as in one process. Every other rank
becomes worker ``RANK``: it loads its own model, serves the driver's requests until the driver
closes, and exits (status 0; 1 after an error anywhere in the job).

The ranks meet (:mod:`distmlip.cluster.rendezvous`) through the job's TCP store (torchrun's agent
hosts it at ``MASTER_ADDR:MASTER_PORT``; under srun rank 0 hosts one there). The driver
publishes the addresses of a listening socket and an authentication key; each rank connects,
says who it is (host, pid, and the :func:`identity` of its model and installation), and the
driver refuses the job at once if any rank differs from itself. Workers then form their
process group through the same store, and exchange halo features point to point with their
neighbours only (:mod:`distmlip.exchange.transport`).

Faults: a rank that fails before it connects posts its error to the store, so the driver
stops at once, naming it. After the start, a worker's death closes its socket (the driver sees
it at once) and a hung worker or lost network is caught by the call timeout; the driver then
aborts every other rank, which exits with a one-line error, and its command fails cleanly (a
trajectory keeps its last complete frame). A remote worker cannot be restarted, so in a
launched job a failed or abandoned call ends the job.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

__all__ = ["Launch", "detect_launch", "identity", "run_settings", "LAUNCH_ENVIRONMENT"]

LAUNCH_ENVIRONMENT = "DISTMLIP_LAUNCH"
"""``=local``: ignore torchrun/SLURM variables; calculators start their own workers."""


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
    mode = environ.get(LAUNCH_ENVIRONMENT, "auto").lower()
    if mode not in ("auto", "local"):
        raise ValueError(
            f"{LAUNCH_ENVIRONMENT}={environ[LAUNCH_ENVIRONMENT]!r}: use 'local' (ignore "
            "torchrun/SLURM) or 'auto' (the default)"
        )
    if mode == "local":
        return None
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, or any env:// launcher
        world = _integer(environ, "WORLD_SIZE")
        if world < 2:
            return None
        missing = [
            name
            for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            if name not in environ
        ]
        if missing:
            # Without LOCAL_RANK every rank of a machine would take the same cores and GPU.
            raise ValueError(
                f"RANK and WORLD_SIZE are set but {', '.join(missing)} not (torchrun sets them "
                "all); set them, or DISTMLIP_LAUNCH=local to ignore the launch"
            )
        return Launch(
            rank=_integer(environ, "RANK"),
            world_size=world,
            local_rank=_integer(environ, "LOCAL_RANK"),
            local_world_size=_integer(environ, "LOCAL_WORLD_SIZE"),
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
    """What every rank must share: Python's version, the versions of the packages the model's
    code comes from (distmlip, torch, chgnet, mace-torch, ...) and a hash of distmlip's own
    source (editable installs of different commits differ), the model's class, and hashes of
    its weights (every parameter and buffer, persistent or not) and of its settings (every
    plain or tensor attribute of every submodule: cutoffs, heads, task names, flags)."""
    import importlib.metadata

    weights, settings = hashlib.sha256(), hashlib.sha256()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in sorted(tensors.items()):
        weights.update(f"{name}:{_canonical(tensor)}".encode())
    packages = {"distmlip", "torch"}
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        packages.add(type(module).__module__.split(".")[0])
        for key, value in sorted(vars(module).items()):
            if not key.startswith("_"):
                settings.update(f"{name}.{key}={_canonical(value)}".encode())
    distributions = importlib.metadata.packages_distributions()
    versions = {}
    for package in sorted(packages):
        for distribution in distributions.get(package, ())[:1]:
            versions[distribution] = importlib.metadata.version(distribution)
    return {
        "python": sys.version.split()[0],
        **versions,
        "distmlip source": _source_digest(),
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights.hexdigest()[:16],
        "settings": settings.hexdigest()[:16],
    }


def run_settings(options, graph_options) -> dict[str, str]:
    """The options that change the numbers, which every rank's command line must agree on
    (threads and memory may differ from machine to machine)."""
    names = ("dtype", "device", "backend", "checkpoint")
    settings = {name: repr(getattr(options, name)) for name in names}
    for name in ("partitioner", "halo", "skin", "resident"):
        settings[name] = repr(getattr(graph_options, name))
    return settings


def _source_digest() -> str:
    """A hash of distmlip's Python sources (this installation's code, whatever its version)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _canonical(value) -> str:
    """A text that is the same in every process for equal values (tensors and arrays by a
    hash of their bytes, sets sorted, other objects by type: their reprs hold addresses)."""
    import torch

    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes()
        return f"{data.dtype}{tuple(data.shape)}:{hashlib.sha256(raw).hexdigest()}"
    if isinstance(value, bool | int | float | str | bytes | type(None)):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(item) for item in value) + "]"
    if isinstance(value, set | frozenset):
        return "{" + ",".join(sorted(_canonical(item) for item in value)) + "}"
    if isinstance(value, dict):
        items = sorted((_canonical(k), _canonical(v)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy arrays
        digest = hashlib.sha256(value.tobytes()).hexdigest()
        return f"{value.dtype}{getattr(value, 'shape', '')}:{digest}"
    return type(value).__qualname__
