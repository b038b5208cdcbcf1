"""``distmlip predict``: energy, forces and stress of the frames of a file, or of a generated
crystal."""

from __future__ import annotations

import time

import numpy as np

from distmlip.cli.arguments import UsageError, worker_calculator
from distmlip.cli.output import json_only_stdout, print_json, table

__all__ = ["predict", "read_frames", "GPA_PER_EV_PER_A3"]

GPA_PER_EV_PER_A3 = 160.21766208


class ReadError(Exception):
    """A structure file that exists but cannot be read as structures."""


def read_frames(path, index) -> list:
    """The frames of ``path`` selected by ``index`` (ASE's syntax), as a list of Atoms."""
    from ase.io import read

    try:
        frames = read(path, index=index)
    except (StopIteration, IndexError) as error:
        raise ReadError(f"{str(path)!r} has no frame at index {index}") from error
    except Exception as error:  # ASE raises many types for truncated or corrupt files
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
        raise ReadError(f"cannot read structures from {str(path)!r} ({reason})") from error
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ReadError(f"cannot read structures from {str(path)!r} (no frames found)")
    return frames


def _generated(size: int):
    from distmlip.systems import crystal

    return crystal("cu", repeat=size, rattle=0.05, seed=0)


def _evaluate(atoms, calc) -> dict:
    atoms.calc = calc
    start = time.perf_counter()
    # A model that predicts forces directly has no stress to report.
    periodic_volume = atoms.cell.volume > 0 and not getattr(calc.model, "direct_forces", False)
    wanted = ["energy", "forces"] + (["stress"] if periodic_volume else [])
    computed = calc.get_properties(wanted, atoms)  # one evaluation for all three
    energy, forces = computed["energy"], computed["forces"]
    stress = computed["stress"] if periodic_volume else None
    elapsed = time.perf_counter() - start
    return {
        "energy": energy,
        "forces": forces,
        "stress": stress,
        "atoms": len(atoms),
        "formula": atoms.get_chemical_formula(),
        "energy_eV": energy,
        "energy_per_atom_eV": energy / len(atoms),
        "max_force_eV_per_A": float(np.linalg.norm(forces, axis=1).max()),
        "stress_GPa": None if stress is None else (stress * GPA_PER_EV_PER_A3).tolist(),
        "evaluation_s": elapsed,
        "workers": [
            {"timings_s": t, **s} for t, s in zip(calc.last_timings, calc.last_stats, strict=True)
        ],
    }


def _print_frame(result: dict, args) -> None:
    energy, n = result["energy_eV"], result["atoms"]
    rows = [
        ("structure", f"{result['formula']} ({n} atoms)"),
        ("model", f"{args.model} ({args.dtype})"),
        ("workers", f"{args.nprocs} × {args.device}, partitioner {args.partitioner}"),
        ("energy", f"{energy:.6f} eV  ({energy / n:.6f} eV/atom)"),
        ("max |force|", f"{result['max_force_eV_per_A']:.6f} eV/Å"),
    ]
    if result["stress_GPa"] is not None:
        voigt = " ".join(f"{value:+.4f}" for value in result["stress_GPa"])
        rows.append(("stress (GPa)", f"[{voigt}]  xx yy zz yz xz xy"))
    rows.append(("evaluation", f"{result['evaluation_s']:.3f} s (energy + forces + stress)"))
    print(table(rows))
    print("\n  rank  owned  halo   edges    graph_s  forward_s  backward_s")
    for rank, worker in enumerate(result["workers"]):
        t = worker["timings_s"]
        print(
            f"  {rank:>4}  {worker['owned_atoms']:>5}  {worker['halo_atoms']:>5}"
            f"  {worker['edges']:>7}  {t.get('graph', 0):>7.3f}  {t.get('forward', 0):>9.3f}"
            f"  {t.get('backward', 0):>10.3f}"
        )


def _frames(args) -> tuple[list, str]:
    from distmlip.cli.structures import load_structures

    if args.structure is not None and args.structure_option is not None:
        raise UsageError("give the structure once: as STRUCTURE or as --structure FILE")
    args.structure = args.structure if args.structure is not None else args.structure_option
    if args.structure is not None:
        if args.size is not None:
            raise UsageError("--size sets the generated Cu crystal; it cannot resize STRUCTURE")
        return load_structures(args)
    if args.index is not None:
        raise UsageError("--index selects frames of a STRUCTURE file; give one")
    if args.repeat or args.rattle:
        raise UsageError("--repeat and --rattle apply to STRUCTURE; give one (or use --size)")
    size = 6 if args.size is None else args.size
    return [_generated(size)], f"generated fcc Cu, {size}³ cells"


def predict(args) -> int:

    frames, source = _frames(args)
    start = time.perf_counter()
    results = []
    # Several frames as a table: a row as soon as each frame is done, so long jobs show progress.
    streaming = not args.json and len(frames) > 1
    with (
        json_only_stdout(args.json),
        worker_calculator(args) as calc,
    ):
        startup = time.perf_counter() - start
        if streaming:
            print(f"  {source}: {len(frames)} frames; worker start-up {startup:.2f} s\n")
            print("  frame  atoms  energy (eV)        eV/atom      max |F| (eV/Å)  seconds")
        for number, atoms in enumerate(frames):
            try:
                results.append({"frame": number, **_evaluate(atoms, calc)})
            except ValueError as error:  # bad atoms: say which frame
                if len(frames) == 1:
                    raise
                raise ValueError(f"frame {number} of {source}: {error}") from error
            if streaming:
                print(_frame_row(results[-1]), flush=True)
    if args.json:
        common = {
            "source": source,
            "model": str(args.model),
            "nprocs": args.nprocs,
            "partitioner": args.partitioner,
            "dtype": args.dtype,
            "units": {
                "energy": "eV",
                "forces": "eV/Å",
                "stress": "eV/Å³ (Voigt xx yy zz yz xz xy)",
            },
            "startup_s": startup,
        }
        payload = {**common, **results[0]} if len(results) == 1 else {**common, "frames": results}
        print_json(payload)
    elif not streaming:
        print(f"  {source}; worker start-up {startup:.2f} s")
        _print_frame(results[0], args)
    return 0


def _frame_row(result: dict) -> str:
    return (
        f"  {result['frame']:>5}  {result['atoms']:>5}  {result['energy_eV']:>17.6f}"
        f"  {result['energy_per_atom_eV']:>11.6f}  {result['max_force_eV_per_A']:>14.6f}"
        f"  {result['evaluation_s']:>7.3f}"
    )
