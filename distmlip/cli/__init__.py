"""The ``distmlip`` command: ``demo``, ``predict``, ``md``, ``relax``, ``estimate`` and ``bench``.

Errors are one line on stderr, ``distmlip: error: …``, with exit status 2 for a command line
that cannot work as written and 1 for a failure while working; Ctrl-C prints one line and exits
with 130. ``DISTMLIP_TRACEBACK=1`` shows the full traceback of failures instead.
"""

from __future__ import annotations

import json
import os
import sys

from distmlip.bench.systems import CRYSTALS
from distmlip.cli.arguments import (
    MODEL_HELP,
    Formatter,
    Parser,
    UsageError,
    finite_float,
    model_argument,
    non_negative_float,
    output_directory,
    positive_float,
    positive_int,
    structure_file,
    timeout_seconds,
)
from distmlip.cli.structures import add_structure_arguments

__all__ = ["main"]

DESCRIPTION = """\
Run pretrained machine-learning interatomic potentials (CHGNet, MACE, ...) with the atom graph
partitioned over P worker processes: same energies, forces and stress as one process, less
memory per worker. "distmlip COMMAND --help" describes each command."""


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
    parser.add_argument(
        "--nprocs",
        type=positive_int,
        help="worker processes P (default: 2; under torchrun or srun, the job's ranks)",
    )
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
        help=MODEL_HELP,
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
        help="energy, forces and stress of a structure, or of every frame of a file",
        description="Evaluate STRUCTURE (every selected frame of a file ASE reads, or a\n"
        "generated crystal, bulk:SYMBOL:CRYSTAL[:A]), or without it a rattled fcc Cu crystal.\n"
        "--json prints one JSON object (energy eV, forces eV/Å, stress eV/Å³ Voigt) and\n"
        "nothing else on standard output.",
        formatter_class=Formatter,
    )
    add_structure_arguments(p, optional=True)
    _model_option(p, "chgnet")
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
    _worker_options(p, dtype="float64", timeout=600.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="distmlip.cli.predict:predict")
    m = commands.add_parser(
        "md",
        help="molecular dynamics (NVE, NVT, NPT), restartable, with a trajectory and a log",
        description="Molecular dynamics of STRUCTURE on P workers with ASE's integrators: NVE\n"
        "(velocity Verlet), NVT (Langevin or Nosé–Hoover chain), NPT (MTK, full cell).\n"
        "Every --log-every steps a frame goes to --trajectory, a row to the log and the\n"
        "integrator state beside the trajectory; --restart FILE continues FILE's last frame\n"
        "(--steps is the step to end at) with the run's model, --dtype and --skin unless\n"
        "given (a new run: --model chgnet, --dtype float32, --skin 1). See docs/md.md.",
        formatter_class=Formatter,
    )
    add_structure_arguments(m, optional=True, index_default="-1")
    _model_option(m, "chgnet")
    restarted = "; with --restart: the run's"
    m.add_argument(
        "--ensemble", choices=["nve", "nvt", "npt"], help=f"ensemble (default: nve{restarted})"
    )
    m.add_argument(
        "--thermostat",
        choices=["langevin", "nose-hoover"],
        help=f"NVT thermostat (default: langevin{restarted})",
    )
    m.add_argument(
        "--temperature",
        type=non_negative_float,
        help="K: initial velocities (Maxwell–Boltzmann from --seed) and thermostat target "
        f"(default: 300{restarted})",
    )
    m.add_argument("--timestep", type=positive_float, help=f"fs (default: 1{restarted})")
    m.add_argument("--steps", type=positive_int, default=1000, help="the step to end at")
    m.add_argument(
        "--friction",
        type=positive_float,
        help=f"Langevin friction, 1/fs (default: 0.01{restarted})",
    )
    m.add_argument(
        "--tdamp",
        type=positive_float,
        help=f"Nosé–Hoover thermostat time, fs (default: 100 steps{restarted})",
    )
    m.add_argument(
        "--pressure", type=finite_float, help=f"NPT external pressure, GPa (default: 0{restarted})"
    )
    m.add_argument(
        "--pdamp",
        type=positive_float,
        help=f"NPT barostat time, fs (default: 1000 steps{restarted})",
    )
    m.add_argument(
        "--trajectory",
        metavar="FILE",
        help=".extxyz/.xyz (extended XYZ) or .traj (ASE) (default: md.extxyz, or the --restart "
        "FILE, appended)",
    )
    m.add_argument("--log", metavar="FILE", help="thermo log (default: the trajectory's .log)")
    m.add_argument(
        "--log-every", type=positive_int, default=10, help="steps between frames and log rows"
    )
    m.add_argument(
        "--extras",
        nargs="+",
        default=[],
        metavar="NAME",
        help="per-atom outputs to store in every frame, e.g. magmoms (CHGNet)",
    )
    m.add_argument("--restart", metavar="FILE", help="continue from FILE's last complete frame")
    m.add_argument("--overwrite", action="store_true", help="replace an existing trajectory")
    m.add_argument(
        "--keep-velocities",
        action="store_true",
        help="start from STRUCTURE's momenta instead of drawing them",
    )
    m.add_argument(
        "--skin",
        type=non_negative_float,
        default=1.0,
        help="Å; graphs are reused until an atom has moved skin/2 (0: rebuild every step)",
    )
    _worker_options(m, dtype="float32", timeout=1800.0)
    m.add_argument("--json", action="store_true", help="print the final summary as JSON")
    # None: not given, so a restart takes the run's own (distmlip.cli.md_restart).
    m.set_defaults(handler="distmlip.cli.md:md", model=None, dtype=None, skin=None)
    r = commands.add_parser(
        "relax",
        help="relax atoms (and optionally the cell) to a force threshold",
        description="Minimise the energy of STRUCTURE with FIRE or BFGS until every force is\n"
        "below --fmax (and, with --cell, every stress component below --smax, through ASE's\n"
        "FrechetCellFilter); writes the relaxed structure to --output.",
        formatter_class=Formatter,
    )
    add_structure_arguments(r, index_default="-1")
    _model_option(r, "chgnet")
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
    _worker_options(r, dtype="float64", timeout=600.0)
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(handler="distmlip.cli.relax:relax")
    e = commands.add_parser(
        "estimate",
        help="predicted peak memory per worker for a structure on P workers",
        description="Predict each worker's peak memory (RSS; GPU memory on cuda) for a structure\n"
        "on --nprocs workers, from a short calibration on smaller structures cut from it\n"
        "(run on --calibration-nprocs workers here). See docs/performance.md, Capacity.",
        formatter_class=Formatter,
    )
    add_structure_arguments(e, index_default="-1")
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
    e.add_argument(
        "--memory-limit",
        type=positive_float,
        metavar="GB",
        help="memory each worker may use: the calibration runs within it (pieces no larger "
        "per worker than the structure's), and the prediction is compared with it",
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
    sys.stderr.write(f"distmlip: error: {message}\n")  # one write: ranks' lines do not mix
    sys.stderr.flush()
    return status


def _one_line(error: BaseException) -> str:
    from distmlip import WorkerError
    from distmlip.cli.structures import ReadError

    lines = str(error).strip().splitlines() or [""]
    if isinstance(error, ValueError | WorkerError | ReadError | OSError):
        return lines[0]
    return f"{type(error).__name__}: {lines[0]} (DISTMLIP_TRACEBACK=1 shows the traceback)"


LAUNCHED_COMMANDS = ("predict", "md", "relax")
"""Commands that run under torchrun/SLURM: one calculator, every rank one of its workers."""


def _launched(args, launch) -> None:
    """Fit the command line to a torchrun/SLURM job: P is the world size; ranks other than 0
    become workers here and exit (they read no input and write nothing)."""
    command = args.handler.split(":")[0].rsplit(".", 1)[-1]
    if command not in LAUNCHED_COMMANDS:
        raise UsageError(
            f"`distmlip {command}` runs in one process; under {launch.source} run "
            f"{', '.join(LAUNCHED_COMMANDS)} (or set DISTMLIP_LAUNCH=local)"
        )
    if args.nprocs is not None and args.nprocs != launch.world_size:
        raise UsageError(
            f"--nprocs {args.nprocs}, but this {launch.source} job has {launch.world_size} "
            "ranks, each one worker: leave --nprocs out"
        )
    args.nprocs = launch.world_size
    if launch.rank > 0:
        from distmlip.cli.arguments import worker_calculator
        from distmlip.cli.md_restart import fill_model_defaults

        fill_model_defaults(args)  # md leaves --model, --dtype, --skin unset when not given
        try:
            worker_calculator(args)  # serves rank 0, then ends with SystemExit
        except SystemExit as ending:
            from distmlip.worker.main import exit_process

            # A serving rank writes no files: no seconds of interpreter shutdown.
            exit_process(ending.code if isinstance(ending.code, int) else 1 if ending.code else 0)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    launch = None
    try:
        from distmlip.cluster.launch import detect_launch

        launch = detect_launch()
        if launch is not None:
            from distmlip.cluster.store import host_store

            host_store(launch)
            if launch.rank > 0:  # rank 0's output alone on stdout, whatever a model prints
                sys.stdout.flush()
                os.dup2(2, 1)
        args = _parser().parse_args(argv)  # imports no torch: a usage error is quick
        if launch is not None:
            _launched(args, launch)
        else:
            _prestart_workers(args)
            if getattr(args, "nprocs", 0) is None:
                args.nprocs = 2
        return _handler(args.handler)(args)
    except UsageError as error:
        return _failed(launch, str(error), 2)
    except KeyboardInterrupt:
        where = f" (rank {launch.rank})" if launch is not None else ""
        sys.stderr.write(f"distmlip: interrupted{where}\n")
        return 130
    except Exception as error:
        if os.environ.get("DISTMLIP_TRACEBACK"):
            raise
        return _failed(launch, _one_line(error), 1)
    finally:
        if "distmlip.driver.zygote" in sys.modules:
            sys.modules["distmlip.driver.zygote"].discard_spares()


POOL_COMMANDS = ("predict", "md", "relax", "demo", "estimate")
"""Commands that start a pool of workers (``bench`` starts its own, one per setting)."""


def _prestart_workers(args) -> None:
    """Have the workers' zygote import torch and the model's package on another core while
    this process imports and loads the model (:func:`distmlip.driver.zygote.prestart`)."""
    command = args.handler.split(":")[0].rsplit(".", 1)[-1]
    if command in POOL_COMMANDS and args.device == "cpu":
        from distmlip.driver.zygote import prestart
        from distmlip.models.registry import worker_modules

        prestart(worker_modules(args.model) if args.model else ())


def _failed(launch, message: str, status: int) -> int:
    """One line on stderr; in a launched job, rank 0's failure also tells the other ranks
    (after the line: it is the job's root cause, and must not be lost in the teardown)."""
    shown = f"rank {launch.rank}: {message}" if launch is not None and launch.rank else message
    _error(shown, status)
    if launch is not None:
        from distmlip.cluster.store import report_failure

        report_failure(launch, message)
    return status
