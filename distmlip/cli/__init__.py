"""The ``distmlip`` command: ``demo``, ``predict``, ``md``, ``relax``, ``estimate`` and ``bench``.

Errors are one line on stderr, ``distmlip: error: …``, with exit status 2 for a command line
that cannot work as written and 1 for a failure while working; Ctrl-C prints one line and exits
with 130. ``DISTMLIP_TRACEBACK=1`` shows the full traceback of failures instead.
"""

from __future__ import annotations

import os
import sys

from distmlip.cli.arguments import Formatter, Parser, UsageError
from distmlip.errors import first_line, stdout_to_stderr

__all__ = ["main"]

DESCRIPTION = """\
Run pretrained machine-learning interatomic potentials (CHGNet, MACE, ...) with the atom graph
partitioned over P worker processes: same energies, forces and stress as one process, less
memory per worker. "distmlip COMMAND --help" describes each command."""


def _parser() -> Parser:
    from distmlip.cli import bench, demo, estimate, md, predict, relax

    parser = Parser(prog="distmlip", description=DESCRIPTION, formatter_class=Formatter)
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    for command in (demo, predict, md, relax, estimate, bench):
        command.add_parser(commands)
    return parser


def _error(message: str, status: int) -> int:
    sys.stderr.write(f"distmlip: error: {message}\n")  # one write: ranks' lines do not mix
    sys.stderr.flush()
    return status


def _one_line(error: BaseException) -> str:
    from distmlip import WorkerError
    from distmlip.cli.structures import ReadError

    line = first_line(error, "")
    if isinstance(error, ValueError | WorkerError | ReadError | OSError):
        return line
    return f"{type(error).__name__}: {line} (DISTMLIP_TRACEBACK=1 shows the traceback)"


LAUNCHED_COMMANDS = ("predict", "md", "relax")
"""Commands that run under torchrun/SLURM: one calculator, every rank one of its workers."""


def _launched(args, launch) -> None:
    """Fit the command line to a torchrun/SLURM job: P is the world size; ranks other than 0
    become workers here and exit (they read no input and write nothing)."""
    command = args.command
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
                stdout_to_stderr()
        args = _parser().parse_args(argv)  # imports no torch: a usage error is quick
        if launch is not None:
            _launched(args, launch)
        else:
            _prestart_workers(args)
            if getattr(args, "nprocs", 0) is None:
                args.nprocs = 2
        return args.handler(args)
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
    command = args.command
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
