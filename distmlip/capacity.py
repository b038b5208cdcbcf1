"""Capacity: predict each worker's peak memory for a structure and P from a short calibration.

The method (:func:`estimate_memory`; docs/performance.md, "Capacity"):

1. **Carve** smaller structures from the target (:func:`carve`). Along a periodic axis on
   which the target repeats (a supercell: translating every atom by ``cell[axis] / n`` maps the
   structure onto itself, within 0.6 Å), the pieces are smaller periodic supercells of the same
   material, cut between lattice planes; axes without a period (amorphous cells, open axes)
   are cut open, last, which gives the pieces surfaces (fewer edges per atom).
2. **Measure**: evaluate them (energy, forces and stress) on the calculator's own fresh
   workers, in ascending size after one warm-up call, doubling from :data:`START_ATOMS` per
   worker until the per-call peak has grown :data:`GROWTH_MB` (:func:`_calibrate`), and read
   each worker's peak memory *of that call* (Linux: RSS high-water mark ``VmHWM``, reset before
   each call through ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``; :class:`distmlip.memory.PeakMemory`). The RSS peak includes the
   worker's baseline (interpreter, torch, the model: a few hundred MB) and what the allocator
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

from distmlip.graph import Structure

__all__ = ["MemoryEstimate", "estimate_memory", "carve", "worker_sizes", "repeat_counts"]

PERIOD_TOLERANCE = 0.6
"""Å: how far an atom may be from its image under a translation for that to be a period."""
MIN_PERIOD = 1.0
"""Å: the shortest period along a cell vector that is looked for."""
SLICE = 3.0
"""Å: the thickness steps in which an axis without a period is cut."""
START_ATOMS = 64
"""Atoms per worker of the smallest calibration structure."""
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


@dataclass
class _Frame:
    """The target in the coordinates carving needs.

    Attributes:
        frac: (N, 3) fractional coordinates, wrapped to [0, 1) on periodic axes; on open axes
            relative to the atoms' extent, in [0, 1].
        positions: (N, 3) Cartesian positions with periodic axes wrapped into the cell, Å.
        lengths: (3,) Å: the cell vector's length on periodic axes, the atoms' extent on open.
    """

    frac: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray


def _frame(structure: Structure) -> _Frame:
    cell, pbc = structure.cell, np.asarray(structure.pbc, dtype=bool)
    full = cell.copy()
    for axis in np.flatnonzero(np.linalg.norm(full, axis=1) < 1e-9):
        full[axis] = np.eye(3)[axis]  # an open axis without a cell vector: Å along it
    raw = np.linalg.solve(full.T, structure.positions.T).T
    frac = raw.copy()
    frac[:, pbc] %= 1.0
    positions = structure.positions + (frac - raw) @ full
    lengths = np.linalg.norm(full, axis=1)
    for axis in np.flatnonzero(~pbc):
        low, high = frac[:, axis].min(), frac[:, axis].max()
        frac[:, axis] = (frac[:, axis] - low) / max(high - low, 1e-12)
        lengths[axis] *= high - low
    return _Frame(frac, positions, lengths)


def _wrapped_distances(structure: Structure, d: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Squared lengths of displacements ``d`` (k, 3), periodic axes wrapped (minimum image)."""
    periodic = np.asarray(structure.pbc, dtype=bool)
    d = d - np.round((d @ inverse)[:, periodic]) @ structure.cell[periodic]
    return np.einsum("ij,ij->i", d, d)


