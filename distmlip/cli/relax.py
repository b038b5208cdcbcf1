"""``distmlip relax``: FIRE or BFGS on P workers to a force (and stress) threshold.

The relaxed structure goes to ``--output`` through a temporary file beside it (a full disk
leaves the old file, if any, and no partial one); Ctrl-C or SIGTERM during the relaxation
writes the current structure there the same way and says so (exit status 130 or 143).
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import (
    Formatter,
    UsageError,
    finite_float,
    positive_float,
    positive_int,
    worker_calculator,
    writable_path,
)
from distmlip.cli.common import (
    add_model_option,
    add_worker_options,
)
from distmlip.cli.output import json_only_stdout, print_json, table
from distmlip.cli.predict import GPA_PER_EV_PER_A3
from distmlip.cli.stopping import sigterm_as_interrupt, stopped
from distmlip.cli.structures import add_structure_arguments

__all__ = ["relax", "residuals"]


def residuals(atoms, pressure_GPa: float = 0.0, cell: bool = False) -> tuple[float, float]:
    """(largest atomic force, eV/Å; largest stress component minus the external pressure, GPa).

    The stress residual is 0 when the cell is not relaxed."""
    forces = atoms.get_forces()
    fmax = float(np.linalg.norm(forces, axis=1).max()) if len(forces) else 0.0
    if not cell:
        return fmax, 0.0
    stress = atoms.get_stress() * GPA_PER_EV_PER_A3  # Voigt, GPa; tension positive
    stress[:3] += pressure_GPa  # at equilibrium the stress is -p on the diagonal
    return fmax, float(np.abs(stress).max())


def relax(args) -> int:
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    from distmlip.cli.structures import load_structures

    output = Path(args.output or "relaxed.extxyz")
    for path, option in ((output, "--output"), (args.trajectory, "--trajectory")):
        if path is not None:
            writable_path(path, option)
            if Path(path).exists() and not args.overwrite:
                raise UsageError(f"{str(path)!r} exists; give --overwrite or another name")
    if args.trajectory is not None and Path(args.trajectory).resolve() == output.resolve():
        raise UsageError("--output and --trajectory name the same file")
    try:
        kind = filetype(str(output), read=False)
        if kind not in ioformats or not ioformats[kind].can_write:
            raise UnknownFileTypeError(kind)
    except UnknownFileTypeError:
        raise UsageError(
            f"--output {str(output)!r}: ASE cannot tell the format from the name; use e.g. "
            ".extxyz, .cif, .traj or POSCAR"
        ) from None
    if not args.cell and args.smax is not None:
        raise UsageError("--smax applies with --cell")
    args.smax = 0.1 if args.smax is None else args.smax
    if args.trajectory is not None and Path(args.trajectory).suffix != ".traj":
        raise UsageError("--trajectory: ASE's optimizers write .traj files; name it .traj")
    if not args.cell and args.pressure != 0:
        raise UsageError("--pressure applies with --cell")
    frames, description = load_structures(args, default_index=-1)
    if len(frames) != 1:
        raise UsageError("--index must select one frame to relax")
    atoms = frames[0]
    if args.cell and not (np.all(atoms.pbc) and atoms.cell.volume > 0):
        raise UsageError("--cell needs a periodic cell in all three directions")
    steps, started = 0, False
    try:
        with (
            warnings.catch_warnings(),
            json_only_stdout(args.json),
            sigterm_as_interrupt(),
            worker_calculator(args) as calc,
        ):
            # FrechetCellFilter's matrix logarithm warns at round-off level (errors ~1e-13).
            warnings.filterwarnings("ignore", message="logm result may be inaccurate")
            atoms.calc = calc
            start = time.perf_counter()
            try:
                energy0 = atoms.get_potential_energy()
                evaluated = atoms.copy()  # what an interruption writes: the last evaluated step
                initial = residuals(atoms, args.pressure, args.cell)
                optimizer = _optimizer(atoms, args)
                converged, started = _converged(initial, args), True
                iterator = optimizer.irun(fmax=0.0, steps=args.steps)
                next(iterator)  # the first evaluation, done above and cached
                while not converged and steps < args.steps:
                    try:
                        next(iterator)
                    except StopIteration:
                        break
                    steps += 1
                    evaluated = atoms.copy()
                    current = residuals(atoms, args.pressure, args.cell)
                    converged = _converged(current, args)
                    print(
                        f"step {steps}: E {atoms.get_potential_energy():.6f} eV, "
                        f"max |F| {current[0]:.4f} eV/Å"
                        + (f", max |σ + p| {current[1]:.4f} GPa" if args.cell else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                final = residuals(atoms, args.pressure, args.cell)
                energy = atoms.get_potential_energy()
            except KeyboardInterrupt as interruption:
                if not started:
                    raise
                return _interrupted(interruption, evaluated, output, kind, steps)
            elapsed = time.perf_counter() - start
            relaxed = atoms.copy()
            relaxed.calc = None
    except KeyboardInterrupt as interruption:  # while the workers start, or the first call
        return stopped(interruption, f"before the first step; nothing written to {output}")
    if not _saved(relaxed, output, kind, f"the structure after {steps} steps was not kept"):
        return 1
    result = {
        "source": description,
        "atoms": len(atoms),
        "optimizer": args.optimizer,
        "cell": args.cell,
        "converged": converged,
        "steps": steps,
        "initial_energy_eV": energy0,
        "energy_eV": energy,
        "initial_max_force_eV_per_A": initial[0],
        "max_force_eV_per_A": final[0],
        "max_stress_residual_GPa": final[1] if args.cell else None,
        "volume_A3": float(relaxed.cell.volume),
        "output": str(output),
        "seconds": elapsed,
    }
    if args.json:
        print_json(result)
    else:
        rows = [
            ("structure", f"{description} ({len(atoms)} atoms)"),
            ("optimizer", f"{args.optimizer.upper()}" + (" with the cell" if args.cell else "")),
            ("result", f"{'converged' if converged else 'NOT converged'} in {steps} steps"),
            ("energy", f"{energy0:.6f} → {energy:.6f} eV"),
            ("max |force|", f"{initial[0]:.4f} → {final[0]:.4f} eV/Å (fmax {args.fmax})"),
        ]
        if args.cell:
            rows.append(("max |σ + p|", f"{final[1]:.4f} GPa (smax {args.smax})"))
        rows += [("output", str(output)), ("time", f"{elapsed:.1f} s")]
        print(table(rows))
    if not converged:
        print(
            f"distmlip: error: not converged in {args.steps} steps (max |F| {final[0]:.4f} eV/Å); "
            f"the last structure is in {output}; raise --steps or relax from it",
            file=sys.stderr,
        )
        return 1
    return 0


def _saved(atoms, output: Path, kind: str, lost: str) -> bool:
    """Write ``atoms`` to ``output`` (ASE format ``kind``) through a temporary file beside it;
    on failure (a full disk) one error line ending in ``lost``, and False."""
    from ase.io import write

    from distmlip.md.durable import OutputError, written_atomically

    try:
        with written_atomically(output) as temporary:
            write(str(temporary), atoms, format=kind)
    except OutputError as error:
        print(f"distmlip: error: writing {output}: {error.strerror}; {lost}", file=sys.stderr)
        return False
    return True


def _interrupted(interruption, evaluated, output: Path, kind: str, steps: int) -> int:
    """Ctrl-C or SIGTERM once the relaxation has begun: the structure of the last evaluated
    step (not the one in progress, whose positions the optimizer has moved already) to
    ``output``, one line saying where; the exit status (130, or 143 for SIGTERM)."""
    current = evaluated.copy()
    current.calc = None
    lost = f"interrupted after {steps} steps"
    if not _saved(current, output, kind, lost):
        return 1
    return stopped(
        interruption,
        f"the structure after {steps} steps is in {output}; relax from it to continue",
    )


def _converged(residual: tuple[float, float], args) -> bool:
    return residual[0] < args.fmax and (not args.cell or residual[1] < args.smax)


def _optimizer(atoms, args):
    from ase.optimize import BFGS, FIRE

    target = atoms
    if args.cell:
        from ase.filters import FrechetCellFilter
        from ase.units import GPa

        target = FrechetCellFilter(atoms, scalar_pressure=args.pressure * GPa)
    kind = FIRE if args.optimizer == "fire" else BFGS
    return kind(target, logfile=None, trajectory=args.trajectory)


def add_parser(commands) -> None:
    """``distmlip relax``'s arguments."""
    r = commands.add_parser(
        "relax",
        help="relax atoms (and optionally the cell) to a force threshold",
        description="Minimise the energy of STRUCTURE with FIRE or BFGS until every force is\n"
        "below --fmax (and, with --cell, every stress component below --smax, through ASE's\n"
        "FrechetCellFilter); writes the relaxed structure to --output.",
        formatter_class=Formatter,
    )
    add_structure_arguments(r, index_default="-1")
    add_model_option(r, "chgnet")
    r.add_argument("--optimizer", default="fire", choices=["fire", "bfgs"], help="optimizer")
    r.add_argument("--fmax", type=positive_float, default=0.05, help="force threshold, eV/Å")
    r.add_argument("--cell", action="store_true", help="relax the cell too")
    r.add_argument(
        "--smax", type=positive_float, help="with --cell: stress threshold, GPa (default: 0.1)"
    )
    r.add_argument(
        "--pressure", type=finite_float, default=0.0, help="with --cell: external pressure, GPa"
    )
    r.add_argument("--steps", type=positive_int, default=500, help="most optimizer steps")
    r.add_argument(
        "--output",
        metavar="FILE",
        help="relaxed structure, any format ASE writes (default: relaxed.extxyz)",
    )
    r.add_argument("--trajectory", metavar="FILE", help="every optimizer step (ASE .traj)")
    r.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_worker_options(r, dtype="float64", timeout=600.0)
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(handler=relax)
