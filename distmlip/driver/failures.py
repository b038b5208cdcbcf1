"""A worker's failure as the driver's one-line error: out of memory (what it held, the memory it
had, what to change) and killed workers."""

from __future__ import annotations

MB = 2**20

KILLED_HINT = (
    " (SIGKILL: if no one killed it, most likely the kernel's out-of-memory killer; "
    "memory_limit=GB turns running out of memory into a clear error, and more workers, "
    "checkpoint=True or a smaller structure need less memory per worker)"
)
"""Appended to "worker r died with exit code -9": what the Linux OOM killer leaves."""


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
