"""Workers' memory: a bound, per-call peaks, and running out of it as one clear error.

Worker side:

* :func:`apply_memory_limit` caps the worker's data segment (``RLIMIT_DATA``: heap and private
  mappings, which is what its resident memory grows with) before the model loads, so an
  allocation beyond it fails in the worker (``MemoryError``, or torch's ``RuntimeError`` from
  its CPU allocator) instead of the kernel's out-of-memory killer ending the process
  (``RLIMIT_AS`` would also count the shared libraries' and torch's address-space
  reservations). Measured here: the limit turns a too-large allocation into that error in
  plain Python, numpy and torch, with the ``"keep"`` allocator's glibc settings too.
* :class:`PeakMemory`: the high-water mark of each call (Linux: ``VmHWM``, reset before the
  call by writing ``5`` to ``/proc/self/clear_refs``; CUDA: ``torch.cuda`` peak statistics),
  while ``peak_rss_mb`` / ``peak_gpu_mb`` stay peaks since the worker started.
* :func:`out_of_memory_kind` tells an out-of-memory error from others; :func:`memory_report`
  describes it (atoms, edges, memory) as a plain dict the driver receives.

Driver side: :func:`out_of_memory_message` turns a report into one line that names the worker,
what it held, the memory it had and what to change.
"""

from __future__ import annotations

import math
import os
import re
import sys

__all__ = [
    "CPU_ALLOCATOR_MESSAGE",
    "KILLED_HINT",
    "apply_memory_limit",
    "PeakMemory",
    "out_of_memory_kind",
    "memory_report",
    "out_of_memory_message",
    "reply_error",
    "graph_sizes",
]

MB = 2**20
GB = 2**30
CPU_ALLOCATOR_MESSAGE = "DefaultCPUAllocator: can't allocate memory"
"""What torch's CPU allocator says (in a ``RuntimeError``) when ``malloc`` fails."""
KILLED_HINT = (
    " (SIGKILL: if no one killed it, most likely the kernel's out-of-memory killer; "
    "memory_limit=GB turns running out of memory into a clear error, and more workers, "
    "checkpoint=True or a smaller structure need less memory per worker)"
)
"""Appended to "worker r died with exit code -9": what the Linux OOM killer leaves."""


