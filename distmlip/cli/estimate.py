"""``distmlip estimate``: predicted peak memory per worker for a structure, a model and P."""

from __future__ import annotations

import time

from distmlip.cli.arguments import (
    Formatter,
    UsageError,
    positive_float,
    positive_int,
    worker_calculator,
)
from distmlip.cli.common import (
    add_model_option,
    add_worker_options,
)
from distmlip.cli.output import print_json, run_header
from distmlip.cli.structures import add_structure_arguments

__all__ = ["estimate"]


def _size(mb: float) -> str:
    return f"{mb:,.0f} MB" if mb < 10 * 1024 else f"{mb / 1024:,.1f} GB"


def _print(result, args, source: str, seconds: float) -> None:
    from distmlip.environment import machine_mb

    calibration = result.calibration
    print(f"  {source}: {result.n_atoms:,} atoms; model {args.model} ({args.dtype})")
    print(
        f"  predicted peak memory per worker at P={result.nprocs} ({args.partitioner}), "
        "resident (RSS), including each worker's baseline"
    )
    gpu = result.gpu_per_worker_mb
    print("\n  rank    owned     halo       edges   peak RSS" + ("   peak GPU" if gpu else ""))
    for rank, peak in enumerate(result.per_worker_mb):
        row = (
            f"  {rank:>4}  {result.owned_atoms[rank]:>7,}  {result.halo_atoms[rank]:>7,}"
            f"  {result.edges[rank]:>10,}  {_size(peak):>9}"
        )
        print(row + (f"  {_size(gpu[rank]):>9}" if gpu else ""))
    total = sum(result.per_worker_mb)
    machine = machine_mb()
    print(
        f"\n  largest worker {_size(result.peak_mb)}; all {result.nprocs} workers {_size(total)}"
        + (f"; this machine has {_size(machine)}" if machine else "")
    )
    if result.memory_limit_mb is not None:
        verdict = "exceeds" if result.exceeds_limit else "fits within"
        print(
            f"  the largest worker {verdict} --memory-limit {_size(result.memory_limit_mb)}"
            + ("; use more workers or --checkpoint" if result.exceeds_limit else "")
        )
    print(
        f"  calibration: {len(calibration)} structures of {calibration[0]['atoms']:,}–"
        f"{calibration[-1]['atoms']:,} atoms on {args.calibration_nprocs} workers in "
        f"{seconds:.1f} s; fit {result.base_mb:.0f} MB + {result.mb_per_edge * 1024:.2f} KB "
        "per edge"
    )


def estimate(args) -> int:
    from distmlip.cli.structures import load_structures

    frames, source = load_structures(args, default_index=-1)
    if len(frames) != 1:
        raise UsageError(f"--index {args.index} selects {len(frames)} frames; select one")
    atoms = frames[0]
    for name in ("nprocs", "calibration_nprocs"):  # before any worker starts
        value = getattr(args, name)
        if value > len(atoms):
            raise UsageError(
                f"--{name.replace('_', '-')} {value} is larger than the structure's "
                f"{len(atoms)} atoms"
            )
    start = time.perf_counter()
    with worker_calculator(
        args, nprocs=args.calibration_nprocs, memory_limit=args.memory_limit
    ) as calc:
        result = calc.estimate_memory(
            atoms, nprocs=args.nprocs, calibration_atoms=args.calibration_atoms
        )
    seconds = time.perf_counter() - start
    if args.json:
        payload = {
            **run_header(args, source),
            "calibration_nprocs": args.calibration_nprocs,
            "seconds": seconds,
            **result.to_dict(),
        }
        print_json(payload)
    else:
        _print(result, args, source, seconds)
    return 0


def add_parser(commands) -> None:
    """``distmlip estimate``'s arguments."""
    e = commands.add_parser(
        "estimate",
        help="predicted peak memory per worker for a structure on P workers",
        description="Predict each worker's peak memory (RSS; GPU memory on cuda) for a structure\n"
        "on --nprocs workers, from a short calibration on smaller structures cut from it\n"
        "(run on --calibration-nprocs workers here). See docs/performance.md, Capacity.",
        formatter_class=Formatter,
    )
    add_structure_arguments(e, index_default="-1")
    add_model_option(e, "chgnet")
    add_worker_options(e, dtype="float64", timeout=600.0)
    e.add_argument(
        "--calibration-nprocs",
        type=positive_int,
        default=2,
        help="workers that run the calibration calls",
    )
    e.add_argument(
        "--calibration-atoms",
        type=positive_int,
        help="most atoms of a calibration structure (default: half the structure's)",
    )
    e.add_argument(
        "--memory-limit",
        type=positive_float,
        metavar="GB",
        help="memory each worker may use: the calibration runs within it (pieces no larger "
        "per worker than the structure's), and the prediction is compared with it",
    )
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(handler=estimate)
