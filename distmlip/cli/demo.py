"""``distmlip demo``: a short MD run of a generated GaAs crystal with the pretrained CHGNet on P
workers, then a comparison of its first structure with a single-process evaluation."""

from __future__ import annotations

import time

import numpy as np

from distmlip.bench.systems import crystal
from distmlip.cli.arguments import (
    Formatter,
    non_negative_float,
    positive_float,
    positive_int,
    worker_calculator,
)
from distmlip.cli.common import (
    add_model_option,
    add_skin_option,
    add_worker_options,
)
from distmlip.cli.output import print_json, table

__all__ = ["demo"]


def demo(args) -> int:
    from ase import units
    from ase.md.verlet import VelocityVerlet
    from tqdm import tqdm

    from distmlip.md.dynamics import maxwell_boltzmann

    # GaAs: four bonds per atom inside CHGNet's 3 Å bond cutoff keep the angle count (the
    # memory of three-body models) modest; dense oxides have ten times more angles per atom.
    atoms = crystal("gaas", repeat=args.size, rattle=0.02, seed=0)
    maxwell_boltzmann(atoms, args.temperature, np.random.default_rng(0), exact=True)
    start_structure = atoms.copy()
    rows = [
        ("structure", f"{atoms.get_chemical_formula()} zincblende ({len(atoms)} atoms)"),
        ("model", f"{args.model} ({args.dtype})"),
        ("workers", f"{args.nprocs} × {args.device}, partitioner {args.partitioner}"),
    ]
    report: dict = {"atoms": len(atoms), "model": args.model, "nprocs": args.nprocs, "steps": []}
    with worker_calculator(args, skin=args.skin) as calc:
        atoms.calc = calc
        dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
        start = time.perf_counter()
        first = calc.get_properties(["energy", "forces"], atoms)  # one evaluation
        first_energy, first_forces = first["energy"], first["forces"]
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
        ("total energy drift", f"{drift:+.2e} eV from step 1 to step {args.steps}"),
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
        with worker_calculator(args, nprocs=1) as single:
            reference = start_structure.copy()
            reference.calc = single
            start = time.perf_counter()
            computed = single.get_properties(["energy", "forces"], reference)
            single_energy, single_forces = computed["energy"], computed["forces"]
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
        print_json(report)
    else:
        print(table(rows))
    return 0


def add_parser(commands) -> None:
    """``distmlip demo``'s arguments."""
    d = commands.add_parser(
        "demo",
        help="short MD of a 5,832-atom GaAs crystal with the pretrained CHGNet",
        description="Velocity-Verlet MD of a rattled GaAs zincblende crystal on P workers,\n"
        "then a single-process evaluation of the first structure for comparison.",
        formatter_class=Formatter,
    )
    add_model_option(d, "chgnet")
    d.add_argument(
        "--size",
        type=positive_int,
        default=9,
        help="n: n×n×n GaAs conventional cells of 8 atoms (9 = 5,832 atoms)",
    )
    d.add_argument("--steps", type=positive_int, default=5, help="MD steps")
    d.add_argument("--timestep", type=positive_float, default=1.0, help="fs")
    d.add_argument(
        "--temperature", type=non_negative_float, default=300.0, help="initial temperature, K"
    )
    add_skin_option(d)
    add_worker_options(d, dtype="float32", timeout=1800.0)
    d.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the single-process comparison",
    )
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(handler=demo)
