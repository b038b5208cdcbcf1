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

import re
import sys

from distmlip.environment import cgroup_limit_mb, machine_mb
from distmlip.errors import first_line

__all__ = [
    "CPU_ALLOCATOR_MESSAGE",
    "apply_memory_limit",
    "PeakMemory",
    "out_of_memory_kind",
    "memory_report",
    "graph_sizes",
]

MB = 2**20
GB = 2**30
CPU_ALLOCATOR_MESSAGE = "DefaultCPUAllocator: can't allocate memory"
"""What torch's CPU allocator says (in a ``RuntimeError``) when ``malloc`` fails."""


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


def graph_sizes(graph, n_atoms: int, inputs=None) -> dict[str, int]:
    """What one worker's graph holds, for an out-of-memory report (``inputs``: the model
    inputs already built on the device, whose edges are the call's; see
    distmlip.worker.resident)."""
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
    line = first_line(error, "")
    report = {
        "kind": kind,
        "phase": phase,
        "error": type(error).__name__ + (f": {line[:300]}" if line else ""),
        "requested_bytes": requested_bytes(str(error)),
        **(sizes or {}),
        "peak_rss_mb": _status_mb("VmHWM") or _max_rss_mb(),
        "memory_limit_mb": None if limit_gb is None else limit_gb * GB / MB,
        "machine_mb": machine_mb(),
        "cgroup_limit_mb": cgroup_limit_mb(),
    }
    if kind == "cuda" and device is not None:
        try:
            import torch

            report["gpu_total_mb"] = torch.cuda.get_device_properties(device).total_memory / MB
            report["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / MB
        except Exception:  # a broken CUDA context: report what is known
            pass
    return report
