"""Command line: ``distmlip predict``.

``distmlip predict`` evaluates one structure (a file ASE can read, or a generated rattled fcc Cu
supercell) with a model on P workers and prints energy, forces, stress and timings as a table,
or as JSON with ``--json``.
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
            f"  {t.get('graph', 0):>7.3f}  {t.get('forward', 0):>9.3f}  {t.get('backward', 0):>10.3f}"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distmlip", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="energy, forces and stress of one structure")
    p.add_argument("--model", default="reference", help="model name (default: reference)")
    p.add_argument("--structure", help="structure file readable by ASE (default: generated Cu)")
    p.add_argument("--size", type=int, default=10, help="Cu supercell repeat (4 atoms each)")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--partitioner", default="slab", choices=["slab", "rcb", "metis"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per call")
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