def _columns(structure: Structure, frame: _Frame, axis: int, sample, inverse) -> list:
    """Per sample atom, the atoms of its species that a translation along ``cell[axis]`` can
    bring within :data:`PERIOD_TOLERANCE` of it (only ``frac[axis]`` changes): a thin column,
    so every candidate period is checked against a few atoms, not all N."""
    others = [b for b in range(3) if b != axis]
    reach = PERIOD_TOLERANCE * np.linalg.norm(inverse, axis=0)  # |Δfrac_b| ≤ |Δx| ‖inv[:, b]‖
    columns = []
    for j in sample:
        near = structure.numbers == structure.numbers[j]
        for b in others:
            delta = frame.frac[:, b] - frame.frac[j, b]
            if structure.pbc[b]:
                delta -= np.round(delta)
            near &= np.abs(delta) <= reach[b] + 1e-9
        columns.append(np.flatnonzero(near))
    return columns


def _is_period(structure, frame, axis: int, shift: float, sample, columns, inverse) -> bool:
    """Translating every sampled atom by ``cell[axis] * shift`` lands it on an atom."""
    for j, column in zip(sample, columns, strict=True):
        d = frame.positions[column] - (frame.positions[j] + structure.cell[axis] * shift)
        if _wrapped_distances(structure, d, inverse).min() > PERIOD_TOLERANCE**2:
            return False
    return True


