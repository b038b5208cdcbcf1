"""Capacity: predict each worker's peak memory for a structure and P from a short calibration.

The method (:func:`estimate_memory`; docs/performance.md, "Capacity"):

1. **Carve** smaller structures from the target (:mod:`distmlip.graphs.carving`). Along a periodic
   axis on which the target repeats (a supercell: translating every atom by ``cell[axis] / n``
   maps the structure onto itself, within 0.6 Å), the pieces are smaller periodic supercells
   of the same material, cut between lattice planes; axes without a period (amorphous cells,
   open axes) are cut open, last, which gives the pieces surfaces (fewer edges per atom).
2. **Measure**: evaluate them (energy, forces and stress) on the calculator's own fresh
   workers, in ascending size after one warm-up call, doubling from :data:`START_ATOMS` per
   worker until the per-call peak has grown :data:`GROWTH_MB` (:func:`_calibrate`). Under a
   ``memory_limit`` the workers keep it: no piece holds more atoms per worker than the target
   will, the next piece must be predicted within :data:`LIMIT_SHARE` of the limit, and a piece
   that runs out of memory ends the calibration (the pieces before it are used). Read
   each worker's peak memory *of that call* (Linux: RSS high-water mark ``VmHWM``, reset before
   each call through ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``; :class:`distmlip.worker.memory.PeakMemory`). The RSS peak includes
   the worker's baseline (interpreter, torch, the model: a few hundred MB) and what the allocator
   kept mapped from earlier, smaller calls.
3. **Fit** ``peak = base + slope × edges`` over every (structure, worker) pair of the three
   largest pieces by least squares: a worker's edges (those with an owned receiver, ghost
   edges included in the ghost baseline) carry the model's largest tensors (messages, radial
   and angular bases, bond graphs).
4. **Predict** the target's per-worker edge counts at P by partitioning it and building each
   worker's local graph in turn here (numpy and vesin, one worker's graph at a time: no model
   runs, O(N/P + halo) memory), and apply the fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from distmlip.graphs.carving import carve, frame_of, repeat_counts
from distmlip.graphs.structure import Structure

__all__ = ["MemoryEstimate", "estimate_memory", "carve", "worker_sizes", "repeat_counts"]

START_ATOMS = 64
"""Atoms per worker of the smallest calibration structure."""
LIMIT_SHARE = 0.8
"""Under ``memory_limit``: calibration calls are predicted to use at most this share of it."""
OUT_OF_MEMORY_TRIES = 3
"""Calibration pieces that may run out of memory (each restarts the workers) before it stops."""
GROWTH_MB = 256.0
"""MB: calibration stops once a worker's per-call peak has grown this much over the smallest
call's (the baseline), so that the slope is measured well above the allocator's noise."""


@dataclass
class MemoryEstimate:
    """Predicted peak memory of each worker for one structure and P.

    Attributes:
        n_atoms, nprocs: the target structure's size and the P predicted for.
        per_worker_mb: (P,) predicted peak RSS of each worker's call, MB (2^20 bytes),
            including the worker's baseline.
        owned_atoms, halo_atoms, edges: (P,) what each worker would hold.
        base_mb, mb_per_edge: the fit ``peak = base_mb + mb_per_edge × edges``.
        calibration: one record per calibration structure: ``atoms``, per-worker ``edges``
            and measured ``peak_mb``, and ``periodic`` (cut as a periodic supercell).
        gpu_per_worker_mb, gpu_base_mb, gpu_mb_per_edge: the same for the GPU memory torch
            allocates (``device="cuda"`` only).
        memory_limit_mb: the calculator's ``memory_limit`` in MB, or None; ``exceeds_limit``
            says whether the largest worker's prediction is above it.
    """

    n_atoms: int
    nprocs: int
    per_worker_mb: list[float]
    owned_atoms: list[int]
    halo_atoms: list[int]
    edges: list[int]
    base_mb: float
    mb_per_edge: float
    calibration: list[dict] = field(default_factory=list)
    gpu_per_worker_mb: list[float] | None = None
    gpu_base_mb: float | None = None
    gpu_mb_per_edge: float | None = None
    memory_limit_mb: float | None = None

    @property
    def exceeds_limit(self) -> bool:
        """True if the largest worker is predicted to need more than ``memory_limit``."""
        return self.memory_limit_mb is not None and self.peak_mb > self.memory_limit_mb

    @property
    def peak_mb(self) -> float:
        """The largest worker's predicted peak, MB."""
        return max(self.per_worker_mb)

    @property
    def peak_gpu_mb(self) -> float | None:
        return max(self.gpu_per_worker_mb) if self.gpu_per_worker_mb else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "peak_mb": self.peak_mb,
            "peak_gpu_mb": self.peak_gpu_mb,
            "exceeds_limit": self.exceeds_limit,
        }