def apply_memory_limit(limit_gb: float | None) -> None:
    """Cap this process's data segment at ``limit_gb`` GB (2^30 bytes; Linux ``RLIMIT_DATA``).

    Allocations beyond it fail with ``MemoryError`` (or torch's allocator error) in the process,
    which :func:`out_of_memory_kind` recognises. Lowering a limit is always allowed.

    Raises:
        MemoryError: the data segment is already larger (the limit only stops growth, and a
            worker forked from a zygote might otherwise start, within memory it inherited).
    """
    if limit_gb is None:
        return
    import resource

    limit = int(limit_gb * GB)
    data_mb = _status_mb("VmData")
    if data_mb is not None and data_mb * MB > limit:
        raise MemoryError(
            f"the worker uses {data_mb / 1024:.2f} GB of data before its model loads, more "
            f"than memory_limit={limit_gb:g} GB"
        )
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MB (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _max_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


def _reset_high_water() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Per-call and lifetime memory peaks of one worker (``start`` before, ``stats`` after).

    ``call_peak_rss_mb``: the resident-memory high-water mark of the call, which starts from
    the RSS the call began with (the process baseline: interpreter, torch, model, and memory
    kept mapped from earlier calls). Without ``/proc`` it is the lifetime peak.
    """

    def __init__(self, device=None):
        self.device = device
        self.cuda = device is not None and getattr(device, "type", device) == "cuda"
        self.rss_mb = 0.0  # lifetime peaks
        self.gpu_mb = 0.0

    @staticmethod
    def _high_water_mb() -> float:
        value = _status_mb("VmHWM")
        return _max_rss_mb() if value is None else value

    def start(self) -> None:
        # Fold the peak since the last reset (start-up, between calls) into the lifetime peak.
        self.rss_mb = max(self.rss_mb, self._high_water_mb(), _max_rss_mb())
        _reset_high_water()
        if self.cuda:
            import torch

            self.gpu_mb = max(self.gpu_mb, torch.cuda.max_memory_allocated(self.device) / MB)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stats(self) -> dict[str, float]:
        """``peak_rss_mb`` (since start-up), ``call_peak_rss_mb``; on CUDA the same for the
        GPU memory torch allocated (``peak_gpu_mb``, ``call_peak_gpu_mb``)."""
        call = self._high_water_mb()
        self.rss_mb = max(self.rss_mb, call)
        stats = {"peak_rss_mb": self.rss_mb, "call_peak_rss_mb": call}
        if self.cuda:
            import torch

            call_gpu = torch.cuda.max_memory_allocated(self.device) / MB
            self.gpu_mb = max(self.gpu_mb, call_gpu)
            stats.update(peak_gpu_mb=self.gpu_mb, call_peak_gpu_mb=call_gpu)
        return stats


def _is_cuda_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    kinds = tuple(
        kind
        for kind in (
            getattr(torch, "OutOfMemoryError", None),
            getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None),
        )
        if isinstance(kind, type)
    )
    if kinds and isinstance(error, kinds):
        return True
    # torch's caching allocator says "CUDA out of memory"; the CUDA runtime's own
    # cudaErrorMemoryAllocation (a cudaMalloc outside that allocator, e.g. in an extension)
    # comes as torch.AcceleratorError "CUDA error: out of memory".
    return isinstance(error, RuntimeError) and any(
        text in str(error) for text in ("CUDA out of memory", "CUDA error: out of memory")
    )


def out_of_memory_kind(error: BaseException) -> str | None:
    """``"cuda"`` (GPU memory), ``"cpu"`` (host memory) or None (not out of memory).

    Out of memory is a ``MemoryError`` (Python, numpy), a ``torch.OutOfMemoryError`` (CUDA) or
    a ``RuntimeError`` from torch's CPU allocator (:data:`CPU_ALLOCATOR_MESSAGE`), also as the
    cause or context of the error raised.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _is_cuda_out_of_memory(error):
            return "cuda"
        if isinstance(error, MemoryError):
            return "cpu"
        if isinstance(error, RuntimeError) and CPU_ALLOCATOR_MESSAGE in str(error):
            return "cpu"
        error = error.__cause__ or error.__context__
    return None


_REQUESTED = re.compile(
    r"allocate (?:memory: you tried to allocate )?(\d+(?:\.\d+)?) ?(bytes|[KMGTP]i?B)", re.I
)
_UNITS = {"bytes": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "pb": 1e15}
_UNITS.update({f"{prefix}ib": 1024.0**n for n, prefix in enumerate("kmgtp", start=1)})


def requested_bytes(message: str) -> float | None:
    """The size of the failed allocation, where the error message says it."""
    match = _REQUESTED.search(message)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def _machine_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limit_mb() -> float | None:
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


def graph_sizes(graph, n_atoms: int, inputs=None) -> dict[str, int]:
    """What one worker's graph holds, for an out-of-memory report (``inputs``: the model
    inputs already built on the device, whose edges are the call's; see distmlip.resident)."""
    edges = len(graph.edges) if inputs is None else int(inputs.receivers.shape[0])
    return {
        "n_atoms": int(n_atoms),
        "owned_atoms": int(graph.n_owned),
        "halo_atoms": int(graph.n_halo),
        "computed_atoms": int(graph.n_computed),
        "edges": edges,
    }


def memory_report(
    error: BaseException,
    kind: str,
    sizes: dict | None = None,
    limit_gb: float | None = None,
    device=None,
    phase: str = "evaluating",
) -> dict:
    """What the driver needs to explain an out-of-memory ``error`` (plain values, picklable).

    ``sizes``: :func:`graph_sizes` of the call's graph (None or partial while it was built);
    ``phase``: ``"starting"`` (loading the model) or ``"evaluating"``.
    """
    lines = str(error).strip().splitlines()
    report = {
        "kind": kind,
        "phase": phase,
        "error": type(error).__name__ + (f": {lines[0][:300]}" if lines else ""),
        "requested_bytes": requested_bytes(str(error)),
        **(sizes or {}),
        "peak_rss_mb": _status_mb("VmHWM") or _max_rss_mb(),
        "memory_limit_mb": None if limit_gb is None else limit_gb * GB / MB,
        "machine_mb": _machine_mb(),
        "cgroup_limit_mb": _cgroup_limit_mb(),
    }
    if kind == "cuda" and device is not None:
        try:
            import torch

            report["gpu_total_mb"] = torch.cuda.get_device_properties(device).total_memory / MB
            report["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        except Exception:  # a broken CUDA context: report what is known
            pass
    return report


def _gb(mb: float) -> str:
    """``18.2 MB``, ``1.90 GB``, ``23.5 GB`` (MB and GB of 2^20 and 2^30 bytes)."""
    if mb < 1024:
        return f"{mb:.3g} MB" if mb < 100 else f"{mb:.0f} MB"
    return f"{mb / 1024:.2f} GB" if mb < 10 * 1024 else f"{mb / 1024:.1f} GB"


def _held(report: dict) -> str:
    """``2,000 owned + 812 halo atoms and 160,000 edges of a 4,000-atom structure``."""
    n_atoms = report.get("n_atoms")
    whole = f" of a {n_atoms:,}-atom structure" if n_atoms else ""
    if "owned_atoms" not in report:
        if report.get("phase") == "starting":
            return " while starting (loading the model)"
        return f" while building its graph{whole}" if whole else ""
    owned, halo = report["owned_atoms"], report["halo_atoms"]
    computed = report.get("computed_atoms", owned)
    ghosts = f", {computed:,} computed" if computed != owned else ""
    edges = report["edges"]
    return f" with {owned:,} owned + {halo:,} halo atoms{ghosts} and {edges:,} edges{whole}"


def _memory(report: dict) -> str:
    """``peak RSS 1.90 GB, memory_limit 2.00 GB, machine 23.4 GB``, and the GPU's on CUDA."""
    parts = []
    if report.get("gpu_total_mb"):
        peak = report.get("gpu_peak_mb") or 0.0
        parts.append(f"GPU peak allocated {_gb(peak)} of {_gb(report['gpu_total_mb'])}")
    if report.get("peak_rss_mb"):
        parts.append(f"peak RSS {_gb(report['peak_rss_mb'])}")
    if report.get("memory_limit_mb"):
        parts.append(f"memory_limit {_gb(report['memory_limit_mb'])}")
    if report.get("cgroup_limit_mb"):
        parts.append(f"cgroup limit {_gb(report['cgroup_limit_mb'])}")
    if report.get("machine_mb"):
        parts.append(f"machine {_gb(report['machine_mb'])}")
    return ", ".join(parts)


def out_of_memory_message(rank: int, report: dict, nprocs: int) -> str:
    """One line: which worker, what it held, the memory it had, what to change."""
    where = "GPU memory" if report.get("kind") == "cuda" else "memory"
    requested = report.get("requested_bytes")
    failed = f"could not allocate {_gb(requested / MB)}" if requested else report.get("error")
    memory = _memory(report)
    if report.get("phase") == "starting":  # no structure yet: only the bound can change
        change = (
            "raise memory_limit (a worker needs at least the peak above to load torch and "
            "the model)"
            if report.get("memory_limit_mb")
            else "free memory on this machine or use a smaller model"
        )
        return (
            f"worker {rank} ran out of {where} ({failed}){_held(report)}"
            + (f"; {memory}" if memory else "")
            + f". To start, {change}"
        )
    remedies = [f"more workers (nprocs > {nprocs})"]
    if not report.get("checkpoint"):
        remedies.append("checkpoint=True (recomputes activations in the backward pass)")
    if report.get("memory_limit_mb"):
        remedies.append("a larger memory_limit")
    remedies.append("or a smaller structure")
    return (
        f"worker {rank} ran out of {where} ({failed}){_held(report)}"
        + (f"; {memory}" if memory else "")
        + f". To fit, use {', '.join(remedies)}; "
        + "calc.estimate_memory(atoms, nprocs) (`distmlip estimate`) predicts the peak per "
        + ("worker, calibrating within memory_limit" if report.get("memory_limit_mb") else "worker")
    )


def reply_error(
    what: str,
    rank: int,
    report,
    nprocs: int,
    message: str,
    after: str = "all workers were stopped and restart on the next call",
):
    """The driver's error for worker ``rank``'s failed reply (``report``: ``(summary,
    traceback[, memory report])``, None if it died); ``message`` says what happened, ``after``
    what became of the workers."""
    from distmlip.errors import OutOfMemoryError, WorkerError

    tail = f"; {after}"
    if report is not None and len(report) > 2:  # out of memory: say what to change
        text = f"{what}: {out_of_memory_message(rank, report[2], nprocs)}{tail}"
        return OutOfMemoryError(text, report[1], report[2])
    return WorkerError(message + tail, None if report is None else report[1])


def check_memory_limit(value) -> float | None:
    """``value`` as a float number of GB (positive, finite), or None; else ``ValueError``."""
    import numbers

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"memory_limit must be a number of GB > 0 or None, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"memory_limit must be a finite number of GB > 0, got {value!r}")
    if not sys.platform.startswith("linux"):
        raise ValueError("memory_limit needs Linux (RLIMIT_DATA); use memory_limit=None")
    return float(value)
