"""Preprocessing benchmark: partition, per-worker local graph and halo plan, 10^3 … 10^6 atoms.

What one distributed evaluation costs before any model runs:

* **partition** — ``distmlip.partition.partition`` on the whole system, done once by the driver
  (``metis`` builds the whole neighbour list there, the geometric partitioners do not);
* **per-worker build** — ``distmlip.halo.build_local_graph`` for one rank: the cell-list region
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

Outputs ``<out>/<name>.json``, ``<out>/<name>.md`` and ``<out>/<name>.png``.
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
    from distmlip.launch import KEEP_MEMORY_ENVIRONMENT

    if any(os.environ.get(name) != value for name, value in KEEP_MEMORY_ENVIRONMENT.items()):
        environment = dict(os.environ, **KEEP_MEMORY_ENVIRONMENT)
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)


if __name__ == "__main__":
    _use_worker_allocator()
    _set_threads_from_argv()

import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import tracemalloc  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import distmlip.graph as graph_module  # noqa: E402
import distmlip.halo as halo_module  # noqa: E402
from distmlip.graph import Structure, neighbor_list  # noqa: E402
from distmlip.halo import build_all_local_graphs, build_local_graph, rows_of  # noqa: E402
from distmlip.partition import partition  # noqa: E402

TARGET_SECONDS = 2.0
LATTICE = 3.61  # Å, fcc Cu

# ----------------------------------------------------------------------------------------------
# Systems and process-level measurement helpers


def fcc_cu(target_atoms: float, rattle: float, seed: int = 0) -> tuple[Structure, int]:
    """Cubic fcc Cu supercell ``repeat(n)`` with 4 n^3 ≈ target atoms, rattled."""
    from ase.build import bulk

    n = max(1, round((target_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(n)
    if rattle > 0:
        atoms.rattle(stdev=rattle, seed=seed)
    return Structure.from_ase(atoms), n


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS increase (bytes) of the code in a ``with`` block; with ``trace``, also the
    tracemalloc peak (numpy arrays and Python objects; not vesin's C++ buffers). tracemalloc
    slows some numpy paths several-fold, so timed code runs with ``trace=False``."""

    def __init__(self, trace: bool = False):
        self.trace = trace
        self.traced_peak = None

    def __enter__(self):
        self.rss_available = sys.platform.startswith("linux") and _reset_peak_rss()
        self.rss_before = _status_kib("VmRSS") if self.rss_available else 0
        if self.trace:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if self.trace:
            _, self.traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        if self.rss_available:
            self.rss_peak_increase = 1024 * (_status_kib("VmHWM") - self.rss_before)
        else:
            self.rss_peak_increase = None
        return False


def run_isolated(function, args: tuple, timeout: float):
    """``function(*args)`` in a forked child; returns its result, or a dict with ``error``."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child():
        try:
            sender.send(("ok", function(*args)))
        except BaseException:  # report everything, including MemoryError
            sender.send(("error", traceback.format_exc(limit=4)))
        finally:
            sender.close()

    process = context.Process(target=child, daemon=True)
    start = time.perf_counter()
    process.start()
    sender.close()
    status, payload = "timeout", None
    try:
        if receiver.poll(timeout):
            try:
                status, payload = receiver.recv()
            except EOFError:
                status, payload = "error", "child exited without a result"
    finally:
        if process.is_alive() and status == "timeout":
            process.kill()
        process.join(30)
        receiver.close()
    if status == "ok":
        return payload
    if status == "timeout":
        return {"error": f"timed out after {timeout:.0f} s", "timeout": True}
    if process.exitcode and process.exitcode < 0:
        payload = (
            f"{payload} (child killed by signal {-process.exitcode}, after "
            f"{time.perf_counter() - start:.0f} s; out of memory?)"
        )
    return {"error": payload}


# ----------------------------------------------------------------------------------------------
# Measurements (each runs inside a child process)


def measure_reference(structure: Structure, cutoff: float, repeat: int) -> dict:
    """Single-process vesin neighbour list of the whole system (int64 EdgeList): first, best."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        edges = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
        times = [time.perf_counter() - start]
    for _ in range(repeat - 1):
        del edges
        start = time.perf_counter()
        edges = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
        times.append(time.perf_counter() - start)
    return {
        "seconds": min(times),
        "cold_seconds": times[0],
        "edges": len(edges),
        "rss_peak_bytes": memory.rss_peak_increase,
    }


