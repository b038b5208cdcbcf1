"""``distmlip bench``: time, memory, sizes and communication, side by side in one run.

For every (structure size, P, partitioner, halo mode) a fresh calculator is started, the
structure is evaluated ``repeats`` times (energy + forces + stress) and the fastest call is kept.
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

from distmlip.report import machine_description, markdown_table, pyplot, write_report
from distmlip.systems import crystal

__all__ = ["BenchConfig", "run_bench"]


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
        best, first_peaks = None, None
        for _ in range(config.repeats):
            start = time.perf_counter()
            calc.calculate(atoms.copy(), ["energy", "forces", "stress"])
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


def capacity(rows: list[dict], budget_mb: float) -> dict[tuple[str, int], float]:
    """Extrapolated largest N per (halo, P) whose per-worker peak fits ``budget_mb``."""
    result = {}
    for key in sorted({(r["halo"], r["nprocs"]) for r in rows}):
        group = [r for r in rows if (r["halo"], r["nprocs"]) == key]
        held = np.array([max(np.add(r["owned_atoms"], r["halo_atoms"])) for r in group], float)
        peak = np.array([max(r["peak_rss_mb"]) for r in group])
        if len(group) < 2 or np.ptp(held) == 0:
            continue
        slope, base = np.polyfit(held, peak, 1)
        held_per_atom = np.mean(held / np.array([r["atoms"] for r in group]))
        result[key] = max(0.0, (budget_mb - base) / slope / held_per_atom) if slope > 0 else 0.0
    return result


BENCH_COLUMNS = (
    "atoms",
    "P",
    "partitioner",
    "halo",
    "time (s)",
    "×single",
    "preprocess (s)",
    "forward (s)",
    "backward (s)",
    "comm/worker (s)",
    "comm % critical path",
    "comm % largest",
    "imbalance (s)",
    "peak/worker (MB)",
    "×single",
    "computed atoms/worker",
    "edges/worker",
    "halo/worker",
    "bytes/exchange",
    "forward compute between exchanges (s)",
)


COMMUNICATION_DEFINITIONS = (
    "Time and phases are the fastest of the repeats; phases (preprocess, forward, backward, "
    "forward compute) are those of the critical worker, the one with the most compute "
    "(forward + backward + forces − communication), which the others wait for. "
    "*comm/worker*: seconds each worker spent posting and waiting on exchanges. "
    "*comm % critical path*: the critical worker's communication as a share of the step: "
    "the exchange cost the step could not hide. *comm % largest*: the largest worker's share: "
    "transfer plus waiting for the critical worker. *imbalance*: max − min compute over the "
    "workers, the waiting that comes from unequal partitions."
)


def _table_row(row: dict, single: dict | None) -> list[str]:
    """One configuration's cells of :data:`BENCH_COLUMNS`; ratios against ``single`` (P = 1)."""
    t_ratio = f"{row['time_s'] / single['time_s']:.2f}" if single else "–"
    m_ratio = f"{max(row['peak_rss_mb']) / max(single['peak_rss_mb']):.2f}" if single else "–"
    per_exchange = [b for log in row["bytes_per_exchange"] for b in log]
    mean_bytes = f"{np.mean(per_exchange) / 1e6:.2f} MB" if per_exchange else "0"
    return [
        f"{row['atoms']}",
        f"{row['nprocs']}",
        row["partitioner"],
        row["halo"],
        f"{row['time_s']:.2f}",
        t_ratio,
        f"{row['preprocess_s']:.2f}",
        f"{row['forward_s']:.2f}",
        f"{row['backward_s']:.2f}",
        " / ".join(f"{c:.3f}" for c in row["communication_s"]),
        f"{100 * row['critical_path_fraction']:.1f}",
        f"{100 * row['largest_fraction']:.1f}",
        f"{row['imbalance_s']:.3f}",
        f"{max(row['peak_rss_mb']):.0f}",
        m_ratio,
        f"{max(row['computed_atoms'])}",
        f"{max(row['edges'])}",
        f"{max(row['halo_atoms'])}",
        mean_bytes,
        " / ".join(f"{t:.3f}" for t in row["forward_segments_s"]),
    ]