def repeat_counts(structure: Structure, frame: _Frame | None = None) -> list[int]:
    """Per axis, the largest n such that the structure repeats n times along it (1: none)."""
    frame = _frame(structure) if frame is None else frame
    n_atoms = structure.n_atoms
    sample = np.linspace(0, n_atoms - 1, min(8, n_atoms)).astype(int)
    inverse = np.linalg.pinv(structure.cell)
    counts = []
    for axis in range(3):
        found = 1
        if structure.pbc[axis]:
            columns = _columns(structure, frame, axis, sample, inverse)
            limit = min(int(frame.lengths[axis] / MIN_PERIOD), n_atoms)
            for n in range(limit, 1, -1):  # n must divide the atom count
                # Every multiple of the shift must map too: a near-miss (L/7 of 6 periods, off
                # by a seventh of one) passes once but drifts further with each step.
                steps = sorted({1, 2, 3, n // 2} & set(range(1, n)))
                if n_atoms % n == 0 and all(
                    _is_period(structure, frame, axis, k / n, sample, columns, inverse)
                    for k in steps
                ):
                    found = n
                    break
        counts.append(found)
    return counts


def _cut_offset(values: np.ndarray) -> float:
    """A cut position in [0, 1) (a fraction of one period) in the widest gap between atoms."""
    ordered = np.sort(values % 1.0)
    gaps = np.diff(np.concatenate([ordered, [ordered[0] + 1.0]]))
    k = int(np.argmax(gaps))
    return float((ordered[k] + gaps[k] / 2) % 1.0)


def carve(
    structure: Structure, fraction: float, frame: _Frame | None = None, counts=None
) -> tuple[Structure, bool]:
    """A piece of ``structure`` with about ``fraction`` of its atoms (at least one unit of each
    axis); True if it is a periodic supercell of the target (cut along periods only), False if
    some axis was cut open."""
    frame = _frame(structure) if frame is None else frame
    counts = repeat_counts(structure, frame) if counts is None else counts
    units = [
        count if count > 1 else max(1, int(length // SLICE))
        for count, length in zip(counts, frame.lengths, strict=True)
    ]
    keep = list(units)

    def kept() -> float:
        return float(np.prod([k / u for k, u in zip(keep, units, strict=True)]))

    while kept() > fraction:
        # Smaller supercells first; cut an axis open (a new surface) only where that is not
        # enough, the target's own open axes last.
        shrinkable = [a for a in range(3) if keep[a] > 1 and counts[a] > 1]
        shrinkable = shrinkable or [a for a in range(3) if keep[a] > 1 and structure.pbc[a]]
        shrinkable = shrinkable or [a for a in range(3) if keep[a] > 1]
        if not shrinkable:
            break
        # Shrink the longest side first: compact pieces have the fewest surface atoms.
        axis = max(shrinkable, key=lambda a: frame.lengths[a] * keep[a] / units[a])
        keep[axis] -= 1
    mask = np.ones(structure.n_atoms, dtype=bool)
    cell, pbc, periodic = structure.cell.copy(), np.asarray(structure.pbc).copy(), True
    for axis in range(3):
        if keep[axis] == units[axis]:
            continue
        part = keep[axis] / units[axis]
        if counts[axis] > 1:  # a smaller supercell: cut between lattice planes
            offset = _cut_offset(frame.frac[:, axis] * units[axis]) / units[axis]
            mask &= (frame.frac[:, axis] - offset) % 1.0 < part - 1e-9
            cell[axis] *= part
        else:  # cut open
            mask &= frame.frac[:, axis] <= part
            pbc[axis], periodic = False, False
    piece = Structure(
        positions=frame.positions[mask],
        numbers=structure.numbers[mask],
        cell=cell,
        pbc=pbc,
        system=dict(structure.system),
    )
    return piece, periodic and abs(piece.n_atoms - structure.n_atoms * kept()) < 0.5


def worker_sizes(structure: Structure, model, nprocs: int, partitioner: str, halo: str) -> dict:
    """Per worker, the owned and halo atoms and edges it would hold (no model runs)."""
    from distmlip.ghost import build_ghost_graph
    from distmlip.halo import build_local_graph
    from distmlip.partition import partition

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
    """Per-worker memory a calibration call may use: half of ``memory_limit``, or of the
    machine's memory shared by the workers."""
    from distmlip.memory import _machine_mb

    limit = calc.pool.options.memory_limit
    if limit is not None:
        return 0.5 * limit * 1024
    machine = _machine_mb()
    return 0.5 * machine / calc.nprocs if machine else float("inf")


def _calibrate(calc, target: Structure, largest: int) -> list[dict]:
    """Calibration records, smallest first: sizes double from :data:`START_ATOMS` per worker
    until the per-call peak has grown by :data:`GROWTH_MB` over the smallest (and there are at
    least three), ``largest`` atoms are reached, or the next call could exceed the budget."""
    frame = _frame(target)
    counts = repeat_counts(target, frame)
    key = "gpu_peak_mb" if calc.pool.options.device == "cuda" else "peak_mb"
    budget = _budget_mb(calc)
    size = min(START_ATOMS * calc.nprocs, largest)
    records, warm = [], False
    while True:
        piece, periodic = carve(target, size / target.n_atoms, frame, counts)
        if piece.n_atoms >= 2 * calc.nprocs and all(r["atoms"] != piece.n_atoms for r in records):
            if not warm:  # one-time allocations (thread pools, buffers) are not a slope
                calc.compute(piece, forces=True)
                warm = True
            records.append(_measure(calc, piece, periodic))
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
    if len(records) < 2:
        raise ValueError(
            f"cannot cut two calibration structures of different sizes from {target.n_atoms} "
            "atoms; evaluate this structure directly and read calc.last_stats instead"
        )
    return records


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
        atoms: ASE ``Atoms`` or a :class:`~distmlip.graph.Structure`.
        nprocs: P of the prediction (the calibration runs on ``calc.nprocs`` workers).
        calibration_atoms: the most atoms a calibration structure may have (default and at
            most: half the target's).
    """
    from distmlip.options import _positive_int
    from distmlip.validate import validate_structure

    model = calc.model
    target = _as_structure(atoms, model)
    nprocs = calc.nprocs if nprocs is None else _positive_int("nprocs", nprocs)
    validate_structure(target, nprocs, model)
    largest = max(target.n_atoms // 2, 1)
    if calibration_atoms is not None:
        largest = min(_positive_int("calibration_atoms", calibration_atoms), largest)
    if calc.graph_builds or calc.graph_reuses:
        # Workers keep memory from earlier calls mapped ("keep" allocator, heap fragments),
        # which a per-call peak starts from: calibrate on fresh ones.
        calc.pool.close()
    calibration = _calibrate(calc, target, largest)
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