def worker_sizes(structure: Structure, model, nprocs: int, partitioner: str, halo: str) -> dict:
    """Per worker, the owned and halo atoms and edges it would hold (no model runs)."""
    from distmlip.graphs.ghost import build_ghost_graph
    from distmlip.graphs.halo import build_local_graph
    from distmlip.graphs.partition import partition

    owner = partition(structure, nprocs, partitioner, model.cutoff)
    sizes = {"owned_atoms": [], "halo_atoms": [], "edges": []}
    for rank in range(nprocs):  # one graph at a time
        if halo == "ghost":
            args = (structure, owner, rank, nprocs, model.cutoff, model.num_layers)
            graph = build_ghost_graph(*args)
        else:
            graph = build_local_graph(structure, owner, rank, nprocs, model.cutoff)
        sizes["owned_atoms"].append(int(graph.n_owned))
        sizes["halo_atoms"].append(int(graph.n_halo))
        sizes["edges"].append(len(graph.edges))
    return sizes


def _fit(edges: list[int], peaks: list[float]) -> tuple[float, float]:
    """``(base, slope)`` of ``peak = base + slope × edges`` (slope ≥ 0)."""
    x, y = np.asarray(edges, float), np.asarray(peaks, float)
    if np.ptp(x) == 0:
        return float(y.max()), 0.0
    slope, base = np.polyfit(x, y, 1)
    if slope < 0:  # noise on a flat curve: the largest measured peak is the honest answer
        return float(y.max()), 0.0
    return float(base), float(slope)


def _as_structure(atoms, model) -> Structure:
    if isinstance(atoms, Structure):
        return atoms
    return Structure.from_ase(atoms, model.system_inputs(atoms))


def _measure(calc, piece: Structure, periodic: bool) -> dict:
    """One calibration call: per-worker edges and per-call peaks."""
    calc.compute(piece, forces=True)
    stats = calc.last_stats
    record = {
        "atoms": piece.n_atoms,
        "periodic": periodic,
        "edges": [s["edges"] for s in stats],
        "peak_mb": [s["call_peak_rss_mb"] for s in stats],
    }
    if "call_peak_gpu_mb" in stats[0]:
        record["gpu_peak_mb"] = [s["call_peak_gpu_mb"] for s in stats]
    return record


def _budget_mb(calc) -> float:
    """Per-worker memory a calibration call may be predicted to use: :data:`LIMIT_SHARE` of
    ``memory_limit`` (a call beyond the limit fails cleanly, so it may come close), or half of
    the machine's memory shared by the workers (beyond it the kernel kills a worker)."""
    from distmlip.environment import machine_mb

    limit = calc.pool.options.memory_limit
    if limit is not None:
        return LIMIT_SHARE * limit * 1024
    machine = machine_mb()
    return 0.5 * machine / calc.nprocs if machine else float("inf")