def measure_partition(
    structure: Structure, nparts: int, method: str, cutoff: float, repeat: int
) -> dict:
    """The driver's partition step: best of ``repeat`` (one call only for slow metis)."""
    times, cpus = [], []
    with PeakMemory() as memory:
        for _ in range(repeat):
            start = time.perf_counter()
            cpu = time.process_time()
            owner = partition(structure, nparts, method, cutoff)
            cpus.append(time.process_time() - cpu)
            times.append(time.perf_counter() - start)
            if method == "metis" or times[-1] > 5.0:
                break
    return {
        "seconds": min(times),
        "cold_seconds": times[0],
        "cpu_seconds": min(cpus),
        "owner": owner,
        "rss_peak_bytes": memory.rss_peak_increase,
    }


class _StepTimer:
    """Wraps the library's building blocks to time them inside ``build_local_graph``."""

    def __init__(self):
        self.seconds = {"mask": 0.0, "neighbor_list": 0.0, "vesin": 0.0}
        self.region_atoms = 0

    def install(self) -> None:
        timer = self
        mask, nlist = halo_module.neighborhood_mask, halo_module.neighbor_list
        compute = graph_module.vesin.NeighborList.compute

        def timed_mask(*args, **kwargs):
            start = time.perf_counter()
            result = mask(*args, **kwargs)
            timer.seconds["mask"] += time.perf_counter() - start
            timer.region_atoms = int(result.sum())
            return result

        def timed_neighbor_list(*args, **kwargs):
            start = time.perf_counter()
            result = nlist(*args, **kwargs)
            timer.seconds["neighbor_list"] += time.perf_counter() - start
            return result

        def timed_compute(self, *args, **kwargs):
            start = time.perf_counter()
            result = compute(self, *args, **kwargs)
            timer.seconds["vesin"] += time.perf_counter() - start
            return result

        # Only ever installed in a forked child that exits afterwards.
        halo_module.neighborhood_mask = timed_mask
        halo_module.neighbor_list = timed_neighbor_list
        graph_module.vesin.NeighborList.compute = timed_compute


def derived_send_index(graph) -> list[np.ndarray]:
    """Send plan of one rank from its own edges (valid because neighbour lists are symmetric).

    Rank p sends owned atom a to rank q iff a receives an edge from an atom owned by q, which is
    what q's requests to p contain; rows ascend like ``rows_of`` makes them.
    """
    halo_edge = graph.edges.senders >= graph.n_owned
    peers = graph.halo_owner[graph.edges.senders[halo_edge] - graph.n_owned]
    keys = np.unique(peers * max(graph.n_owned, 1) + graph.edges.receivers[halo_edge])
    peer_of_key, rows = np.divmod(keys, max(graph.n_owned, 1))
    counts = np.bincount(peer_of_key, minlength=graph.world_size)
    return np.split(rows.astype(np.int64), np.cumsum(counts)[:-1])


def plan_nbytes(graph, send_index: list[np.ndarray]) -> dict:
    edges = graph.edges
    parts = {
        "global_index": graph.global_index.nbytes,
        "edges": edges.receivers.nbytes + edges.senders.nbytes + edges.shifts.nbytes,
        "halo_plan": graph.recv_counts.nbytes + sum(index.nbytes for index in send_index),
    }
    parts["total"] = sum(parts.values())
    return parts


def _timed_build(timer, structure, owner, rank, nparts, cutoff):
    timer.seconds = dict.fromkeys(timer.seconds, 0.0)
    start = time.perf_counter()
    cpu = time.process_time()
    graph = build_local_graph(structure, owner, rank, nparts, cutoff)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    steps = dict(timer.seconds)
    steps["nl_convert"] = steps.pop("neighbor_list") - steps["vesin"]
    steps["bookkeeping"] = seconds - steps["mask"] - steps["vesin"] - steps["nl_convert"]
    return graph, {"seconds": seconds, "cpu_seconds": cpu, "steps": steps}


