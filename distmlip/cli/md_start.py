"""Where an MD run starts: its command line checked, its files, a fresh start or the restart
point of an earlier run."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from distmlip.cli.arguments import (
    UsageError,
    writable_path,
)
from distmlip.cli.md_restart import MODEL_DEFAULTS, RECORD_KEYS, RestartPoint, read_restart

__all__ = [
    "Start",
    "check_options",
    "run_paths",
    "refuse_existing",
    "restart_point",
    "fresh_start",
    "check_launched",
    "warn_lost_state",
]


def check_options(args, settings) -> None:
    npt, langevin = settings.ensemble == "npt", settings.thermostat == "langevin"
    if not npt and (args.pressure is not None or args.pdamp is not None):
        raise UsageError("--pressure and --pdamp apply to --ensemble npt")
    if settings.ensemble != "nvt" and args.thermostat is not None:
        raise UsageError("--thermostat applies to --ensemble nvt (npt uses MTK's Nosé–Hoover)")
    if args.friction is not None and not (settings.ensemble == "nvt" and langevin):
        raise UsageError("--friction applies to the Langevin thermostat (--ensemble nvt)")
    if args.tdamp is not None and (settings.ensemble == "nve" or (not npt and langevin)):
        raise UsageError("--tdamp applies to --thermostat nose-hoover and --ensemble npt")


def run_paths(args) -> tuple[Path, Path]:
    from distmlip.md.trajectory import state_path, trajectory_format

    if args.restart is None and args.structure is None:
        raise UsageError("give STRUCTURE (a file or bulk:SYMBOL:CRYSTAL:A), or --restart FILE")
    default = args.restart if args.restart is not None else "md.extxyz"
    trajectory = Path(args.trajectory if args.trajectory is not None else default)
    for path in (trajectory, args.restart):
        if path is not None:
            try:
                trajectory_format(path)
            except ValueError as error:
                raise UsageError(str(error)) from None
    log = Path(args.log) if args.log else trajectory.with_suffix(".log")
    taken = {trajectory.resolve(): "--trajectory", state_path(trajectory).resolve(): "its state"}
    if args.restart is not None:
        taken.setdefault(Path(args.restart).resolve(), "--restart")
    if log.resolve() in taken:
        raise UsageError(f"--log {str(log)!r} is the same file as {taken[log.resolve()]}")
    for path, option in ((trajectory, "--trajectory"), (log, "--log")):
        writable_path(path, option)
    return trajectory, log


def refuse_existing(args, trajectory: Path, log: Path) -> None:
    from distmlip.md.trajectory import is_thermo_log

    for path, what in ((trajectory, "--trajectory"), (log, "--log")):
        if path.exists() and not args.overwrite:
            raise UsageError(
                f"{str(path)!r} exists; give --overwrite, another {what}, or --restart "
                f"{str(trajectory)!r} to continue it"
            )
    if log.exists() and log.stat().st_size and not is_thermo_log(log):
        raise UsageError(f"--log {str(log)!r} exists and is not a thermo log; name another")


@dataclass
class Start:
    """Where the run starts: atoms with momenta, step, time (fs), the restart point or None,
    whether the trajectory is appended to, and a description for the start-up line."""

    atoms: object
    step: int
    time_fs: float
    point: RestartPoint | None
    appending: bool
    description: str


def restart_point(args, trajectory: Path, log: Path) -> tuple[RestartPoint, bool]:
    """The restarted run's last frame and record; whether ``trajectory`` is its file."""

    restart = Path(args.restart)
    if not restart.is_file():
        raise UsageError(f"no such file {str(restart)!r} to restart from")
    appending = trajectory.exists() and trajectory.resolve() == restart.resolve()
    if not appending:
        refuse_existing(args, trajectory, log)
    point = read_restart(restart, appending)
    ignored = [
        name
        for name, given in (
            ("STRUCTURE", args.structure is not None),
            ("--repeat", bool(args.repeat)),
            ("--rattle", bool(args.rattle)),
            ("--index", args.index is not None),
        )
        if given
    ]
    if ignored:
        print(
            f"distmlip: note: continuing {restart}; {', '.join(ignored)} not used", file=sys.stderr
        )
    return point, appending


def fresh_start(args, trajectory: Path, log: Path, settings) -> Start:
    from distmlip.cli.structures import load_structures
    from distmlip.md.dynamics import initial_velocities
    from distmlip.md.trajectory import state_path

    refuse_existing(args, trajectory, log)
    state_path(trajectory).unlink(missing_ok=True)  # --overwrite: the old run's state goes too
    frames, description = load_structures(args, default_index=-1)
    if len(frames) != 1:
        raise UsageError("--index must select one frame to start MD from")
    atoms = frames[0]
    for key in RECORD_KEYS:
        atoms.info.pop(key, None)  # another run's record, if STRUCTURE is one of its frames
    if not args.keep_velocities:
        initial_velocities(atoms, settings.temperature_K, args.seed)
    elif not atoms.has("momenta"):
        raise UsageError("--keep-velocities: STRUCTURE has no velocities (momenta)")
    return Start(atoms, 0, 0.0, None, False, description)


def check_launched(args, given: set[str]) -> None:
    """Under torchrun/SLURM the other ranks read no input: they take ``--model``, ``--dtype``
    and ``--skin`` from their command line (or the defaults), so a restart that takes others
    from its trajectory needs them on the command line.

    Raises:
        UsageError: naming the options to add.
    """
    from distmlip.cluster.launch import detect_launch

    try:
        launch = detect_launch()
    except ValueError:
        return  # a bad launch environment is reported where the workers start
    if launch is None:
        return
    missing = [
        f"--{option} {getattr(args, option)}"
        for option, default in MODEL_DEFAULTS.items()
        if option not in given and getattr(args, option) != default
    ]
    if missing:
        raise UsageError(
            f"under {launch.source} every rank needs the run's settings on its command line: "
            f"add {' '.join(missing)}"
        )


def warn_lost_state(args, point: RestartPoint, settings) -> None:
    """One line when a restart cannot restore what a thermostat or barostat carries: what is
    lost, and the ensemble that continues (never silently another one)."""
    if point.state is not None:
        return
    where = f"no integrator state for step {point.step} beside {point.path}"
    if not (point.settings and "ensemble" in point.settings) and args.ensemble is None:
        print(
            f"distmlip: warning: {point.path} records no ensemble, and there is {where}: "
            f"continuing as {settings.describe()}; give --ensemble (and its options) as the "
            "run had",
            file=sys.stderr,
        )
        return
    if settings.ensemble == "nve":
        return  # velocity Verlet carries nothing beyond positions and momenta
    if settings.ensemble == "npt":
        lost = "the MTK thermostat and barostat variables (the cell velocity too) restart at zero"
    elif settings.thermostat == "nose-hoover":
        lost = "the Nosé–Hoover chain variables restart at zero"
    else:
        lost = f"Langevin's random stream restarts from --seed {settings.seed}"
    print(
        f"distmlip: warning: {where}: {lost}; the ensemble continues ({settings.describe()})",
        file=sys.stderr,
    )
