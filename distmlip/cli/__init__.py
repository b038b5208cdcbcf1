"""The ``distmlip`` command: ``demo``, ``predict``, ``estimate`` and ``bench``.

Errors are one line on stderr, ``distmlip: error: …``, with exit status 2 for a command line
that cannot work as written and 1 for a failure while working; Ctrl-C prints one line and exits
with 130. ``DISTMLIP_TRACEBACK=1`` shows the full traceback of failures instead.
"""

from __future__ import annotations

import json
import os
import sys

from distmlip.cli.arguments import (
    Formatter,
    Parser,
    UsageError,
    frame_index,
    model_argument,
    non_negative_float,
    output_directory,
    positive_float,
    positive_int,
    structure_file,
    timeout_seconds,
)
from distmlip.systems import CRYSTALS

__all__ = ["main"]

DESCRIPTION = """\
Run pretrained machine-learning interatomic potentials (CHGNet, MACE, ...) with the atom graph
partitioned over P worker processes: same energies, forces and stress as one process, less
memory per worker. "distmlip COMMAND --help" describes each command."""


def bench(args) -> int:
    from pathlib import Path

    from distmlip.bench import BenchConfig, run_bench

    config = BenchConfig(
        model=args.model,
        crystal=args.crystal,
        sizes=tuple(args.atoms),
        nprocs=tuple(args.nprocs),
        partitioners=tuple(args.partitioners),
        halos=tuple(args.halo),
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
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


def _device_options(parser, dtype: str) -> None:
    """--device, --backend and --dtype, the same in every command."""
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where workers run"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "nccl", "gloo"],
        help="auto: NCCL on cuda, gloo on cpu; gloo on cuda lets several workers share a GPU "
        "(transfers through host memory, slower)",
    )
    parser.add_argument("--dtype", default=dtype, choices=["float32", "float64"], help="precision")


def _worker_options(parser, dtype: str, timeout: float) -> None:
    """The options of commands that run one calculator: P, partitioner, device, dtype, timeout."""
    parser.add_argument("--nprocs", type=positive_int, default=2, help="worker processes P")
    parser.add_argument(
        "--partitioner",
        default="slab",
        choices=["slab", "rcb", "metis"],
        help="how atoms are split",
    )
    _device_options(parser, dtype)
    parser.add_argument(
        "--checkpoint",
        nargs="?",
        const=True,
        default=False,
        type=positive_int,
        metavar="EDGES",
        help="activation checkpointing: less memory per atom, more time, the same numbers "
        "(optional: edges per chunk, default 32768)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=timeout,
        help="seconds a worker may take per call",
    )


def _model_option(parser, default: str) -> None:
    parser.add_argument(
        "--model",
        type=model_argument,
        default=default,
        help="reference (random weights, for tests), chgnet (pretrained CHGNet 0.3.0, shipped), "
        "chgnet-0.2.0, chgnet-r2scan, or the path of a MACE model file",
    )


