"""Per-worker peak memory and time per evaluation, P = 1 vs P = 2, side by side in one run.

For each system size, a fresh DistributedCalculator is started for each P (one torch thread per
worker by default; ``--threads-p1 2`` gives P = 1 the same total cores as P = 2), the structure
is evaluated twice (energy + forces + stress) and the faster call is kept; each worker reports
its peak RSS (``ru_maxrss``, including start-up) after the calls. The ratios P2/P1 of time and
of memory per worker are the result. Writes JSON, a markdown table and a PNG plot.

    python benchmarks/scaling.py --model chgnet --atoms 1000 5000 10000 20000 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from distmlip.bench.report import markdown_table, pyplot, write_report
from distmlip.bench.systems import crystal

BASELINE_MB = 500.0
"""Approximate peak RSS of an idle worker (interpreter, torch, model), for the skip estimate."""


def measure(
    model, atoms, nprocs: int, partitioner: str, dtype: str, threads: int = 1, repeats: int = 2
) -> dict:
    from distmlip import DistributedCalculator

    with DistributedCalculator(
        model,
        nprocs=nprocs,
        partitioner=partitioner,
        dtype=dtype,
        threads_per_worker=threads,
        timeout=3600,
    ) as calc:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            calc.calculate(atoms.copy(), ["energy", "forces", "stress"])
            times.append(time.perf_counter() - start)
        stats, timings = calc.last_stats, calc.last_timings
    return {
        "atoms": len(atoms),
        "nprocs": nprocs,
        "threads_per_worker": threads,
        "time_s": min(times),
        "first_time_s": times[0],
        "peak_rss_mb_per_worker": [s["peak_rss_mb"] for s in stats],
        "max_peak_rss_mb": max(s["peak_rss_mb"] for s in stats),
        "owned_atoms": [s["owned_atoms"] for s in stats],
        "halo_atoms": [s["halo_atoms"] for s in stats],
        "edges": [s["edges"] for s in stats],
        "bytes_sent": [s["bytes_sent"] for s in stats],
        "timings_s": timings,
    }


COLUMNS = (
    "atoms",
    "P=1 time (s)",
    "P=2 time (s)",
    "time P2/P1",
    "P=1 peak/worker (MB)",
    "P=2 peak/worker (MB)",
    "memory P2/P1",
    "P=2 halo atoms/worker",
)


def table_row(n_atoms: int, one: dict | None, two: dict | None) -> list[str]:
    """The cells of :data:`COLUMNS` for one size; a missing P is reported as out of memory."""

    def cell(row, key, fmt="{:.2f}"):
        return fmt.format(row[key]) if row else "out of memory"

    both = one is not None and two is not None
    return [
        f"{n_atoms}",
        cell(one, "time_s"),
        cell(two, "time_s"),
        f"{two['time_s'] / one['time_s']:.2f}" if both else "–",
        cell(one, "max_peak_rss_mb", "{:.0f}"),
        cell(two, "max_peak_rss_mb", "{:.0f}"),
        f"{two['max_peak_rss_mb'] / one['max_peak_rss_mb']:.2f}" if both else "–",
        f"{int(np.mean(two['halo_atoms']))}" if two else "–",
    ]


def markdown(rows: list[dict], title: str) -> str:
    by = {(row["atoms"], row["nprocs"]): row for row in rows}
    table = [
        table_row(n, by.get((n, 1)), by.get((n, 2))) for n in sorted({r["atoms"] for r in rows})
    ]
    return f"# {title}\n\n" + markdown_table(COLUMNS, table) + "\n"


def plot(rows: list[dict], title: str):
    """Time and per-worker peak memory against atoms, P = 1 and 2, log-log."""
    by = {(row["atoms"], row["nprocs"]): row for row in rows}
    sizes = sorted({row["atoms"] for row in rows})
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    for nprocs, marker in ((1, "o"), (2, "s")):
        points = [(n, by[(n, nprocs)]) for n in sizes if (n, nprocs) in by]
        if not points:
            continue
        xs = [n for n, _ in points]
        left.plot(xs, [r["time_s"] for _, r in points], marker=marker, label=f"P={nprocs}")
        right.plot(
            xs, [r["max_peak_rss_mb"] / 1024 for _, r in points], marker=marker, label=f"P={nprocs}"
        )
    left.set(
        xlabel="atoms",
        ylabel="time per evaluation (s)",
        xscale="log",
        yscale="log",
        title="energy + forces + stress",
    )
    right.set(
        xlabel="atoms",
        ylabel="peak memory per worker (GB)",
        xscale="log",
        yscale="log",
        title="per-worker peak RSS",
    )
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_outputs(rows: list[dict], name: str, title: str, out: Path) -> None:
    text = markdown(rows, title)
    write_report(out, name, payload=rows, markdown=text, figure=lambda: plot(rows, title))
    print(text, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chgnet")
    parser.add_argument("--atoms", type=int, nargs="+", default=[1000, 5000, 10000, 20000])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitioner", default="slab")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads-p1", type=int, default=1, help="torch threads for P = 1")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=20.0,
        help="skip a run whose extrapolated total memory exceeds this",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--name", default=None, help="output file stem (default MODEL_scaling)")
    args = parser.parse_args()

    from distmlip.models import resolve_model

    model = resolve_model(args.model)
    rows: list[dict] = []
    slope_mb: dict[int, float] = {}  # per-worker MB per held atom, beyond the process baseline
    for n_atoms in args.atoms:
        # At least n_atoms: diamond Si, rounded up to whole cubic cells (8 atoms each).
        atoms = crystal("si", n_atoms, at_least=True, rattle=0.03, seed=0)
        for nprocs in args.nprocs:
            per_worker = BASELINE_MB + slope_mb.get(nprocs, 0.0) * len(atoms) / nprocs
            if per_worker * nprocs / 1024 > args.memory_limit_gb:
                print(f"skip {len(atoms)} atoms, P={nprocs}: ~{per_worker * nprocs / 1024:.0f} GB")
                continue
            threads = args.threads_p1 if nprocs == 1 else 1
            row = measure(model, atoms, nprocs, args.partitioner, args.dtype, threads)
            slope_mb[nprocs] = (row["max_peak_rss_mb"] - BASELINE_MB) / (len(atoms) / nprocs)
            rows.append(row)
            print(
                f"{len(atoms):>7} atoms  P={nprocs}  {row['time_s']:8.2f} s  "
                f"peak/worker {row['max_peak_rss_mb']:8.0f} MB",
                flush=True,
            )
    title = (
        f"{args.model} on diamond Si, {args.dtype}, {args.partitioner}, "
        f"1 thread per worker (P=1: {args.threads_p1})"
    )
    write_outputs(rows, args.name or f"{args.model}_scaling", title, args.out)


if __name__ == "__main__":
    main()
