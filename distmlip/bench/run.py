"""``distmlip bench``: time, memory, sizes and communication, side by side in one run.

For every (structure size, P, partitioner, halo mode) a fresh calculator is started, the
structure is evaluated ``repeats`` times (energy + forces + stress) and the fastest call is kept.
Every configuration is checked before the first is measured (:func:`check_config`); the report
is :mod:`distmlip.bench.results`.
Single process is P = 1 (same code, no communication); ``halo="ghost"`` is the conventional
spatial-decomposition baseline. Every configuration gets the same total number of torch threads
(``total_threads``, split evenly over workers), so ratios compare equal hardware.

Capacity (the largest N that fits a per-worker memory budget) is *extrapolated*: per-worker
peak RSS is fitted as ``base + slope × (atoms held by the worker)`` over the measured sizes,
and the budget is solved for N using the measured ratio of held atoms (owned + halo) to N/P.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmlip.bench.results import write
from distmlip.bench.systems import crystal

__all__ = ["BenchConfig", "BenchOptionError", "check_config", "configurations", "run_bench"]


@dataclass
class BenchConfig:
    model: str = "reference"
    crystal: str = "cu"
    sizes: tuple[int, ...] = (1000, 4000)
    nprocs: tuple[int, ...] = (1, 2)
    partitioners: tuple[str, ...] = ("slab",)
    halos: tuple[str, ...] = ("exchange",)
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    total_threads: int = 2
    repeats: int = 2
    memory_budget_gb: float = 20.0
    checkpoint: bool = False
    allocator: str = "keep"
    out: Path | None = None


def _structure(config: BenchConfig, n_atoms: int):
    """The rattled crystal ``config.crystal`` with about ``n_atoms`` atoms (0.02 Å, seed 0)."""
    return crystal(config.crystal, n_atoms, rattle=0.02, seed=0)


def measure(model, atoms, nprocs: int, partitioner: str, halo: str, config: BenchConfig) -> dict:
    """One configuration: fastest of ``repeats`` calls, per-worker phases, sizes and memory."""
    from distmlip import DistributedCalculator

    threads = max(1, config.total_threads // nprocs)
    with DistributedCalculator(
        model,
        nprocs=nprocs,
        partitioner=partitioner,
        device=config.device,
        backend=config.backend,
        dtype=config.dtype,
        halo=halo,
        threads_per_worker=threads,
        timeout=3600,
        trace=True,
        checkpoint=config.checkpoint,
        allocator=config.allocator,
    ) as calc:
        # A model that predicts forces directly (eSEN's direct variants) has no stress.
        properties = ["energy", "forces"] + ([] if calc.model.direct_forces else ["stress"])
        best, first_peaks = None, None
        for _ in range(config.repeats):
            start = time.perf_counter()
            calc.calculate(atoms.copy(), properties)
            elapsed = time.perf_counter() - start
            if first_peaks is None:  # a fresh pool: the first call's peak is this structure's
                first_peaks = [s["peak_rss_mb"] for s in calc.last_stats]
            if best is None or elapsed < best[0]:
                best = (elapsed, calc.last_timings, calc.last_stats, calc.last_traces)
    elapsed, timings, stats, traces = best
    exchanges = [trace.named("exchange") for trace in traces]
    shares = communication_shares(timings, elapsed)
    slowest = shares["critical_worker"]
    worker = timings[slowest]
    return {
        "atoms": len(atoms),
        "nprocs": nprocs,
        "partitioner": partitioner,
        "halo": halo,
        "threads_per_worker": threads,
        "time_s": elapsed,
        "preprocess_s": worker.get("partition", 0) + worker.get("graph", 0),
        "forward_s": worker.get("forward", 0),
        "forward_segments_s": forward_segments(traces[slowest]),
        "backward_s": worker.get("backward", 0) + worker.get("forces", 0),
        **shares,
        "peak_rss_mb": [s["peak_rss_mb"] for s in stats],
        "first_call_peak_rss_mb": first_peaks,
        "peak_gpu_mb": [s.get("peak_gpu_mb", 0.0) for s in stats],
        "owned_atoms": [s["owned_atoms"] for s in stats],
        "computed_atoms": [s.get("computed_atoms", s["owned_atoms"]) for s in stats],
        "halo_atoms": [s["halo_atoms"] for s in stats],
        "edges": [s["edges"] for s in stats],
        "bytes_per_exchange": [[e["bytes_sent"] for e in log] for log in exchanges],
        "seconds_per_exchange": [[e["seconds"] for e in log] for log in exchanges],
        "worker_timings_s": timings,
    }


def communication_shares(timings: list[dict[str, float]], elapsed: float) -> dict:
    """How much of a step the workers spent on exchanges, and why.

    Per worker w, over the model phases (forward, backward, forces): ``communication`` c_w is
    the time spent posting and waiting on exchanges, compute k_w the rest. Exchanges are
    collective, so a worker with less compute waits in them for its peers: its c_w holds
    transfer time *and* load-imbalance wait.

    * critical worker: the one with the most compute (the others wait for it);
    * ``critical_path_fraction`` = c_critical / step time: exchange cost the step could not
      hide (the critical worker never waits for a slower peer), the cost of communicating;
    * ``largest_fraction`` = max_w c_w / step time: the worst worker's share, transfer plus
      waiting for the critical worker;
    * ``imbalance_s`` = max_w k_w − min_w k_w: the waiting that comes from unequal partitions.
    """
    phases = ("forward", "backward", "forces")
    communication = [t.get("communication", 0.0) for t in timings]
    compute = [
        sum(t.get(p, 0.0) for p in phases) - c for t, c in zip(timings, communication, strict=True)
    ]
    critical = int(np.argmax(compute))
    return {
        "critical_worker": critical,
        "communication_s": communication,
        "compute_s": compute,
        "critical_path_fraction": communication[critical] / elapsed,
        "largest_fraction": max(communication) / elapsed,
        "imbalance_s": max(compute) - min(compute),
    }


def forward_segments(trace) -> list[float]:
    """Seconds of forward computation between consecutive exchanges, from a worker's trace.

    Time spent posting and waiting on an exchange is not computation; work done while an
    overlapped exchange was in flight is. For a model with one atom exchange per layer the
    segments are its layers (the last one includes the readout).
    """
    begin, end = trace.last("forward")
    segments, cursor = [], begin
    for entry in trace.named("exchange"):
        if begin <= entry["at"] and entry["done_at"] <= end:
            segments.append(max(entry["done_at"] - cursor - entry["seconds"], 0.0))
            cursor = entry["done_at"]
    segments.append(end - cursor)
    return segments


class BenchOptionError(ValueError):
    """A configuration the run could not measure (a halo mode the model lacks, an element it
    does not know, more workers than atoms...), found before anything is measured."""


def configurations(config: BenchConfig) -> list[tuple[str, str, int]]:
    """The (halo, partitioner, P) measured for every size, in order; P = 1 once (the same
    single process for every mode)."""
    return [
        (halo, partitioner, nprocs)
        for halo in config.halos
        for partitioner in config.partitioners
        for nprocs in config.nprocs
        if nprocs > 1 or (halo == "exchange" and partitioner == config.partitioners[0])
    ]


def check_config(config: BenchConfig, model, structures: list) -> None:
    """Raise :class:`BenchOptionError` for any configuration that would fail: each one's
    worker and graph options as the calculator checks them, against the model (ghost mode needs
    its layer count), and every structure against the model and the largest P. Cheap (no
    worker starts), so a run that would fail after hours of measuring fails at once instead.
    """
    from distmlip.graphs.structure import Structure
    from distmlip.graphs.validate import validate_structure
    from distmlip.options import GraphOptions, WorkerOptions

    name = f"{config.model} ({type(model).__name__})"
    if "ghost" in config.halos and not model.num_layers:
        raise BenchOptionError(
            f"--halo ghost: {name} has no ghost mode (the recomputing baseline needs the "
            "model's number of message-passing layers); use --halo exchange"
        )
    for halo, partitioner, nprocs in configurations(config):
        try:
            WorkerOptions(
                nprocs=nprocs,
                device=config.device,
                backend=config.backend,
                dtype=config.dtype,
                timeout=3600,
                threads_per_worker=max(1, config.total_threads // nprocs),
                checkpoint=config.checkpoint,
                allocator=config.allocator,
            )
            graph = GraphOptions(partitioner=partitioner, halo=halo)
            graph.check_model(model)
            graph.resident_on(config.device)
        except (ValueError, ImportError) as error:
            raise BenchOptionError(
                f"P={nprocs}, {partitioner}, halo {halo}: {error}".rstrip(".")
            ) from None
    largest = max(nprocs for _, _, nprocs in configurations(config))
    for n_atoms, atoms in structures:  # (asked for, the crystal built)
        try:
            structure = Structure.from_ase(atoms, model.system_inputs(atoms))
            validate_structure(structure, largest, model)
        except ValueError as error:
            raise BenchOptionError(
                f"--crystal {config.crystal} --atoms {n_atoms} ({len(atoms)} atoms) with "
                f"{name}: {error}"
            ) from None


def run_bench(config: BenchConfig, progress=print) -> list[dict]:
    """Run every configuration; write JSON, markdown and PNG under ``config.out`` if set.

    Raises:
        BenchOptionError: a configuration that cannot run, before any is measured.
    """
    from distmlip.models import resolve_model

    model = resolve_model(config.model)
    structures = [(n_atoms, _structure(config, n_atoms)) for n_atoms in config.sizes]
    check_config(config, model, structures)
    rows = []
    for _, atoms in structures:
        for halo, partitioner, nprocs in configurations(config):
            row = measure(model, atoms, nprocs, partitioner, halo, config)
            rows.append(row)
            progress(
                f"{row['atoms']:>8} atoms  P={nprocs}  {partitioner:<5} {halo:<8} "
                f"{row['time_s']:8.2f} s  "
                f"comm {100 * row['critical_path_fraction']:5.1f}% "
                f"(largest {100 * row['largest_fraction']:.1f}%)"
                f"  peak/worker {max(row['peak_rss_mb']):7.0f} MB"
                f"  edges/worker {max(row['edges'])}"
            )
            # Saved as each configuration finishes: a long run that fails later (out of
            # memory, a lost node) keeps what it measured. The plot comes last.
            write(config, rows, plot=False)
    write(config, rows, plot=True)
    return rows
