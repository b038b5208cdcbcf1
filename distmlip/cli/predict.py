"""``distmlip predict``: energy, forces and stress of the frames of a file, or of a generated
crystal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from distmlip.cli.arguments import (
    Formatter,
    UsageError,
    positive_int,
    structure_file,
    worker_calculator,
)
from distmlip.cli.common import (
    add_model_option,
    add_worker_options,
)
from distmlip.cli.output import FramesDocument, json_only_stdout, print_json, run_header, table
from distmlip.cli.stopping import Terminated, sigterm_as_interrupt, stopped
from distmlip.cli.structures import ReadError, add_structure_arguments, read_frames  # noqa: F401  (re-exported)
from distmlip.errors import first_line

__all__ = ["predict", "read_frames", "ReadError", "GPA_PER_EV_PER_A3"]

GPA_PER_EV_PER_A3 = 160.21766208


def _generated(size: int):
    from distmlip.bench.systems import crystal

    return crystal("cu", repeat=size, rattle=0.05, seed=0)


def _evaluate(atoms, calc, number: int, source: str, several: bool) -> dict:
    """Energy (eV), forces (eV/Å), stress (eV/Å³, and GPa) and timings of frame ``number``."""
    try:
        return _evaluated(atoms, calc)
    except ValueError as error:  # bad atoms: say which frame
        if not several:
            raise
        raise ValueError(f"frame {number} of {source}: {error}") from error


def _evaluated(atoms, calc) -> dict:
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


def _frames(args) -> tuple[list, list[int], str]:
    """The frames to evaluate, their indices in the file (0 for a generated crystal) and a
    description of where they come from."""
    from distmlip.cli.structures import BulkSpec, frame_numbers, load_structures

    if args.structure is not None and args.structure_option is not None:
        raise UsageError("give the structure once: as STRUCTURE or as --structure FILE")
    args.structure = args.structure if args.structure is not None else args.structure_option
    if args.structure is not None:
        if args.size is not None:
            raise UsageError("--size sets the generated Cu crystal; it cannot resize STRUCTURE")
        frames, source = load_structures(args)
        if isinstance(args.structure, BulkSpec):
            return frames, [0], source
        index = slice(None) if args.index is None else args.index
        return frames, frame_numbers(args.structure, index, len(frames)), source
    if args.index is not None:
        raise UsageError("--index selects frames of a STRUCTURE file; give one")
    if args.repeat or args.rattle:
        raise UsageError("--repeat and --rattle apply to STRUCTURE; give one (or use --size)")
    size = 6 if args.size is None else args.size
    return [_generated(size)], [0], f"generated fcc Cu, {size}³ cells"


def _reason(error: BaseException) -> str:
    """Why a streamed run stopped, in one line (the JSON document's ``"reason"``)."""
    if isinstance(error, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(error).__name__}: {first_line(error, '')}"


def predict(args) -> int:
    """Evaluate every selected frame; a table (a row per frame as it completes) or JSON.

    ``--json`` with one frame prints one object after the run. With several frames the
    document is streamed: ``{..., "frames": [`` at once, each frame object as it completes,
    and ``], "interrupted": ...}`` at the end, also on Ctrl-C, SIGTERM or a failure, so that
    standard output always holds a valid document with every frame computed (a 100,000-frame
    run stopped after 350 keeps those 350). JSON lines would need no closing, but the
    documented output, which consumers (``jq .frames``) read, is one document. Frames are
    labelled by their index in the file. Ctrl-C exits 130 (the command line's one line);
    SIGTERM 143, saying how many frames were evaluated.
    """
    frames, numbers, source = _frames(args)
    run = _Run()
    try:
        startup = _run(args, frames, numbers, source, run)
    except Terminated as error:  # SIGTERM: one line and status 143, as md and relax
        kept = f"; {run.document.count} on stdout" if run.document is not None else ""
        return stopped(error, f"{len(run.done)} of {len(frames)} frames evaluated{kept}")
    if len(frames) > 1:
        return 0
    if args.json:
        print_json({**_common(args, source, startup), **run.done[0]})
    else:
        print(f"  {source}; worker start-up {startup:.2f} s")
        _print_frame(run.done[0], args)
    return 0


@dataclass
class _Run:
    """How far a run got: the frames evaluated and the JSON document they stream to."""

    done: list[dict] = field(default_factory=list)
    document: FramesDocument | None = None


def _run(args, frames: list, numbers: list[int], source: str, run: _Run) -> float:
    """Evaluate ``frames`` in turn, each result into ``run.done``; several frames stream (a
    table row or a JSON object each, as it completes). Returns the start-up time, s."""
    start = time.perf_counter()
    streaming = len(frames) > 1
    with json_only_stdout(args.json) as stdout, sigterm_as_interrupt():
        try:
            calc = worker_calculator(args)  # starts the workers
        except BaseException as error:  # stopped or failed before the first frame
            if streaming and args.json:
                header = {**_common(args, source, None), "frames_selected": len(frames)}
                FramesDocument(stdout, header).close(_reason(error))
            raise
        with calc:
            return _frames_run(args, frames, numbers, source, run, stdout, calc, start)


def _frames_run(args, frames, numbers, source, run: _Run, stdout, calc, start: float) -> float:
    """:func:`_run` once the workers are up."""
    streaming = len(frames) > 1
    startup = time.perf_counter() - start
    if streaming and args.json:
        header = {**_common(args, source, startup), "frames_selected": len(frames)}
        run.document = FramesDocument(stdout, header)
    elif streaming:
        print(f"  {source}: {len(frames)} frames; worker start-up {startup:.2f} s\n")
        print("  frame  atoms  energy (eV)        eV/atom      max |F| (eV/Å)  seconds")
    document = run.document
    try:
        for number, atoms in zip(numbers, frames, strict=True):
            result = {"frame": number, **_evaluate(atoms, calc, number, source, streaming)}
            run.done.append(result)
            if document is not None:
                document.add(result)
            elif streaming:
                print(_frame_row(result), flush=True)
    except BaseException as error:
        if document is not None:
            document.close(_reason(error))
        raise
    if document is not None:
        document.close()
    return startup


def _common(args, source: str, startup: float | None) -> dict:
    """The JSON fields that describe the run rather than a frame."""
    return {
        **run_header(args, source),
        "nprocs": args.nprocs,
        "units": {
            "energy": "eV",
            "forces": "eV/Å",
            "stress": "eV/Å³ (Voigt xx yy zz yz xz xy)",
        },
        "startup_s": startup,
    }


def _frame_row(result: dict) -> str:
    return (
        f"  {result['frame']:>5}  {result['atoms']:>5}  {result['energy_eV']:>17.6f}"
        f"  {result['energy_per_atom_eV']:>11.6f}  {result['max_force_eV_per_A']:>14.6f}"
        f"  {result['evaluation_s']:>7.3f}"
    )


def add_parser(commands) -> None:
    """``distmlip predict``'s arguments."""
    p = commands.add_parser(
        "predict",
        help="energy, forces and stress of a structure, or of every frame of a file",
        description="Evaluate STRUCTURE (every selected frame of a file ASE reads, or a\n"
        "generated crystal, bulk:SYMBOL:CRYSTAL[:A]), or without it a rattled fcc Cu crystal.\n"
        "--json prints one JSON object (energy eV, forces eV/Å, stress eV/Å³ Voigt) and\n"
        "nothing else on standard output.",
        formatter_class=Formatter,
    )
    add_structure_arguments(p, optional=True)
    add_model_option(p, "chgnet")
    p.add_argument(
        "--structure",
        dest="structure_option",
        type=structure_file,
        metavar="FILE",
        help="the same as STRUCTURE, for a file",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        help="without STRUCTURE: n×n×n Cu conventional cells of 4 atoms (default 6: 864 atoms)",
    )
    add_worker_options(p, dtype="float64", timeout=600.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=predict)
