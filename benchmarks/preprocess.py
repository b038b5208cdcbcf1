"""Preprocessing benchmark: partition, per-worker local graph and halo plan, 10^3 … 10^6 atoms.

What one distributed evaluation costs before any model runs:

* **partition** — ``distmlip.graphs.partition.partition`` on the whole system, done once by the
driver
  (``metis`` builds the whole neighbour list there, the geometric partitioners do not);
* **per-worker build** — ``distmlip.graphs.halo.build_local_graph`` for one rank: the cell-list
region
  mask, the vesin neighbour search on the rank's region (owned atoms + one bin of shell), the
  halo and the local edge arrays; plus resolving the send plan from the peers' requests
  (``resolve_send_index``). This is the per-worker cost; the target is < 2 s at 10^6 atoms,
  linear in N;
* **per-worker memory** — the bytes of the plan a worker keeps (``global_index``, edge
  receivers/senders/shifts, send/receive plan) and the measured peak RSS increase of the build
  (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; it includes vesin's own
  buffers) and the numpy peak from ``tracemalloc``;
* **reference** — one single-process vesin neighbour list of the whole system.

Every measurement runs in a forked child process, so peak memory is per measurement, a slow
partitioner can be cut off (``--metis-timeout``) and one failure does not end the run. Ranks
are sampled when there are many (``--sample-ranks``): rank 0, the middle rank and the last rank
(plus evenly spaced ones if more are asked for); "max" and "mean" are over the measured ranks.
The send plan of a sampled rank is derived from its own edges (the neighbour relation is
symmetric, so rank p sends atom a to rank q exactly when a has a neighbour owned by q); at small N
the benchmark checks this against ``build_all_local_graphs``.

Usage::

    python benchmarks/preprocess.py                 # full run, writes docs/benchmarks/preprocess.*
    python benchmarks/preprocess.py --quick         # 10^3, 10^4 atoms; P = 2, 8; short metis cap
    python benchmarks/preprocess.py --sizes 1e5 --nprocs 8 --partitioners rcb --threads 2

Outputs ``<out>/<name>.json``, ``<out>/<name>.md`` and ``<out>/<name>.png``. The measurements
are in ``preprocess_measure.py`` (steps timed with ``distmlip.trace``), the tables and the plot
in ``preprocess_report.py``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_threads_from_argv() -> None:
    """Thread counts must be fixed before numpy (OpenBLAS) and vesin (OpenMP) start."""
    threads = "1"
    for index, argument in enumerate(sys.argv):
        if argument == "--threads" and index + 1 < len(sys.argv):
            threads = sys.argv[index + 1]
        elif argument.startswith("--threads="):
            threads = argument.split("=", 1)[1]
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = threads


def _use_worker_allocator() -> None:
    """Measure with the C-library settings workers run with (``allocator="keep"``): they are
    read at process start, so re-run this script with them unless ``--allocator system``."""
    if "--allocator=system" in sys.argv or (
        "--allocator" in sys.argv and sys.argv[sys.argv.index("--allocator") + 1] == "system"
    ):
        return
    from distmlip.driver.pool import KEEP_MEMORY_ENVIRONMENT

    if any(os.environ.get(name) != value for name, value in KEEP_MEMORY_ENVIRONMENT.items()):
        environment = dict(os.environ, **KEEP_MEMORY_ENVIRONMENT)
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)


if __name__ == "__main__":
    _use_worker_allocator()
    _set_threads_from_argv()

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from preprocess_measure import (  # noqa: E402
    check_derived_plans,
    fcc_cu,
    measure_partition,
    measure_reference,
    measure_worker,
    run_isolated,
    sampled_ranks,
    summarize,
    warm_up,
)
from preprocess_report import TARGET_SECONDS, format_bytes, markdown, plot  # noqa: E402

from distmlip.bench.report import write_report  # noqa: E402
from distmlip.bench.systems import CRYSTALS  # noqa: E402


def parse_sizes(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _load_average():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def merge(old: dict, new: dict) -> dict:
    """``new`` plus the systems of ``old`` whose size ``new`` did not measure."""
    measured = {system["n_atoms"] for system in new["systems"]}
    kept = [system for system in old["systems"] if system["n_atoms"] not in measured]
    for system in kept:
        system.setdefault("date", old["meta"]["date"])
    new["systems"] = sorted(kept + new["systems"], key=lambda system: system["n_atoms"])
    new["meta"]["merged_with"] = old["meta"].get("command")
    return new


def measure_configuration(structure, nparts: int, method: str, args) -> dict:
    """One (partitioner, P) of a system: the partition, then every sampled rank's build, each
    in its own child process; failures are recorded in the entry, not raised."""
    n_atoms = structure.n_atoms
    timeout = args.metis_timeout if method == "metis" else args.timeout
    measured = run_isolated(
        measure_partition, (structure, nparts, method, args.cutoff, args.repeat), timeout
    )
    entry = {"partitioner": method, "nprocs": nparts}
    if "error" in measured:
        log(f"  {method:5s} P={nparts:3d}: partition FAILED: {measured['error']}")
        return {**entry, "partition": measured, "workers": []}
    owner = measured.pop("owner")
    sizes = np.bincount(owner, minlength=nparts)
    entry["partition"] = {**measured, "sizes": {"min": int(sizes.min()), "max": int(sizes.max())}}
    if n_atoms <= args.check_below:
        entry["plan_check"] = run_isolated(
            check_derived_plans, (structure, owner, nparts, args.cutoff), args.timeout
        )
    workers = []
    for rank in sampled_ranks(nparts, n_atoms, args.sample_ranks, args.all_ranks_below):
        worker = run_isolated(
            measure_worker, (structure, owner, rank, nparts, args.cutoff, args.repeat), args.timeout
        )
        worker.setdefault("rank", rank)
        workers.append(worker)
    entry["workers"] = workers
    entry["summary"] = summary = summarize(workers)
    if summary:
        log(
            f"  {method:5s} P={nparts:3d}: partition {measured['seconds']:7.3f} s | "
            f"worker warm max {summary['seconds']['max']:.3f} s "
            f"mean {summary['seconds']['mean']:.3f} s "
            f"cold max {summary['cold_seconds']['max']:.3f} s, {len(summary['ranks'])} "
            f"ranks | halo max {summary['n_halo']['max']:.0f} | "
            f"plan {summary['plan_bytes']['max'] / 2**20:.1f} MiB | "
            f"peak RSS +{format_bytes((summary['rss_peak_bytes'] or {}).get('max'))}"
        )
    for worker in workers:
        if "error" in worker:
            log(f"  {method:5s} P={nparts:3d}: rank {worker['rank']} FAILED")
            log(worker["error"])
    return entry


def run(args) -> dict:
    results = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "vesin": __import__("vesin").__version__,
            "threads": args.threads,
            "allocator": args.allocator,
            "repeat": args.repeat,
            "cutoff": args.cutoff,
            "rattle": args.rattle,
            "lattice": CRYSTALS["cu"].lattice,
            "target_seconds": TARGET_SECONDS,
            "load_average_start": _load_average(),
            "command": " ".join(sys.argv),
        },
        "systems": [],
    }
    warm_up(args.cutoff, args.partitioners)
    for target in args.sizes:
        structure, repeat = fcc_cu(target, args.rattle)
        n_atoms = structure.n_atoms
        log(f"N = {n_atoms} (fcc Cu {repeat}^3 cubic cells)")
        system = {
            "target": target,
            "repeat": repeat,
            "n_atoms": n_atoms,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_start": _load_average(),
            "runs": [],
        }
        reference = run_isolated(
            measure_reference, (structure, args.cutoff, args.repeat), args.timeout
        )
        system["reference_neighbor_list"] = reference
        if "error" not in reference:
            log(
                f"  reference vesin neighbour list: {reference['seconds']:.3f} s, "
                f"{reference['edges']} edges ({reference['edges'] / n_atoms:.1f}/atom)"
            )
        for nparts in args.nprocs:
            if nparts > n_atoms:
                continue
            for method in args.partitioners:
                system["runs"].append(measure_configuration(structure, nparts, method, args))
        system["load_average_end"] = _load_average()
        results["systems"].append(system)
        del structure
    results["meta"]["load_average_end"] = _load_average()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="target atom counts, comma separated (default 1e3,1e4,1e5,1e6)",
    )
    parser.add_argument(
        "--nprocs",
        type=parse_ints,
        default=None,
        help="numbers of workers P, comma separated (default 2,8,64)",
    )
    parser.add_argument(
        "--partitioners", type=lambda s: s.split(","), default=["slab", "rcb", "metis"]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument(
        "--name", default=None, help="output file stem (default preprocess, or preprocess_quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="10^3 and 10^4 atoms, P = 2, 8, metis capped at 60 s"
    )
    parser.add_argument(
        "--allocator",
        choices=["keep", "system"],
        default="keep",
        help="C-library memory settings: the workers' default (keep) or the system's",
    )
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--rattle", type=float, default=0.05, help="Gaussian σ in Å")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS/OpenMP (vesin) threads per measurement, as one worker's share",
    )
    parser.add_argument(
        "--sample-ranks",
        type=int,
        default=3,
        help="ranks measured when P is large (at least 0, middle, last)",
    )
    parser.add_argument(
        "--all-ranks-below",
        type=int,
        default=200_000,
        help="measure every rank when N is at most this (or P <= 8)",
    )
    parser.add_argument(
        "--check-below",
        type=int,
        default=20_000,
        help="check derived send plans against the library up to this N",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="builds per measured rank: the first is reported as cold, the best as warm",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument(
        "--metis-timeout",
        type=float,
        default=None,
        help="seconds for one metis partition (default 1200, quick 60)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the sizes of an existing <out>/<name>.json that this run does not measure",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite the table and plot from an existing <out>/<name>.json",
    )
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [1e3, 1e4] if args.quick else [1e3, 1e4, 1e5, 1e6]
    if args.nprocs is None:
        args.nprocs = [2, 8] if args.quick else [2, 8, 64]
    if args.metis_timeout is None:
        args.metis_timeout = 60.0 if args.quick else 1200.0
    if args.name is None:
        args.name = "preprocess_quick" if args.quick else "preprocess"

    json_path = args.out / f"{args.name}.json"
    if args.render_only:
        results = json.loads(json_path.read_text())
    else:
        results = run(args)
        if args.update and json_path.exists():
            results = merge(json.loads(json_path.read_text()), results)
    written = write_report(
        args.out,
        args.name,
        payload=results,
        markdown=markdown(results),
        figure=lambda: plot(results),
        dpi=130,
    )
    log("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
