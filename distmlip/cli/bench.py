"""``distmlip bench``: time, memory and communication of configurations side by side."""

from __future__ import annotations

from distmlip.bench.systems import CRYSTALS
from distmlip.cli.arguments import (
    Formatter,
    UsageError,
    output_directory,
    positive_float,
    positive_int,
)
from distmlip.cli.common import (
    add_device_options,
    add_model_option,
)
from distmlip.cli.output import print_json


def bench(args) -> int:
    from pathlib import Path

    from distmlip.bench.run import BenchConfig, BenchOptionError, run_bench

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
    try:  # every configuration is checked before the first is measured
        rows = run_bench(config, progress=(lambda _: None) if args.json else print)
    except BenchOptionError as error:
        raise UsageError(str(error)) from None
    if args.json:
        print_json(rows)
    elif args.out:
        print(f"results written to {args.out}")
    return 0


def add_parser(commands) -> None:
    """``distmlip bench``'s arguments."""
    b = commands.add_parser(
        "bench",
        help="time, memory and communication, side by side",
        description="Measure configurations side by side in one run; with --out, write JSON,\n"
        "a markdown table and PNG plots.",
        formatter_class=Formatter,
    )
    add_model_option(b, "reference")
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
    add_device_options(b, dtype="float32")
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
    b.set_defaults(handler=bench)
