"""Command line: ``distmlip demo``, ``distmlip predict`` and ``distmlip bench``.

``distmlip demo`` runs a short molecular-dynamics trajectory of a generated GaAs zincblende
supercell (5,832 atoms by default) with the pretrained CHGNet on P workers, then compares the
first structure with a single-process evaluation. ``distmlip predict`` evaluates one structure
(a file ASE can read, or a generated rattled fcc Cu supercell) and prints energy, forces, stress
and timings as a table, or as JSON with ``--json``. ``distmlip bench`` measures time, memory,
sizes and communication of several configurations side by side (see :mod:`distmlip.bench`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["main"]

GPA_PER_EV_PER_A3 = 160.21766208


def _structure(args):
    from ase.build import bulk

    if args.structure:
        from ase.io import read

        return read(args.structure)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(args.size)
    atoms.rattle(0.05, seed=0)
    return atoms


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def predict(args) -> int:
    from distmlip import DistributedCalculator

    atoms = _structure(args)
    start = time.perf_counter()
    with DistributedCalculator(
        args.model,
        nprocs=args.nprocs,
        partitioner=args.partitioner,
        device=args.device,
        dtype=args.dtype,
        timeout=args.timeout,
    ) as calc:
        startup = time.perf_counter() - start
        atoms.calc = calc
        start = time.perf_counter()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress() if atoms.cell.volume > 0 else None
        elapsed = time.perf_counter() - start
        timings, stats = calc.last_timings, calc.last_stats
    result = {
        "atoms": len(atoms),
        "formula": atoms.get_chemical_formula(),
        "model": str(args.model),
        "nprocs": args.nprocs,
        "partitioner": args.partitioner,
        "dtype": args.dtype,
        "energy_eV": energy,
        "energy_per_atom_eV": energy / len(atoms),
        "max_force_eV_per_A": float(np.linalg.norm(forces, axis=1).max()),
        "stress_GPa": None if stress is None else (stress * GPA_PER_EV_PER_A3).tolist(),
        "startup_s": startup,
        "evaluation_s": elapsed,
        "workers": [{"timings_s": t, **s} for t, s in zip(timings, stats, strict=True)],
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    rows = [
        ("structure", f"{result['formula']} ({result['atoms']} atoms)"),
        ("model", f"{result['model']} ({args.dtype})"),
        ("workers", f"{args.nprocs} × {args.device}, partitioner {args.partitioner}"),
        ("energy", f"{energy:.6f} eV  ({energy / len(atoms):.6f} eV/atom)"),
        ("max |force|", f"{result['max_force_eV_per_A']:.6f} eV/Å"),
    ]
    if stress is not None:
        voigt = " ".join(f"{value:+.4f}" for value in result["stress_GPa"])
        rows.append(("stress (GPa)", f"[{voigt}]  xx yy zz yz xz xy"))
    rows += [
        ("worker start-up", f"{startup:.2f} s"),
        ("evaluation", f"{elapsed:.3f} s (energy + forces + stress)"),
    ]
    print(_table(rows))
    print("\n  rank  owned  halo   edges    graph_s  forward_s  backward_s")
    for rank, (t, s) in enumerate(zip(timings, stats, strict=True)):
        print(
            f"  {rank:>4}  {s['owned_atoms']:>5}  {s['halo_atoms']:>5}  {s['edges']:>7}"
            f"  {t.get('graph', 0):>7.3f}  {t.get('forward', 0):>9.3f}"
            f"  {t.get('backward', 0):>10.3f}"
        )
    return 0


def zincblende(size: int, a: float = 5.653):
    """GaAs zincblende, ``size``³ conventional cells of 8 atoms.

    Four bonds per atom inside CHGNet's 3 Å bond cutoff keep the angle count (the memory of
    three-body models) modest; dense oxides have ten times more angles per atom.
    """
    from ase.build import bulk

    return bulk("GaAs", "zincblende", a=a, cubic=True).repeat(size)


def demo(args) -> int:
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    from distmlip import DistributedCalculator

    atoms = zincblende(args.size)
    atoms.rattle(0.02, seed=0)
    MaxwellBoltzmannDistribution(
        atoms, temperature_K=args.temperature, rng=np.random.default_rng(0), force_temp=True
    )
    start_structure = atoms.copy()
    settings = dict(device=args.device, dtype=args.dtype, timeout=args.timeout)
    rows = [
        ("structure", f"{atoms.get_chemical_formula()} zincblende ({len(atoms)} atoms)"),
        ("model", f"{args.model} ({args.dtype})"),
        ("workers", f"{args.nprocs} × {args.device}, partitioner {args.partitioner}"),
    ]
    report: dict = {"atoms": len(atoms), "model": args.model, "nprocs": args.nprocs, "steps": []}
    with DistributedCalculator(
        args.model, nprocs=args.nprocs, partitioner=args.partitioner, skin=args.skin, **settings
    ) as calc:
        atoms.calc = calc
        dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
        start = time.perf_counter()
        first_energy = atoms.get_potential_energy()
        first_forces = atoms.get_forces()
        first_time = time.perf_counter() - start
        worker_memory = [s["peak_rss_mb"] for s in calc.last_stats]
        progress = tqdm(range(args.steps), desc="MD", unit="step", disable=args.json)
        for step in progress:
            start = time.perf_counter()
            dynamics.run(1)
            elapsed = time.perf_counter() - start
            energy = atoms.get_potential_energy()
            temperature = atoms.get_temperature()
            total = energy + atoms.get_kinetic_energy()
            report["steps"].append(
                {
                    "step": step + 1,
                    "time_s": elapsed,
                    "energy_eV": energy,
                    "total_energy_eV": total,
                    "temperature_K": temperature,
                }
            )
            progress.set_postfix(T=f"{temperature:.0f} K", E=f"{energy:.2f} eV", s=f"{elapsed:.1f}")
        worker_memory = [
            max(a, s["peak_rss_mb"]) for a, s in zip(worker_memory, calc.last_stats, strict=True)
        ]
        graphs = (calc.graph_builds, calc.graph_reuses)
    step_times = [s["time_s"] for s in report["steps"]]
    drift = report["steps"][-1]["total_energy_eV"] - report["steps"][0]["total_energy_eV"]
    rows += [
        ("first evaluation", f"{first_time:.2f} s, E = {first_energy:.4f} eV"),
        ("MD", f"{args.steps} steps of {args.timestep} fs, velocity Verlet, {args.temperature} K"),
        ("time per step", f"{np.mean(step_times):.2f} s (min {np.min(step_times):.2f} s)"),
        ("graphs", f"{graphs[0]} built, {graphs[1]} reused (skin {args.skin} Å)"),
        ("final temperature", f"{report['steps'][-1]['temperature_K']:.1f} K"),
        ("total energy drift", f"{drift:+.2e} eV over {args.steps - 1} steps"),
        ("peak memory / worker", " ".join(f"{m:.0f}" for m in worker_memory) + " MB"),
    ]
    report.update(
        first_energy_eV=first_energy,
        first_evaluation_s=first_time,
        worker_peak_rss_mb=worker_memory,
        graph_builds=graphs[0],
        graph_reuses=graphs[1],
    )
    if args.compare:
        with DistributedCalculator(args.model, nprocs=1, **settings) as single:
            reference = start_structure.copy()
            reference.calc = single
            start = time.perf_counter()
            single_energy = reference.get_potential_energy()
            single_forces = reference.get_forces()
            single_time = time.perf_counter() - start
            single_memory = single.last_stats[0]["peak_rss_mb"]
        delta_e = abs(first_energy - single_energy) / len(atoms)
        delta_f = float(np.abs(first_forces - single_forces).max())
        rows += [
            (
                "single process",
                f"{single_time:.2f} s, E = {single_energy:.4f} eV, "
                f"peak memory {single_memory:.0f} MB",
            ),
            (
                "distributed vs single",
                f"|ΔE| {delta_e:.1e} eV/atom, max |ΔF| {delta_f:.1e} eV/Å, "
                f"time ×{first_time / single_time:.2f}, "
                f"memory/worker ×{max(worker_memory) / single_memory:.2f}",
            ),
        ]
        report.update(
            single_energy_eV=single_energy,
            single_evaluation_s=single_time,
            single_peak_rss_mb=single_memory,
            energy_diff_eV_per_atom=delta_e,
            max_force_diff_eV_per_A=delta_f,
        )
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(_table(rows))
    return 0


def bench(args) -> int:
    from pathlib import Path

    from distmlip.bench import BenchConfig, run_bench

    config = BenchConfig(
        model=args.model,
        structure=args.structure,
        sizes=tuple(args.sizes),
        nprocs=tuple(args.nprocs),
        partitioners=tuple(args.partitioners),
        halos=tuple(args.halo),
        dtype=args.dtype,
        device=args.device,
        total_threads=args.total_threads,
        repeats=args.repeats,
        memory_budget_gb=args.memory_budget_gb,
        out=Path(args.out) if args.out else None,
    )
    rows = run_bench(config, progress=(lambda _: None) if args.json else print)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif args.out:
        print(f"results written to {args.out}")
    return 0


def _worker_options(parser, dtype: str, timeout: float) -> None:
    """The options of commands that run one calculator: P, partitioner, device, dtype, timeout."""
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--partitioner", default="slab", choices=["slab", "rcb", "metis"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=dtype, choices=["float32", "float64"])
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per call")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distmlip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="short MD of a 5,832-atom GaAs crystal with CHGNet")
    d.add_argument("--model", default="chgnet", help="model name (default: chgnet)")
    d.add_argument("--size", type=int, default=9, help="GaAs repeat (8 atoms each)")
    d.add_argument("--steps", type=int, default=5, help="MD steps")
    d.add_argument("--timestep", type=float, default=1.0, help="fs")
    d.add_argument("--temperature", type=float, default=300.0, help="initial K")
    d.add_argument(
        "--skin", type=float, default=1.0, help="Å; reuse graphs until atoms move skin/2"
    )
    _worker_options(d, dtype="float32", timeout=1800.0)
    d.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the single-process comparison",
    )
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(handler=demo)
    b = commands.add_parser("bench", help="time, memory and communication, side by side")
    b.add_argument("--model", default="reference")
    b.add_argument("--structure", default="cu", choices=["cu", "si", "gaas"])
    b.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    b.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    b.add_argument("--partitioners", nargs="+", default=["slab"])
    b.add_argument("--halo", nargs="+", default=["exchange"], choices=["exchange", "ghost"])
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--total-threads", type=int, default=2, help="torch threads per config")
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--memory-budget-gb", type=float, default=20.0, help="for capacity")
    b.add_argument("--out", help="directory for JSON, markdown and PNG")
    b.add_argument("--json", action="store_true", help="print JSON rows")
    b.set_defaults(handler=bench)
    p = commands.add_parser("predict", help="energy, forces and stress of one structure")
    p.add_argument("--model", default="reference", help="model name (default: reference)")
    p.add_argument("--structure", help="structure file readable by ASE (default: generated Cu)")
    p.add_argument("--size", type=int, default=10, help="Cu supercell repeat (4 atoms each)")
    _worker_options(p, dtype="float64", timeout=600.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, RuntimeError) as error:
        print(f"distmlip: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