def _markdown(rows: list[dict], caps: dict, config: BenchConfig, machine: str) -> str:
    single = {r["atoms"]: r for r in rows if r["nprocs"] == 1 and r["halo"] == "exchange"}
    lines = [
        f"# distmlip bench: {config.model} on {config.crystal}, {config.dtype}, "
        f"{config.total_threads} threads in total per configuration",
        "",
        f"Machine: {machine}.",
        "",
        markdown_table(BENCH_COLUMNS, [_table_row(r, single.get(r["atoms"])) for r in rows]),
        "",
        COMMUNICATION_DEFINITIONS,
    ]
    if caps:
        lines += [
            "",
            f"Extrapolated capacity (largest N with per-worker peak ≤ "
            f"{config.memory_budget_gb:g} GB; linear fit of peak RSS vs atoms held):",
            "",
            markdown_table(
                ("halo", "P", "atoms"), [(h, p, f"{n:,.0f}") for (h, p), n in caps.items()]
            ),
        ]
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], caps: dict, title: str):
    """Strong scaling, memory per worker, communication share and capacity, 2 × 2 panels."""
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    (scaling, memory), (comm, cap) = axes
    largest = max(r["atoms"] for r in rows)
    for halo, marker in (("exchange", "o"), ("ghost", "s")):
        for part in sorted({r["partitioner"] for r in rows}):
            pts = sorted(
                (r["nprocs"], r["time_s"])
                for r in rows
                if r["atoms"] == largest and r["halo"] == halo and r["partitioner"] == part
            )
            if pts:
                scaling.plot(*zip(*pts, strict=True), marker=marker, label=f"{halo}/{part}")
            mem = sorted(
                (r["atoms"], max(r["peak_rss_mb"]) / 1024, r["nprocs"])
                for r in rows
                if r["halo"] == halo and r["partitioner"] == part
            )
            for nprocs in sorted({m[2] for m in mem}):
                series = [(a, m) for a, m, p in mem if p == nprocs]
                memory.plot(
                    *zip(*series, strict=True), marker=marker, label=f"{halo}/{part} P={nprocs}"
                )
            chosen = sorted(
                (r["nprocs"], 100 * r["critical_path_fraction"], 100 * r["largest_fraction"])
                for r in rows
                if r["atoms"] == largest and r["halo"] == halo and r["partitioner"] == part
            )
            if chosen:
                nprocs, critical, worst = zip(*chosen, strict=True)
                comm.plot(nprocs, critical, marker=marker, label=f"{halo}/{part} critical path")
                comm.plot(
                    nprocs, worst, marker=marker, linestyle=":", label=f"{halo}/{part} largest"
                )
    scaling.set(xlabel="P", ylabel="time per evaluation (s)", title=f"strong scaling, N={largest}")
    memory.set(
        xlabel="atoms",
        ylabel="peak RSS per worker (GB)",
        xscale="log",
        yscale="log",
        title="memory per worker",
    )
    comm.set(xlabel="P", ylabel="communication (% of step)", title=f"N={largest}")
    if caps:
        labels = [f"{h}\nP={p}" for h, p in caps]
        cap.bar(labels, [n for n in caps.values()])
        cap.set(ylabel="atoms", title="extrapolated capacity")
    for axis in (scaling, memory, comm):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _write(config: BenchConfig, rows: list[dict], plot: bool) -> None:
    if config.out is None or not rows:
        return
    caps = capacity(rows, config.memory_budget_gb * 1024)
    machine = machine_description(config.device)
    write_report(
        config.out,
        f"bench_{config.model}_{config.crystal}",
        payload={
            "config": {k: str(v) for k, v in vars(config).items()},
            "machine": machine,
            "rows": rows,
            "capacity": {f"{h}/P={p}": n for (h, p), n in caps.items()},
        },
        markdown=_markdown(rows, caps, config, machine),
        figure=(lambda: _figure(rows, caps, f"{config.model} on {config.crystal}"))
        if plot
        else None,
        dpi=110,
    )


def run_bench(config: BenchConfig, progress=print) -> list[dict]:
    """Run every configuration; write JSON, markdown and PNG under ``config.out`` if set."""
    from distmlip.models import resolve_model

    model = resolve_model(config.model)
    rows = []
    for n_atoms in config.sizes:
        atoms = _structure(config, n_atoms)
        for halo in config.halos:
            for partitioner in config.partitioners:
                for nprocs in config.nprocs:
                    if nprocs == 1 and (
                        halo != "exchange" or partitioner != config.partitioners[0]
                    ):
                        continue  # single process is the same for every mode
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
                    # Saved as each configuration finishes: a long run that fails later (out
                    # of memory, a lost node) keeps what it measured. The plot comes last.
                    _write(config, rows, plot=False)
    _write(config, rows, plot=True)
    return rows