def measure_worker(
    structure: Structure, owner: np.ndarray, rank: int, nparts: int, cutoff: float, repeat: int
) -> dict:
    """One rank's build: the first call (cold: fresh memory) and the best of ``repeat`` calls."""
    timer = _StepTimer()
    timer.install()
    with PeakMemory() as memory:
        graph, first = _timed_build(timer, structure, owner, rank, nparts, cutoff)
    runs = [first]
    for _ in range(repeat - 1):
        del graph
        graph, run = _timed_build(timer, structure, owner, rank, nparts, cutoff)
        runs.append(run)
    del graph
    with PeakMemory(trace=True) as traced:  # an extra, untimed build for the numpy-side peak
        graph = build_local_graph(structure, owner, rank, nparts, cutoff)
    best = min(runs, key=lambda run: run["seconds"])
    # Stand-in for the request exchange (communication is not timed): what each peer asks for.
    send_index = derived_send_index(graph)
    owned_keys = graph.global_index[: graph.n_owned]
    requests = [owned_keys[rows] for rows in send_index]
    start = time.perf_counter()
    resolved = rows_of(owned_keys, requests, rank)
    resolve_seconds = time.perf_counter() - start
    assert all(np.array_equal(a, b) for a, b in zip(resolved, send_index, strict=True))
    return {
        "rank": rank,
        "seconds": best["seconds"] + resolve_seconds,
        "cold_seconds": first["seconds"] + resolve_seconds,
        "build_seconds": [run["seconds"] for run in runs],
        "build_cpu_seconds": best["cpu_seconds"],
        "resolve_seconds": resolve_seconds,
        "steps": best["steps"],
        "cold_steps": first["steps"],
        "n_owned": graph.n_owned,
        "n_halo": graph.n_halo,
        "n_region": timer.region_atoms,
        "n_edges": len(graph.edges),
        "n_send": int(sum(len(index) for index in send_index)),
        "peers": int(np.count_nonzero(graph.recv_counts)),
        "plan_bytes": plan_nbytes(graph, send_index),
        "rss_peak_bytes": memory.rss_peak_increase,
        "traced_peak_bytes": traced.traced_peak,
    }


def check_derived_plans(structure: Structure, owner: np.ndarray, nparts: int, cutoff: float):
    """The benchmark's per-rank send plans equal the library's resolved ones."""
    for graph in build_all_local_graphs(structure, owner, nparts, cutoff):
        derived = derived_send_index(graph)
        if not all(np.array_equal(a, b) for a, b in zip(derived, graph.send_index, strict=True)):
            raise AssertionError(
                f"derived send plan differs from the resolved one, rank {graph.rank}"
            )
    return True


