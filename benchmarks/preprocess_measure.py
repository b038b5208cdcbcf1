"""Measurements of ``benchmarks/preprocess.py``: each runs in a forked child process.

The per-worker build is timed step by step through :func:`distmlip.trace.recording` (spans
``mask``, ``neighbor_list`` and ``vesin`` of ``distmlip.graphs.halo.build_local_graph``), not by
patching the library. Peak memory is measured per child (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; ``tracemalloc`` for the numpy side).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import traceback
import tracemalloc

import numpy as np

from distmlip import trace
from distmlip.bench.systems import crystal, repeats_for
from distmlip.graphs.halo import build_all_local_graphs, build_local_graph, rows_of
from distmlip.graphs.neighbors import neighbor_list, neighborhood_mask
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure


def fcc_cu(target_atoms: float, rattle: float, seed: int = 0) -> tuple[Structure, int]:
    """Cubic fcc Cu supercell ``repeat(n)`` with 4 n³ ≈ target atoms, rattled by ``rattle`` Å."""
    repeat = repeats_for("cu", target_atoms)
    return Structure.from_ase(crystal("cu", repeat=repeat, rattle=rattle, seed=seed)), repeat


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
    """Peak RSS increase (bytes) of the code in a ``with`` block; with ``numpy_peak``, also the
    tracemalloc peak (numpy arrays and Python objects; not vesin's C++ buffers). tracemalloc
    slows some numpy paths several-fold, so timed code runs with ``numpy_peak=False``."""

    def __init__(self, numpy_peak: bool = False):
        self.numpy_peak = numpy_peak
        self.traced_peak = None

    def __enter__(self):
        self.rss_available = sys.platform.startswith("linux") and _reset_peak_rss()
        self.rss_before = _status_kib("VmRSS") if self.rss_available else 0
        if self.numpy_peak:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if self.numpy_peak:
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


def _timed_build(structure, owner, rank, nparts, cutoff):
    """One ``build_local_graph`` with its steps: mask, vesin, nl_convert (the rest of the
    neighbour list: filtering and int64 conversion) and bookkeeping (everything else), s."""
    with trace.recording() as record:
        start = time.perf_counter()
        cpu = time.process_time()
        graph = build_local_graph(structure, owner, rank, nparts, cutoff)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    steps = {"mask": record.seconds("mask"), "vesin": record.seconds("vesin")}
    steps["nl_convert"] = record.seconds("neighbor_list") - steps["vesin"]
    steps["bookkeeping"] = seconds - steps["mask"] - steps["vesin"] - steps["nl_convert"]
    return graph, {"seconds": seconds, "cpu_seconds": cpu, "steps": steps}


def measure_worker(
    structure: Structure, owner: np.ndarray, rank: int, nparts: int, cutoff: float, repeat: int
) -> dict:
    """One rank's build: the first call (cold: fresh memory) and the best of ``repeat`` calls."""
    with PeakMemory() as memory:
        graph, first = _timed_build(structure, owner, rank, nparts, cutoff)
    runs = [first]
    for _ in range(repeat - 1):
        del graph
        graph, run = _timed_build(structure, owner, rank, nparts, cutoff)
        runs.append(run)
    del graph
    with PeakMemory(numpy_peak=True) as traced:  # an extra, untimed build for the numpy-side peak
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
        "n_region": region_atoms(structure, owner, rank, cutoff),
        "n_edges": len(graph.edges),
        "n_send": int(sum(len(index) for index in send_index)),
        "peers": int(np.count_nonzero(graph.recv_counts)),
        "plan_bytes": plan_nbytes(graph, send_index),
        "rss_peak_bytes": memory.rss_peak_increase,
        "traced_peak_bytes": traced.traced_peak,
    }


def region_atoms(structure: Structure, owner: np.ndarray, rank: int, cutoff: float) -> int:
    """Atoms in ``rank``'s neighbour-search region (owned + one cell-list bin of shell), counted
    with the mask ``build_local_graph`` uses; untimed."""
    owned = owner == rank
    return int(
        neighborhood_mask(structure.positions, structure.cell, structure.pbc, owned, cutoff).sum()
    )


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