def _parser() -> Parser:
    parser = Parser(prog="distmlip", description=DESCRIPTION, formatter_class=Formatter)
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    d = commands.add_parser(
        "demo",
        help="short MD of a 5,832-atom GaAs crystal with the pretrained CHGNet",
        description="Velocity-Verlet MD of a rattled GaAs zincblende crystal on P workers,\n"
        "then a single-process evaluation of the first structure for comparison.",
        formatter_class=Formatter,
    )
    _model_option(d, "chgnet")
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
    d.add_argument(
        "--skin",
        type=non_negative_float,
        default=1.0,
        help="Å; graphs are reused until an atom has moved skin/2 (0: rebuild every step)",
    )
    _worker_options(d, dtype="float32", timeout=1800.0)
    d.add_argument(
        "--no-compare",
        dest="compare",
        action="store_false",
        help="skip the single-process comparison",
    )
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.set_defaults(handler="distmlip.cli.demo:demo")
    p = commands.add_parser(
        "predict",
        help="energy, forces and stress of the structures in a file",
        description="Evaluate every selected frame of a structure file (any format ASE reads),\n"
        "or, without --structure, a generated rattled fcc Cu crystal.",
        formatter_class=Formatter,
    )
    _model_option(p, "chgnet")
    p.add_argument(
        "--structure",
        type=structure_file,
        metavar="FILE",
        help="structure file ASE can read (default: a generated Cu crystal, see --size)",
    )
    p.add_argument(
        "--index",
        type=frame_index,
        help="frames of --structure to evaluate, ASE syntax: 0, -1, 2:10, ':' (default: all)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=6,
        help="without --structure: n×n×n Cu conventional cells of 4 atoms (6 = 864 atoms)",
    )
    _worker_options(p, dtype="float64", timeout=600.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="distmlip.cli.predict:predict")
    e = commands.add_parser(
        "estimate",
        help="predicted peak memory per worker for a structure on P workers",
        description="Predict each worker's peak memory (RSS; GPU memory on cuda) for a structure\n"
        "on --nprocs workers, from a short calibration on smaller structures cut from it\n"
        "(run on --calibration-nprocs workers here). See docs/performance.md, Capacity.",
        formatter_class=Formatter,
    )
    e.add_argument("structure", type=structure_file, metavar="STRUCTURE", help="file ASE reads")
    e.add_argument("--index", type=frame_index, help="frame of STRUCTURE (default: the last)")
    _model_option(e, "chgnet")
    _worker_options(e, dtype="float64", timeout=600.0)
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
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(handler="distmlip.cli.estimate:estimate")
    b = commands.add_parser(
        "bench",
        help="time, memory and communication, side by side",
        description="Measure configurations side by side in one run; with --out, write JSON,\n"
        "a markdown table and PNG plots.",
        formatter_class=Formatter,
    )
    _model_option(b, "reference")
    b.add_argument("--crystal", default="cu", choices=sorted(CRYSTALS), help="generated crystal")
    b.add_argument(
        "--atoms",
        type=positive_int,
        nargs="+",
        default=[1000, 4000],
        help="approximate atom counts of the generated crystals",
    )
    b.add_argument("--nprocs", type=positive_int, nargs="+", default=[1, 2], help="values of P")
    b.add_argument(
        "--partitioners",
        nargs="+",
        default=["slab"],
        choices=["slab", "rcb", "metis"],
        help="partitioners to compare",
    )
    b.add_argument(
        "--halo",
        nargs="+",
        default=["exchange"],
        choices=["exchange", "ghost"],
        help="exchange: zero redundancy; ghost: the recomputing baseline",
    )
    _device_options(b, dtype="float32")
    b.add_argument(
        "--total-threads", type=positive_int, default=2, help="torch threads per configuration"
    )
    b.add_argument(
        "--repeats", type=positive_int, default=2, help="calls per configuration (fastest kept)"
    )
    b.add_argument(
        "--memory-budget-gb",
        type=positive_float,
        default=20.0,
        help="memory per worker assumed by the capacity estimate",
    )
    b.add_argument(
        "--out", type=output_directory, metavar="DIR", help="directory for JSON, markdown and PNG"
    )
    b.add_argument("--json", action="store_true", help="print JSON rows")
    b.set_defaults(handler="distmlip.cli:bench")
    return parser


def _handler(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _error(message: str, status: int) -> int:
    print(f"distmlip: error: {message}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    from distmlip import WorkerError
    from distmlip.cli.predict import ReadError

    lines = str(error).strip().splitlines() or [""]
    if isinstance(error, ValueError | WorkerError | ReadError | OSError):
        return lines[0]
    return f"{type(error).__name__}: {lines[0]} (DISTMLIP_TRACEBACK=1 shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        return _handler(args.handler)(args)
    except UsageError as error:
        return _error(str(error), 2)
    except KeyboardInterrupt:
        print("distmlip: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("DISTMLIP_TRACEBACK"):
            raise
        return _error(_one_line(error), 1)