def _calibrate(calc, target: Structure, largest: int) -> tuple[list[dict], int | None]:
    """Calibration records, smallest first, and the atoms of the smallest piece that ran out
    of memory (None if none did).

    Sizes double from :data:`START_ATOMS` per worker (from half of ``largest`` where that is
    less, so there are two) until the per-call peak has grown by :data:`GROWTH_MB` over the
    smallest (and there are at least three), ``largest`` atoms are reached, or the next call is
    predicted to exceed the budget. A call that runs out of memory (under ``memory_limit``, or
    the GPU's) caps the sizes below it; with fewer than two records the next size is halfway
    between the last that fitted (or none) and it, at most :data:`OUT_OF_MEMORY_TRIES` times.
    """
    from distmlip.errors import OutOfMemoryError

    frame = frame_of(target)
    counts = repeat_counts(target, frame)
    key = "gpu_peak_mb" if calc.pool.options.device == "cuda" else "peak_mb"
    budget = _budget_mb(calc)
    size = max(min(START_ATOMS * calc.nprocs, largest // 2), 1)
    records, warm, failed, tries = [], False, None, 0
    while True:
        piece, periodic = carve(target, size / target.n_atoms, frame, counts)
        fresh = piece.n_atoms >= 2 * calc.nprocs and piece.n_atoms < (failed or largest + 1)
        if fresh and all(r["atoms"] != piece.n_atoms for r in records):
            try:
                if not warm:  # one-time allocations (thread pools, buffers) are not a slope
                    calc.compute(piece, forces=True)
                    warm = True
                records.append(_measure(calc, piece, periodic))
            except OutOfMemoryError:  # the workers were stopped; the next call starts new ones
                failed, warm, tries = piece.n_atoms, False, tries + 1
                largest = min(largest, failed - 1)
                low = records[-1]["atoms"] if records else 0
                if len(records) >= 2 or tries >= OUT_OF_MEMORY_TRIES or failed - low < 2:
                    break
                size = (low + failed) // 2
                continue
        if records and len(records) >= 3:
            grown = max(records[-1][key]) - min(records[0][key])
            if grown >= GROWTH_MB:
                break
        if size >= largest:
            break
        following = min(2 * size, largest)
        if len(records) >= 2:  # would the next call fit? (a straight line through the last two)
            base, slope = _fit(
                [e for r in records[-2:] for e in r["edges"]],
                [m for r in records[-2:] for m in r["peak_mb"]],
            )
            if base + slope * max(records[-1]["edges"]) * following / size > budget:
                break
        size = following
    return records, failed


def _too_few(calc, target: Structure, nprocs: int, failed: int | None) -> Exception:
    """The error for a calibration with fewer than two records: one line, what to change."""
    from distmlip.errors import OutOfMemoryError

    if failed is None:
        return ValueError(
            f"cannot cut two calibration structures of different sizes from {target.n_atoms} "
            "atoms; evaluate this structure directly and read calc.last_stats instead"
        )
    limit = calc.pool.options.memory_limit
    if limit is not None:
        bound, remedy = f"memory_limit={limit:g} GB", "a larger memory_limit"
    else:  # memory_limit is refused on CUDA: do not suggest it there
        bound = (
            "the GPU's memory" if calc.pool.options.device == "cuda" else "this machine's memory"
        )
        remedy = "checkpoint=True"
    per_piece, per_target = failed / calc.nprocs, target.n_atoms / nprocs
    verdict = (
        f"so the {target.n_atoms:,}-atom structure (~{per_target:,.0f} atoms per worker at "
        f"P={nprocs}) does not fit either: use more workers or {remedy}"
        if per_piece <= per_target
        else f"too small to calibrate in: calibrate on more workers or with {remedy}"
    )
    return OutOfMemoryError(
        f"estimating memory: a {failed:,}-atom calibration piece (~{per_piece:,.0f} atoms per "
        f"worker on {calc.nprocs}) ran out of memory under {bound}, {verdict}"
    )


def estimate_memory(
    calc,
    atoms,
    nprocs: int | None = None,
    calibration_atoms: int | None = None,
) -> MemoryEstimate:
    """Predict each worker's peak memory for ``atoms`` on ``nprocs`` workers (default: the
    calculator's P), calibrated on ``calc``'s own workers (see the module docstring).

    Args:
        calc: a :class:`~distmlip.DistributedCalculator`; its model, partitioner, halo mode
            and dtype are those predicted for. Its workers run the calibration calls, fresh
            (restarted first if the calculator has computed before).
        atoms: ASE ``Atoms`` or a :class:`~distmlip.graphs.structure.Structure`.
        nprocs: P of the prediction (the calibration runs on ``calc.nprocs`` workers).
        calibration_atoms: the most atoms a calibration structure may have (default and at
            most: half the target's; under ``memory_limit`` also at most the target's atoms
            per worker at ``nprocs``, times ``calc.nprocs``).

    Raises:
        ValueError: a structure that cannot be evaluated on ``nprocs`` workers, or too small
            to cut two calibration pieces from.
        OutOfMemoryError: even the smallest calibration pieces ran out of memory (under
            ``memory_limit``, or the GPU's): one line saying whether the target can fit.
    """
    from distmlip.graphs.validate import validate_structure
    from distmlip.options import positive_int

    model = calc.model
    target = _as_structure(atoms, model)
    nprocs = calc.nprocs if nprocs is None else positive_int("nprocs", nprocs)
    validate_structure(target, nprocs, model)
    largest = max(target.n_atoms // 2, 1)
    if calc.pool.options.memory_limit is not None:
        # No piece holds more atoms per worker than the target will: if the target fits the
        # limit, so does every piece, and a calibration that runs out says the target won't.
        largest = min(largest, max(target.n_atoms * calc.nprocs // nprocs, 1))
    if calibration_atoms is not None:
        largest = min(positive_int("calibration_atoms", calibration_atoms), largest)
    if calc.graph_builds or calc.graph_reuses:
        # Workers keep memory from earlier calls mapped ("keep" allocator, heap fragments),
        # which a per-call peak starts from: calibrate on fresh ones.
        calc.pool.close()
    calibration, failed = _calibrate(calc, target, largest)
    if len(calibration) < 2:
        raise _too_few(calc, target, nprocs, failed)
    fitted = calibration[-3:]  # the largest: nearest to the target's regime
    edges = [e for record in fitted for e in record["edges"]]
    base, slope = _fit(edges, [m for record in fitted for m in record["peak_mb"]])
    sizes = worker_sizes(target, model, nprocs, calc.partitioner, calc.halo)
    estimate = MemoryEstimate(
        n_atoms=target.n_atoms,
        nprocs=nprocs,
        per_worker_mb=[base + slope * e for e in sizes["edges"]],
        **sizes,
        base_mb=base,
        mb_per_edge=slope,
        calibration=calibration,
    )
    limit = calc.pool.options.memory_limit
    estimate.memory_limit_mb = None if limit is None else limit * 1024
    if "gpu_peak_mb" in calibration[0]:
        gpu = [m for record in fitted for m in record["gpu_peak_mb"]]
        estimate.gpu_base_mb, estimate.gpu_mb_per_edge = _fit(edges, gpu)
        estimate.gpu_per_worker_mb = [
            estimate.gpu_base_mb + estimate.gpu_mb_per_edge * e for e in sizes["edges"]
        ]
    return estimate