def sampled_ranks(nparts: int, n_atoms: int, sample: int, all_below: int) -> list[int]:
    if nparts <= 8 or n_atoms <= all_below:
        return list(range(nparts))
    picks = {0, nparts // 2, nparts - 1}
    picks.update(int(round(x)) for x in np.linspace(0, nparts - 1, max(sample, 3)))
    return sorted(picks)


# ----------------------------------------------------------------------------------------------
# Driver


def parse_sizes(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def summarize(workers: list[dict]) -> dict:
    ok = [w for w in workers if "error" not in w]
    if not ok:
        return {}

    def stat(values):
        return {"max": float(np.max(values)), "mean": float(np.mean(values))}

    rss = [w["rss_peak_bytes"] for w in ok if w["rss_peak_bytes"] is not None]
    return {
        "ranks": [w["rank"] for w in ok],
        "seconds": stat([w["seconds"] for w in ok]),
        "cold_seconds": stat([w["cold_seconds"] for w in ok]),
        "build_cpu_seconds": stat([w["build_cpu_seconds"] for w in ok]),
        "n_owned": stat([w["n_owned"] for w in ok]),
        "n_halo": stat([w["n_halo"] for w in ok]),
        "n_edges": stat([w["n_edges"] for w in ok]),
        "plan_bytes": stat([w["plan_bytes"]["total"] for w in ok]),
        "rss_peak_bytes": stat(rss) if rss else None,
        "traced_peak_bytes": stat([w["traced_peak_bytes"] for w in ok]),
        "steps_of_slowest": max(ok, key=lambda w: w["seconds"])["steps"],
    }


def warm_up(cutoff: float, partitioners: list[str]) -> None:
    """Load vesin's library and numpy's code paths in the parent, so forked children don't."""
    structure, _ = fcc_cu(500, 0.05)
    neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    for method in partitioners:
        owner = partition(structure, 2, method, cutoff)
    build_all_local_graphs(structure, owner, 2, cutoff)


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
            "lattice": LATTICE,
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
                timeout = args.metis_timeout if method == "metis" else args.timeout
                measured = run_isolated(
                    measure_partition,
                    (structure, nparts, method, args.cutoff, args.repeat),
                    timeout,
                )
                entry = {"partitioner": method, "nprocs": nparts}
                if "error" in measured:
                    entry["partition"] = measured
                    entry["workers"] = []
                    log(f"  {method:5s} P={nparts:3d}: partition FAILED: {measured['error']}")
                    system["runs"].append(entry)
                    continue
                owner = measured.pop("owner")
                entry["partition"] = measured
                entry["partition"]["sizes"] = {
                    "min": int(np.bincount(owner, minlength=nparts).min()),
                    "max": int(np.bincount(owner, minlength=nparts).max()),
                }
                if n_atoms <= args.check_below:
                    entry["plan_check"] = run_isolated(
                        check_derived_plans, (structure, owner, nparts, args.cutoff), args.timeout
                    )
                ranks = sampled_ranks(nparts, n_atoms, args.sample_ranks, args.all_ranks_below)
                workers = []
                for rank in ranks:
                    worker = run_isolated(
                        measure_worker,
                        (structure, owner, rank, nparts, args.cutoff, args.repeat),
                        args.timeout,
                    )
                    worker.setdefault("rank", rank)
                    workers.append(worker)
                entry["workers"] = workers
                entry["summary"] = summarize(workers)
                summary = entry["summary"]
                failed = [w for w in workers if "error" in w]
                if summary:
                    log(
                        f"  {method:5s} P={nparts:3d}: partition {measured['seconds']:7.3f} s | "
                        f"worker warm max {summary['seconds']['max']:.3f} s "
                        f"mean {summary['seconds']['mean']:.3f} s "
                        f"cold max {summary['cold_seconds']['max']:.3f} s, {len(summary['ranks'])} "
                        f"ranks | halo max {summary['n_halo']['max']:.0f} | "
                        f"plan {summary['plan_bytes']['max'] / 2**20:.1f} MiB | "
                        f"peak RSS +{_fmt_bytes((summary['rss_peak_bytes'] or {}).get('max'))}"
                    )
                for worker in failed:
                    log(f"  {method:5s} P={nparts:3d}: rank {worker['rank']} FAILED")
                    log(worker["error"])
                system["runs"].append(entry)
        system["load_average_end"] = _load_average()
        results["systems"].append(system)
        del structure
    results["meta"]["load_average_end"] = _load_average()
    return results


# ----------------------------------------------------------------------------------------------
# Report: markdown table and plots


def _fmt_bytes(value) -> str:
    if value is None:
        return "–"
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    if value >= 2**20:
        return f"{value / 2**20:.1f} MiB"
    return f"{value / 2**10:.0f} KiB"


def _fmt_seconds(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Preprocessing benchmark: partition, local graph and halo plan per worker",
        "",
        f"Generated by `benchmarks/preprocess.py` on {meta['date']} ({meta['processor']}, "
        f"{meta['cpu_count']} cores, {meta['threads']} thread(s) per measurement, "
        f"allocator {meta.get('allocator', 'system')}, "
        f"numpy {meta['numpy']}, vesin {meta['vesin']}). "
        f"System: fcc Cu, a = {meta['lattice']} Å, rattled σ = {meta['rattle']} Å, "
        f"cutoff {meta['cutoff']} Å. Command: `{meta['command']}`"
        + (f", merged with `{meta['merged_with']}`" if meta.get("merged_with") else "")
        + ".",
        "",
        "* **partition** — whole-system step, once on the driver (wall s), and its peak RSS"
        " increase (`metis` builds the whole neighbour list there).",
        "* **worker warm max / mean** — `build_local_graph` + `resolve_send_index` for one rank"
        f" (wall s), best of {meta['repeat']} builds in the worker process (the steady state of"
        " a worker that rebuilds its graph, e.g. every MD step); max and mean over the measured"
        " ranks (all ranks, or rank 0, middle, last and a few evenly spaced ones where P is"
        " large). Target: < 2 s at 10^6 atoms.",
        "* **warm max CPU** — process CPU time of the best build, max over ranks: less"
        " sensitive than wall time to other jobs sharing the machine, blind to page-fault"
        " waits served outside the process.",
        "* **cold max** — the first build in a fresh process, max over ranks: it also pays the"
        " first touch of every page it allocates (expensive on this virtual machine: up to"
        " ~2 s per GiB of never-touched memory).",
        "* **owned / halo / edges** — per worker, max over measured ranks.",
        "* **plan** — bytes a worker keeps: `global_index`, edge receivers/senders/shifts (int64),"
        " send/receive plan; max over ranks.",
        "* **peak RSS** — measured peak resident-memory increase during the build (includes"
        " vesin's internal buffers and temporaries); max over ranks.",
        "* **slowest rank's steps** — mask: cell-list region mask (O(N)); vesin: neighbour"
        " search on the region; convert: filter to owned receivers + int64 conversion;"
        " rest: halo, local rows, plan.",
        "",
    ]
    header = (
        "| N | P | partitioner | partition (s) | partition RSS | warm max (s) | warm mean (s) "
        "| warm max CPU (s) | cold max (s) "
        "| ranks "
        "| owned | halo | edges | plan | peak RSS | slowest rank's steps: mask / vesin / "
        "convert / rest (s) |"
    )
    for system in results["systems"]:
        reference = system["reference_neighbor_list"]
        ref_text = (
            f"{reference['seconds']:.3f} s warm, {reference['cold_seconds']:.3f} s cold, "
            f"{reference['edges']:,} edges, peak RSS "
            f"+{_fmt_bytes(reference['rss_peak_bytes'])}"
            if "error" not in reference
            else f"failed: {reference['error']}"
        )
        lines += [
            f"## N = {system['n_atoms']:,} atoms ({system['repeat']}³ cubic cells)",
            "",
            f"Reference, one single-process vesin neighbour list of the whole system: {ref_text}.",
            "",
            f"Measured {system.get('date', meta['date'])}; load average (1, 5, 15 min) at start "
            f"{system.get('load_average_start', '–')}, end {system.get('load_average_end', '–')}"
            f" on {meta['cpu_count']} cores.",
            "",
            header,
            "|" + "---|" * 16,
        ]
        for run_entry in system["runs"]:
            part = run_entry["partition"]
            summary = run_entry.get("summary") or {}
            prefix = (
                f"| {system['n_atoms']:,} | {run_entry['nprocs']} | {run_entry['partitioner']} | "
            )
            if "error" in part:
                reason = "timed out" if part.get("timeout") else "failed"
                lines.append(prefix + f"{reason} |" + " – |" * 12)
                continue
            if not summary:
                lines.append(
                    prefix
                    + f"{_fmt_seconds(part['seconds'])} | {_fmt_bytes(part['rss_peak_bytes'])}"
                    + " | failed |"
                    + " – |" * 10
                )
                continue
            steps = summary["steps_of_slowest"]
            rss = summary["rss_peak_bytes"]
            nranks = len(summary["ranks"])
            ranks_text = (
                "all" if nranks == run_entry["nprocs"] else f"{nranks} of {run_entry['nprocs']}"
            )
            lines.append(
                prefix
                + " | ".join(
                    [
                        _fmt_seconds(part["seconds"]),
                        _fmt_bytes(part["rss_peak_bytes"]),
                        _fmt_seconds(summary["seconds"]["max"]),
                        _fmt_seconds(summary["seconds"]["mean"]),
                        _fmt_seconds(summary["build_cpu_seconds"]["max"]),
                        _fmt_seconds(summary["cold_seconds"]["max"]),
                        ranks_text,
                        f"{summary['n_owned']['max']:,.0f}",
                        f"{summary['n_halo']['max']:,.0f}",
                        f"{summary['n_edges']['max']:,.0f}",
                        _fmt_bytes(summary["plan_bytes"]["max"]),
                        _fmt_bytes(rss["max"] if rss else None),
                        f"{steps['mask']:.3f} / {steps['vesin']:.3f} / "
                        f"{steps['nl_convert']:.3f} / {steps['bookkeeping']:.3f}",
                    ]
                )
                + " |"
            )
        failures = [
            (run_entry, worker)
            for run_entry in system["runs"]
            for worker in run_entry["workers"]
            if "error" in worker
        ]
        for run_entry, worker in failures:
            lines.append(
                f"\nRank {worker['rank']} of {run_entry['partitioner']} P={run_entry['nprocs']} "
                f"failed: `{worker['error'].strip().splitlines()[-1]}`"
            )
        checks = [r for r in system["runs"] if "plan_check" in r]
        if checks:
            good = all(r["plan_check"] is True for r in checks)
            lines += [
                "",
                "Derived send plans checked against `build_all_local_graphs`: "
                + ("identical for every run." if good else "**MISMATCH** — see the JSON."),
            ]
        lines.append("")
    lines += verdict(results)
    return "\n".join(lines) + "\n"


def verdict(results: dict) -> list[str]:
    """Target check at the largest N, and linearity of worker time in N."""
    lines = ["## Target: 10^6 atoms in < 2 s per worker, linear in N", ""]
    largest = max(results["systems"], key=lambda s: s["n_atoms"], default=None)
    if largest is None:
        return []
    lines += [
        f"At N = {largest['n_atoms']:,}:",
        "",
        "| partitioner | P | warm max (s) | cold max (s) | < 2 s warm | < 2 s cold |",
        "|---|---|---|---|---|---|",
    ]
    for run_entry in largest["runs"]:
        summary = run_entry.get("summary")
        if not summary:
            lines.append(f"| {run_entry['partitioner']} | {run_entry['nprocs']} | – | – | – | – |")
            continue
        warm, cold = summary["seconds"]["max"], summary["cold_seconds"]["max"]
        lines.append(
            f"| {run_entry['partitioner']} | {run_entry['nprocs']} | {warm:.2f} | {cold:.2f} | "
            f"{'yes' if warm < TARGET_SECONDS else '**no**'} | "
            f"{'yes' if cold < TARGET_SECONDS else '**no**'} |"
        )
    lines.append("")
    shares = []
    for run_entry in largest["runs"]:
        summary = run_entry.get("summary")
        if summary:
            steps = summary["steps_of_slowest"]
            total = sum(steps.values())
            share = {name: f"{100 * value / total:.0f}%" for name, value in steps.items()}
            shares.append(
                f"{run_entry['partitioner']} P={run_entry['nprocs']}: vesin {share['vesin']}, "
                f"convert {share['nl_convert']}, mask {share['mask']}"
            )
    if shares:
        lines += [
            "Where the slowest rank's build time goes at this size (the rest is halo and local"
            " rows): " + "; ".join(shares) + ".",
            "",
        ]
    # Linearity: slope of log(time) against log(N) between the two largest sizes; per-worker
    # work is ∝ N/P + halo, so 1 means linear and < 1 means fixed costs still matter.
    fits = []
    for key, points in sorted(_series(results, "seconds").items()):
        if len(points) >= 2:
            (n0, t0), (n1, t1) = points[-2], points[-1]
            fits.append(f"{key[0]} P={key[1]}: {math.log(t1 / t0) / math.log(n1 / n0):.2f}")
    if fits:
        lines += [
            "Log-log slope of the warm per-worker max time against N between the two largest"
            " sizes (1 = linear, < 1: fixed costs still visible): " + "; ".join(fits) + ".",
            "",
        ]
    # Cost per local edge of the slowest measured rank: constant in N means linear scaling.
    sizes = [system["n_atoms"] for system in results["systems"]]
    table: dict = {}
    for column, system in enumerate(results["systems"]):
        for run_entry in system["runs"]:
            ok = [w for w in run_entry["workers"] if "error" not in w and w["n_edges"]]
            if ok:
                slowest = max(ok, key=lambda w: w["seconds"])
                key = (run_entry["partitioner"], run_entry["nprocs"])
                row = table.setdefault(key, ["–"] * len(sizes))
                row[column] = f"{1e9 * slowest['seconds'] / slowest['n_edges']:.0f}"
    if table:
        lines += [
            "Warm time of the slowest rank per local edge (ns; constant in N = linear):",
            "",
            "| partitioner | P | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
            "|---|---|" + "---|" * len(sizes),
        ]
        for (method, p), row in sorted(table.items(), key=lambda item: (item[0][1], item[0][0])):
            lines.append(f"| {method} | {p} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _series(results: dict, quantity: str) -> dict:
    series: dict = {}
    for system in results["systems"]:
        for run_entry in system["runs"]:
            summary = run_entry.get("summary")
            if not summary:
                continue
            value = summary[quantity]["max"] if summary.get(quantity) else None
            if value is None:
                continue
            key = (run_entry["partitioner"], run_entry["nprocs"])
            series.setdefault(key, []).append((system["n_atoms"], value))
    return series


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"slab": "-", "rcb": "--", "metis": ":"}
    markers = {"slab": "o", "rcb": "s", "metis": "^"}
    nprocs = sorted({key[1] for key in _series(results, "seconds")})
    colors = {p: plt.cm.viridis(i / max(len(nprocs) - 1, 1) * 0.85) for i, p in enumerate(nprocs)}

    def draw(axis, quantity, scale):
        for (method, p), points in sorted(_series(results, quantity).items()):
            n, values = zip(*points, strict=True)
            axis.plot(
                n,
                np.asarray(values) * scale,
                linestyle=styles.get(method, "-"),
                marker=markers.get(method, "o"),
                color=colors[p],
                label=f"{method}, P={p}",
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("atoms N")
        axis.grid(True, which="both", alpha=0.3)

    draw(ax_time, "seconds", 1.0)
    reference = [
        (s["n_atoms"], s["reference_neighbor_list"]["seconds"])
        for s in results["systems"]
        if "error" not in s["reference_neighbor_list"]
    ]
    if reference:
        n, t = zip(*reference, strict=True)
        ax_time.plot(n, t, color="grey", marker="x", label="whole-system vesin NL (1 process)")
    ax_time.axhline(TARGET_SECONDS, color="red", linewidth=1.2, label="target 2 s")
    sizes = [system["n_atoms"] for system in results["systems"]]
    if len(sizes) > 1:
        guide = np.array([min(sizes), max(sizes)], dtype=float)
        ax_time.plot(
            guide,
            TARGET_SECONDS * guide / guide[-1],
            color="red",
            linestyle=(0, (1, 3)),
            linewidth=1.0,
            label="∝ N, 2 s at the largest N",
        )
    ax_time.set_ylabel("per-worker build time, max over ranks (s)")
    ax_time.set_title("Local graph + halo plan per worker")
    ax_time.legend(fontsize=7, ncol=2)

    draw(ax_memory, "rss_peak_bytes", 1 / 2**20)
    for (method, p), points in sorted(_series(results, "plan_bytes").items()):
        n, values = zip(*points, strict=True)
        ax_memory.plot(
            n,
            np.asarray(values) / 2**20,
            linestyle=styles.get(method, "-"),
            color=colors[p],
            alpha=0.35,
            linewidth=0.9,
        )
    ax_memory.set_ylabel("MiB per worker (max over ranks)")
    ax_memory.set_title("Peak RSS increase of the build (markers); plan arrays kept (faint)")
    ax_memory.legend(fontsize=7, ncol=2)
    figure.suptitle(
        f"distmlip preprocessing, fcc Cu, cutoff {results['meta']['cutoff']} Å, "
        f"{results['meta']['threads']} thread(s) per worker"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


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
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_rounded(results), indent=1, default=_json_default) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(results))
    try:
        plot(results, args.out / f"{args.name}.png")
    except ImportError:
        log("matplotlib not installed: no plot (pip install 'distmlip[bench]')")
    log(f"wrote {json_path}, {args.name}.md, {args.name}.png in {args.out}")
    return 0


def _rounded(value):
    """Floats to 5 significant digits (timings are not more precise), recursively."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
