"""What a call costs by the properties asked for, and what reusing CHGNet's bond graph saves.

Both measured in one run, side by side (this machine is noisy: ratios, alternating rounds):

* **properties**: CHGNet calls asking for the energy alone (no backward pass) and for energy,
  forces and stress, alternating, on fresh positions each time (no cache); median wall time.
* **prepare reuse**: velocity-Verlet MD with a Verlet skin. On a step that rebuilds the graph
  the workers run the adapter's ``prepare`` (CHGNet: bonds, angles, the bond halo plan); on a
  step that reuses it they do not. Until this change CHGNet re-derived its bond graph inside
  every forward, so every step paid that ``prepare`` time; now only rebuild steps do. Reported:
  median step time on reuse steps, median ``prepare`` seconds of the slowest worker on builds
  (the first evaluation and rebuild steps: the per-step cost removed), and their ratio.

    python benchmarks/properties_prepare.py --atoms 1728 5832 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from distmlip.bench.report import markdown_table, write_report
from distmlip.bench.systems import crystal

COLUMNS = (
    "atoms",
    "energy only (s)",
    "energy+forces+stress (s)",
    "ratio",
    "MD step, graph reused (s)",
    "prepare on a build (s)",
    "step + prepare (s)",
    "step / (step + prepare)",
)


def gaas(n_atoms: int, seed: int = 0):
    """Zincblende GaAs with about ``n_atoms`` atoms, rattled by 0.02 Å."""
    return crystal("gaas", n_atoms, rattle=0.02, seed=seed)


def properties(calc, atoms, rounds: int) -> dict:
    times: dict[str, list[float]] = {"energy": [], "energy_forces_stress": []}
    rng = np.random.default_rng(1)
    for _ in range(rounds):
        for name, wanted in (
            ("energy", ["energy"]),
            ("energy_forces_stress", ["energy", "forces", "stress"]),
        ):
            atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
            start = time.perf_counter()
            calc.get_properties(wanted, atoms)
            times[name].append(time.perf_counter() - start)
    energy, full = np.median(times["energy"]), np.median(times["energy_forces_stress"])
    return {
        "energy_only_s": float(energy),
        "energy_forces_stress_s": float(full),
        "ratio": float(energy / full),
        "rounds": rounds,
    }


def md(calc, atoms, steps: int) -> dict:
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.calc = calc
    atoms.get_forces()  # builds and prepares the graphs
    reuse, rebuild_prepare = [], [max(t["prepare"] for t in calc.last_timings)]
    dynamics = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    for _ in range(steps):
        start = time.perf_counter()
        dynamics.run(1)
        elapsed = time.perf_counter() - start
        if calc.last_stats[0]["graph_reused"]:
            reuse.append(elapsed)
        else:
            rebuild_prepare.append(max(t["prepare"] for t in calc.last_timings))
    return {
        "steps": steps,
        "reuse_steps": len(reuse),
        "rebuild_steps": steps - len(reuse),
        "builds_timed": len(rebuild_prepare),
        "reuse_step_s": float(np.median(reuse)) if reuse else None,
        "prepare_s": float(np.median(rebuild_prepare)) if rebuild_prepare else None,
    }


def table_row(row: dict) -> list[str]:
    p, m = row["properties"], row["md"]
    return [
        f"{row['atoms']}",
        f"{p['energy_only_s']:.3f}",
        f"{p['energy_forces_stress_s']:.3f}",
        f"{p['ratio']:.2f}",
        f"{m['reuse_step_s']:.3f}",
        f"{m['prepare_s']:.3f}",
        f"{m.get('step_before_s', float('nan')):.3f}",
        f"{m.get('after_over_before', float('nan')):.2f}",
    ]


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# Properties asked for, and CHGNet's bond graph prepared once per graph build",
        "",
        f"CHGNet 0.3.0, GaAs zincblende, float32, P={args.nprocs}, one thread per worker; "
        f"skin {args.skin} Å for MD. `python benchmarks/properties_prepare.py --atoms "
        f"{' '.join(map(str, args.atoms))} --out {args.out}` (one run).",
        "",
        markdown_table(COLUMNS, [table_row(row) for row in rows]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, nargs="+", default=[1728])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating property rounds")
    parser.add_argument("--steps", type=int, default=12, help="MD steps")
    parser.add_argument("--skin", type=float, default=1.0)
    parser.add_argument("--out", help="directory for properties_prepare.json and .md")
    args = parser.parse_args()

    from distmlip import DistributedCalculator
    from distmlip.models import resolve_model

    model = resolve_model("chgnet")
    rows = []
    for n_atoms in args.atoms:
        options = dict(nprocs=args.nprocs, dtype="float32", threads_per_worker=1, timeout=3600)
        with DistributedCalculator(model, **options) as calc:
            atoms = gaas(n_atoms)
            calc.get_properties(["energy", "forces"], atoms)  # warm-up
            row = {"atoms": len(atoms), "properties": properties(calc, atoms, args.rounds)}
        with DistributedCalculator(model, skin=args.skin, **options) as calc:
            row["md"] = md(calc, gaas(n_atoms, seed=1), args.steps)
        step, prepare = row["md"]["reuse_step_s"], row["md"]["prepare_s"]
        if step and prepare:
            row["md"]["step_before_s"] = step + prepare
            row["md"]["after_over_before"] = step / (step + prepare)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_report(args.out, "properties_prepare", payload=rows, markdown=markdown(rows, args))


if __name__ == "__main__":
    main()
