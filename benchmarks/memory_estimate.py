"""How close ``estimate_memory`` comes to the measured peak, and how fast a ``memory_limit``
turns running out of memory into an error: the numbers docs/performance.md ("Capacity") and
the README quote, and the tolerances tests/test_out_of_memory.py asserts.

Two targets, those of the tests, each repeated ``--runs`` times with a fresh calculator (P=2):

* the reference model (float64, seeded weights), 4,000 rattled Cu atoms;
* CHGNet 0.3.0 (shipped weights, float32, rcb), 640 rattled MgO atoms.

Per run: ``calc.estimate_memory(atoms)``, then the call; per worker the relative error
(predicted − measured) / measured of the per-call peak RSS. Then the out-of-memory path: the
reference model with ``memory_limit=0.5`` GB at P=2 on the same 4,000 atoms, seconds from the
call's start to ``OutOfMemoryError`` (``--runs`` times).

    python benchmarks/memory_estimate.py --out docs/benchmarks
    python benchmarks/memory_estimate.py --runs 1 --out /tmp/x      # a smoke run

Writes ``<out>/memory_estimate.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ase.build import bulk

from distmlip import DistributedCalculator, OutOfMemoryError, Structure
from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report


def targets() -> dict:
    """name → (model, calculator keywords, atoms), as in tests/test_out_of_memory.py."""
    import torch

    from distmlip.models.reference import ReferenceMPNN

    torch.manual_seed(0)
    copper = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(10)
    copper.rattle(0.05, seed=0)
    magnesia = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat((4, 4, 5))
    magnesia.rattle(0.03, seed=0)
    reference = ReferenceMPNN(cutoff=5.0, num_layers=3, hidden=32)
    return {
        "reference": (reference, {"dtype": "float64", "timeout": 120}, copper),
        "chgnet": (
            "chgnet",
            {"dtype": "float32", "partitioner": "rcb", "timeout": 600},
            magnesia,
        ),
    }


def estimate_runs(model, keywords: dict, atoms, runs: int) -> list[dict]:
    records = []
    for run in range(runs):
        with DistributedCalculator(model, nprocs=2, **keywords) as calc:
            estimate = calc.estimate_memory(atoms)
            calc.compute(Structure.from_ase(atoms))
            measured = [stats["call_peak_rss_mb"] for stats in calc.last_stats]
        predicted = list(estimate.per_worker_mb)
        records.append(
            {
                "run": run,
                "predicted_mb": predicted,
                "measured_mb": measured,
                "relative_error": [(p - m) / m for p, m in zip(predicted, measured, strict=True)],
                "peak_error": (estimate.peak_mb - max(measured)) / max(measured),
            }
        )
        print(f"  run {run}: errors {[f'{e:+.1%}' for e in records[-1]['relative_error']]}")
    return records


def out_of_memory_runs(model, atoms, runs: int) -> list[float]:
    seconds = []
    for _ in range(runs):
        with DistributedCalculator(model, nprocs=2, timeout=60, memory_limit=0.5) as calc:
            structure = Structure.from_ase(atoms)
            start = time.perf_counter()
            try:
                calc.compute(structure)
            except OutOfMemoryError:
                seconds.append(time.perf_counter() - start)
            else:
                raise SystemExit("4,000 atoms fitted in memory_limit=0.5 GB: no error to time")
        print(f"  OutOfMemoryError after {seconds[-1]:.2f} s")
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args(argv)
    cases = targets()
    results = {}
    for name, (model, keywords, atoms) in cases.items():
        print(f"{name}: {len(atoms)} atoms, {args.runs} runs")
        results[name] = estimate_runs(model, keywords, atoms, args.runs)
    reference, _, copper = cases["reference"]
    print("out of memory: reference, memory_limit=0.5 GB")
    oom = out_of_memory_runs(reference, copper, args.runs)

    rows = []
    for name, records in results.items():
        errors = np.concatenate([r["relative_error"] for r in records])
        peaks = np.array([r["peak_error"] for r in records])
        rows.append(
            [
                name,
                len(cases[name][2]),
                len(records),
                f"{errors.min():+.1%} to {errors.max():+.1%}",
                f"{peaks.min():+.1%} to {peaks.max():+.1%}",
            ]
        )
    table = markdown_table(
        ["model", "atoms", "runs", "per worker (pred − meas)/meas", "largest worker"], rows
    )
    markdown = (
        f"# estimate_memory vs the measured per-call peak RSS, P=2\n\n{machine_description()}\n\n"
        f"{table}\n\nOut of memory under `memory_limit=0.5` (reference, 4,000 Cu atoms, P=2): "
        f"error after {min(oom):.2f}–{max(oom):.2f} s ({len(oom)} runs).\n"
    )

    def figure():
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, records in results.items():
            measured = np.concatenate([r["measured_mb"] for r in records])
            predicted = np.concatenate([r["predicted_mb"] for r in records])
            ax.scatter(measured, predicted, label=name, s=14)
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        ax.set_xlabel("measured per-call peak RSS per worker (MB)")
        ax.set_ylabel("estimate_memory (MB)")
        ax.legend()
        fig.tight_layout()
        return fig

    payload = {
        "machine": machine_description(),
        "estimates": results,
        "out_of_memory_seconds": oom,
    }
    for path in write_report(
        args.out, "memory_estimate", payload=payload, markdown=markdown, figure=figure
    ):
        print(path)


if __name__ == "__main__":
    main()
