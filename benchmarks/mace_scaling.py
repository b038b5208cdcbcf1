"""MACE scaling benchmark: time per step and per-worker peak memory, P = 1 vs P = 2.

A MACE model of foundation-model size (ScaleShiftMACE, hidden irreps 128x0e+128x1o, max_ell 3,
2 interactions, correlation 3, r_max 6 Å, 89 elements, random weights, float32) evaluates
energy + forces + stress of rattled crystals of growing size through
``distmlip.DistributedCalculator(model_file, nprocs=P, threads_per_worker=1)``.

* time: wall time of one energy+forces+stress evaluation, the *second* call on the structure
  (the first builds TorchScript profiles and caches); graph building and partitioning included;
* memory: peak RSS of each worker process (``calc.last_stats[i]['peak_rss_mb']``, the maximum
  over the worker's life: one fresh pool per configuration, so it is this configuration's peak).

Every (N, P) runs with a fresh worker pool. A configuration whose predicted memory (per-atom
peak of the last measured size with the same P, times N, times P workers) exceeds
``--memory-limit-gb`` is skipped and reported as such, so the run never swaps or gets killed.

Usage::

    python benchmarks/mace_scaling.py                       # Si, ~2k/5k/10k atoms
    python benchmarks/mace_scaling.py --element Cu --sizes 2000 5000
    python benchmarks/mace_scaling.py --quick               # 250/500 atoms, a smoke test

Writes ``<out>/mace.json``, ``<out>/mace.md`` and ``<out>/mace.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch

from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report
from distmlip.bench.systems import crystal

MODEL = {
    "hidden_irreps": "128x0e+128x1o",
    "max_ell": 3,
    "num_interactions": 2,
    "correlation": 3,
    "r_max": 6.0,
    "num_elements": 89,
    "MLP_irreps": "16x0e",
    "radial_MLP": [64, 64, 64],
    "num_bessel": 10,
}


def build_model(seed: int = 0):
    """Random-weight ScaleShiftMACE with the shape of MACE-MP 'medium', float32."""
    from e3nn import o3
    from mace import modules

    numbers = list(range(1, MODEL["num_elements"] + 1))
    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    return modules.ScaleShiftMACE(
        r_max=MODEL["r_max"],
        num_bessel=MODEL["num_bessel"],
        num_polynomial_cutoff=5,
        max_ell=MODEL["max_ell"],
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=MODEL["num_interactions"],
        num_elements=len(numbers),
        hidden_irreps=o3.Irreps(MODEL["hidden_irreps"]),
        MLP_irreps=o3.Irreps(MODEL["MLP_irreps"]),
        atomic_energies=-np.linspace(1.0, 5.0, len(numbers)),
        avg_num_neighbors=60.0,
        atomic_numbers=numbers,
        correlation=MODEL["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=MODEL["radial_MLP"],
        atomic_inter_scale=1.0,
        atomic_inter_shift=0.0,
    ).float()


def measure(model_path: str, atoms, nprocs: int, partitioner: str, timeout: float) -> dict:
    from distmlip import DistributedCalculator

    calc = DistributedCalculator(
        model_path,
        nprocs=nprocs,
        partitioner=partitioner,
        dtype="float32",
        threads_per_worker=1,
        timeout=timeout,
    )
    try:
        times = []
        for _ in range(2):
            atoms = atoms.copy()
            atoms.calc = calc
            start = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces", "stress"])
            times.append(time.perf_counter() - start)
        return {
            "first_call_s": times[0],
            "time_s": times[1],
            "energy": float(calc.results["energy"]),
            "peak_rss_mb": [float(s["peak_rss_mb"]) for s in calc.last_stats],
            "owned_atoms": [int(s["owned_atoms"]) for s in calc.last_stats],
            "halo_atoms": [int(s["halo_atoms"]) for s in calc.last_stats],
            "edges": [int(s["edges"]) for s in calc.last_stats],
            "timings": calc.last_timings,
        }
    finally:
        calc.close()


COLUMNS = (
    "atoms",
    "P=1 time (s)",
    "P=2 time (s)",
    "time P2/P1",
    "P=1 peak/worker (GiB)",
    "P=2 peak/worker (GiB)",
    "memory P2/P1",
    "halo atoms/worker (P=2)",
)


def table_row(n_atoms: int, one: dict | None, two: dict | None) -> list[str]:
    """The cells of :data:`COLUMNS` for one size; "—" where a P was skipped."""
    mem1 = max(one["peak_rss_mb"]) / 1024 if one else None
    mem2 = max(two["peak_rss_mb"]) / 1024 if two else None
    both = one is not None and two is not None
    return [
        f"{n_atoms:,}",
        f"{one['time_s']:.1f}" if one else "—",
        f"{two['time_s']:.1f}" if two else "—",
        f"{two['time_s'] / one['time_s']:.2f}" if both else "—",
        f"{mem1:.2f}" if mem1 else "—",
        f"{mem2:.2f}" if mem2 else "—",
        f"{mem2 / mem1:.2f}" if both else "—",
        f"{max(two['halo_atoms'])}" if two else "—",
    ]


def markdown(rows: list[dict], meta: dict) -> str:
    by_key = {(r["atoms"], r["nprocs"]): r for r in rows if "time_s" in r}
    sizes = sorted({r["atoms"] for r in rows})
    table = [table_row(n, by_key.get((n, 1)), by_key.get((n, 2))) for n in sizes]
    lines = [
        "# MACE scaling: P = 1 vs P = 2 (CPU)",
        "",
        f"Model: ScaleShiftMACE, hidden {MODEL['hidden_irreps']}, max_ell {MODEL['max_ell']}, "
        f"{MODEL['num_interactions']} interactions, correlation {MODEL['correlation']}, r_max "
        f"{MODEL['r_max']} Å, {MODEL['num_elements']} elements, random weights, float32. "
        f"{meta['element']} crystals, {meta['partitioner']} partitioner, one thread per worker, "
        f"machine: {meta['machine']}.",
        "",
        "Time: one energy+forces+stress evaluation (second call, after warm-up), wall clock, "
        "graph building included. Memory: peak RSS of each worker process (max over workers).",
        "",
        markdown_table(COLUMNS, table),
    ]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "Skipped (predicted to exceed the memory limit or failed):", ""]
        lines += [f"* {r['atoms']:,} atoms, P={r['nprocs']}: {r['skipped']}" for r in skipped]
    lines += [
        "",
        "Reading the numbers: on one CPU machine both workers share its memory and cores, so "
        "P=2 shows what a second device buys: each worker holds about half the graph and "
        "activations (plus its halo, one cutoff shell at the partition border), and the two "
        "halves run in parallel on two cores. Per-worker memory, not total memory, is what "
        "limits the system size on GPUs.",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict):
    """Time and per-worker peak memory against atoms, P = 1 and 2."""
    by_key = {(r["atoms"], r["nprocs"]): r for r in rows if "time_s" in r}
    sizes = sorted({r["atoms"] for r in rows})
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for p, marker in ((1, "o"), (2, "s")):
        points = [(n, by_key[n, p]) for n in sizes if (n, p) in by_key]
        if not points:
            continue
        x = [n for n, _ in points]
        axes[0].plot(x, [r["time_s"] for _, r in points], marker=marker, label=f"P={p}")
        axes[1].plot(
            x, [max(r["peak_rss_mb"]) / 1024 for _, r in points], marker=marker, label=f"P={p}"
        )
    axes[0].set(xlabel="atoms", ylabel="time per E+F+S (s)", title="time per step")
    axes[1].set(xlabel="atoms", ylabel="peak RSS per worker (GiB)", title="memory per worker")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"MACE (128x0e+128x1o, max_ell 3, 2 layers), {meta['element']}, float32, CPU")
    fig.tight_layout()
    return fig


def write_outputs(out: Path, name: str, rows: list[dict], meta: dict) -> None:
    write_report(
        out,
        name,
        payload={"meta": meta, "runs": rows},
        markdown=markdown(rows, meta),
        figure=lambda: plot(rows, meta),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--element", default="Si", choices=["Si", "Cu"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--partitioner", default="slab")
    parser.add_argument("--memory-limit-gb", type=float, default=17.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="250 and 500 atoms")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--name", default="mace")
    args = parser.parse_args(argv)
    sizes = [250, 500] if args.quick else args.sizes

    meta = {
        "element": args.element,
        "partitioner": args.partitioner,
        "model": MODEL,
        "machine": machine_description(),
        "torch": torch.__version__,
        "mace": getattr(mace, "__version__", "?"),
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows: list[dict] = []
    per_atom_mb: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as directory:
        model_path = os.path.join(directory, "mace_medium_random.model")
        torch.save(build_model(), model_path)
        for target in sizes:
            atoms = crystal(args.element, target, rattle=0.05, seed=0)
            n = len(atoms)
            for nprocs in args.nprocs:
                row = {"atoms": n, "nprocs": nprocs}
                if nprocs in per_atom_mb:
                    predicted = per_atom_mb[nprocs] * n * nprocs / 1024
                    if predicted > args.memory_limit_gb:
                        row["skipped"] = (
                            f"predicted {predicted:.1f} GB in total > {args.memory_limit_gb} GB"
                        )
                        print(row, flush=True)
                        rows.append(row)
                        continue
                try:
                    row.update(measure(model_path, atoms, nprocs, args.partitioner, args.timeout))
                except Exception as error:  # report and go on with the next configuration
                    row["skipped"] = f"failed: {type(error).__name__}: {error}"[:300]
                else:
                    per_atom_mb[nprocs] = max(row["peak_rss_mb"]) / n
                print(
                    {k: v for k, v in row.items() if k not in ("timings",)},
                    flush=True,
                )
                rows.append(row)
                write_outputs(Path(args.out), args.name, rows, meta)
    write_outputs(Path(args.out), args.name, rows, meta)


if __name__ == "__main__":
    main()
