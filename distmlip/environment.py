"""The environment the worker processes start with (allocator settings, threads) and the
machine's memory."""

from __future__ import annotations

import os

from distmlip.options import WorkerOptions

MB = 2**20

__all__ = [
    "MALLOPT_VARIABLES",
    "machine_mb",
    "cgroup_limit_mb",
    "KEEP_MEMORY_ENVIRONMENT",
    "CUDA_ALLOCATOR_ENVIRONMENT",
    "worker_environment",
    "adopt_in_process",
]


KEEP_MEMORY_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
"""glibc settings of workers with ``allocator="keep"`` (unless the caller's environment sets
them): serve all allocations from the heap and never give freed memory back to the kernel.
A worker's tensors have about the same sizes at every MD step; with glibc's defaults the large
ones are mapped afresh and unmapped when freed, so every step pays a page fault per 4 KiB it
touches. Measured (docs/performance.md, P=2): reference model, 32k atoms, 3.2-3.5 s
→ 1.3-1.4 s per MD step, peak RSS up to +40 % (heap fragmentation, bounded after a few steps);
CHGNet, 21,952 atoms, 49.8 s → 18.5 s per call after the first, peak RSS +21 %."""

CUDA_ALLOCATOR_ENVIRONMENT = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
"""PyTorch CUDA allocator setting of workers with ``device="cuda"`` (unless the caller's
environment sets ``PYTORCH_CUDA_ALLOC_CONF``): memory segments grow in place instead of being
reserved in fixed blocks, so tensors whose sizes change from call to call (MD steps, rebuilt
graphs) fragment the GPU's memory less."""


def worker_environment(options: WorkerOptions, base=None) -> dict[str, str]:
    """The environment of the worker processes: ``base`` (default ``os.environ``), plus the
    allocator settings of :data:`KEEP_MEMORY_ENVIRONMENT` (``allocator="keep"``) and
    :data:`CUDA_ALLOCATOR_ENVIRONMENT` (``device="cuda"``) that it does not set, and
    ``OMP_NUM_THREADS``."""
    base = os.environ if base is None else base
    defaults = dict(KEEP_MEMORY_ENVIRONMENT) if options.allocator == "keep" else {}
    if options.device == "cuda" and "PYTORCH_ALLOC_CONF" not in base:  # its newer name
        defaults.update(CUDA_ALLOCATOR_ENVIRONMENT)
    environment = {**defaults, **base}
    environment["OMP_NUM_THREADS"] = str(options.threads)
    # A launcher's variables are for the process it started, not for our workers: with
    # TORCHELASTIC_USE_AGENT_STORE, torch would make a worker's own rendezvous a client of a
    # store nobody serves (a hang under torchrun with one rank, or DISTMLIP_LAUNCH=local).
    for name in LAUNCHER_VARIABLES:
        environment.pop(name, None)
    return environment


LAUNCHER_VARIABLES = (
    "TORCHELASTIC_USE_AGENT_STORE",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""Variables torchrun sets for its processes that the workers they start must not inherit."""


def adopt_in_process(keep_memory: bool, device: str) -> None:
    """What :func:`worker_environment` gives a worker the driver starts, for a worker that is
    already running (another rank of a torchrun/SLURM job): glibc's ``mallopt`` for
    ``allocator="keep"`` and the CUDA allocator setting, unless its environment sets them."""
    if keep_memory and not any(name in os.environ for name in KEEP_MEMORY_ENVIRONMENT):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'ed allocations
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: (almost) never give memory back
        except (OSError, AttributeError):  # not glibc
            pass
    if device == "cuda" and "PYTORCH_ALLOC_CONF" not in os.environ:  # before CUDA starts
        for name, value in CUDA_ALLOCATOR_ENVIRONMENT.items():
            os.environ.setdefault(name, value)


def machine_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError, AttributeError):
        return None


def cgroup_limit_mb() -> float | None:
    """This process's cgroup (v2, or v1) memory limit, if it sets one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's "unlimited" sentinel
            return int(text) / MB
    return None


MALLOPT_VARIABLES = {"MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}
"""glibc reads these variables once, at start; a fork sets them with ``mallopt``."""
