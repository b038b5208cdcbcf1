"""``distmlip md``: molecular dynamics on P workers, written so that it can always be continued.

Every ``--log-every`` steps (and at the last) a frame goes to the trajectory, a row to the thermo
log and the integrator state, with the run's settings, to ``<trajectory>.state.json``, together
and never half (Ctrl-C and SIGTERM are held while they are written). ``--restart FILE``
continues from FILE's last complete frame with its step count, time, model, dtype, skin,
settings and integrator state (:mod:`distmlip.cli.md_restart`); ``--steps`` is the step the
run ends at, so the interrupted command line with ``--restart FILE`` added finishes the run.
Ctrl-C, SIGTERM, a failed worker or a failed write (a full disk) end the run with one line
that says what the trajectory holds and the command that continues it.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import UsageError, worker_calculator, writable_path
from distmlip.cli.md_restart import RECORD_KEYS, SETTING_DEFAULTS, RestartPoint
from distmlip.cli.output import json_only_stdout, print_json
from distmlip.cli.stopping import sigterm_as_interrupt, stopped

__all__ = ["md", "SETTING_DEFAULTS"]


def _check_options(args, settings) -> None:
    npt, langevin = settings.ensemble == "npt", settings.thermostat == "langevin"
    if not npt and (args.pressure is not None or args.pdamp is not None):
        raise UsageError("--pressure and --pdamp apply to --ensemble npt")
    if settings.ensemble != "nvt" and args.thermostat is not None:
        raise UsageError("--thermostat applies to --ensemble nvt (npt uses MTK's Nosé–Hoover)")
    if args.friction is not None and not (settings.ensemble == "nvt" and langevin):
        raise UsageError("--friction applies to the Langevin thermostat (--ensemble nvt)")
    if args.tdamp is not None and (settings.ensemble == "nve" or (not npt and langevin)):
        raise UsageError("--tdamp applies to --thermostat nose-hoover and --ensemble npt")


def _paths(args) -> tuple[Path, Path]:
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


def _refuse_existing(args, trajectory: Path, log: Path) -> None:
    from distmlip.md.trajectory import is_thermo_log

    for path, what in ((trajectory, "--trajectory"), (log, "--log")):
        if path.exists() and not args.overwrite:
            raise UsageError(
                f"{str(path)!r} exists; give --overwrite, another {what}, or --restart "
                f"{str(trajectory)!r} to continue it"
            )
    if log.exists() and log.stat().st_size and not is_thermo_log(log):
        raise UsageError(f"--log {str(log)!r} exists and is not a thermo log; name another")


class BlownUp(ValueError):
    """The integration diverged: energies or positions are no longer finite."""


def _check_sane(atoms, results: dict, step: int, settings, warned: list) -> None:
    """Stop a diverged run before it writes nonsense; warn once when it runs very hot."""
    finite = np.isfinite(results["energy"]) and np.all(np.isfinite(atoms.get_momenta()))
    if not finite or not np.all(np.isfinite(atoms.positions)):
        raise BlownUp(
            f"the run diverged at step {step} (non-finite energy or velocities); use a smaller "
            "--timestep"
        )
    hot = 10 * max(settings.temperature_K, 300.0)
    if not warned and atoms.get_temperature() > hot:
        warned.append(step)
        print(
            f"distmlip: warning: {atoms.get_temperature():.3g} K at step {step}, over 10 times "
            f"{max(settings.temperature_K, 300.0):g} K: the time step may be too large",
            file=sys.stderr,
        )


@dataclass
class _Start:
    """Where the run starts: atoms with momenta, step, time (fs), the restart point or None,
    whether the trajectory is appended to, and a description for the start-up line."""

    atoms: object
    step: int
    time_fs: float
    point: RestartPoint | None
    appending: bool
    description: str


def _restart_point(args, trajectory: Path, log: Path) -> tuple[RestartPoint, bool]:
    """The restarted run's last frame and record; whether ``trajectory`` is its file."""
    from distmlip.cli.md_restart import read_restart

    restart = Path(args.restart)
    if not restart.is_file():
        raise UsageError(f"no such file {str(restart)!r} to restart from")
    appending = trajectory.exists() and trajectory.resolve() == restart.resolve()
    if not appending:
        _refuse_existing(args, trajectory, log)
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


def _fresh_start(args, trajectory: Path, log: Path, settings) -> _Start:
    from distmlip.cli.structures import load_structures
    from distmlip.md.dynamics import initial_velocities
    from distmlip.md.trajectory import state_path

    _refuse_existing(args, trajectory, log)
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
    return _Start(atoms, 0, 0.0, None, False, description)


def md(args) -> int:
    from distmlip.cli.md_restart import (
        check_launched,
        choose_model,
        md_settings,
        note_changes,
        warn_lost_state,
    )
    from distmlip.cli.md_summary import summary, summary_table

    trajectory, log_path = _paths(args)
    given = {option for option in ("model", "dtype", "skin") if getattr(args, option) is not None}
    point, appending = None, False
    if args.restart is not None:
        point, appending = _restart_point(args, trajectory, log_path)
    settings, changed = md_settings(args, point.settings if point else None)
    changed += choose_model(args, point)
    _check_options(args, settings)
    check_launched(args, given)
    note_changes(changed)
    if point is not None:
        warn_lost_state(args, point, settings)
        if appending:
            from distmlip.md.trajectory import truncate_log

            truncate_log(log_path, point.step)  # rows after the frame continued from: no frame
        description = f"{point.path} (frame {point.frames}, step {point.step})"
        time_fs = point.time_fs if np.isfinite(point.time_fs) else point.step * settings.timestep_fs
        start = _Start(point.frame.copy(), point.step, time_fs, point, appending, description)
    else:
        start = _fresh_start(args, trajectory, log_path, settings)
    if start.step >= args.steps:
        message = (
            f"{start.description} is at step {start.step} >= --steps {args.steps}: nothing to run"
        )
        print(message, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print_json({"steps_run": 0, "last_step": start.step, "trajectory": str(trajectory)})
        return 0
    atoms = start.atoms
    if settings.ensemble == "npt" and not (np.all(atoms.pbc) and atoms.cell.volume > 0):
        raise UsageError("--ensemble npt needs a cell periodic in all three directions")
    started = time.perf_counter()
    try:
        with json_only_stdout(args.json), sigterm_as_interrupt():
            outcome = _run(args, settings, start, trajectory, log_path, "model" in given)
    except KeyboardInterrupt as interruption:  # before the first step: the workers' start
        return stopped(interruption, "while the workers started; no step was run")
    if isinstance(outcome, int):
        return outcome
    rows, step_seconds, worker_timings, builds, reuses = outcome
    result = summary(rows, step_seconds, worker_timings, time.perf_counter() - started)
    result.update(
        graph_builds=builds,
        graph_reuses=reuses,
        trajectory=str(trajectory),
        log=str(log_path),
        atoms=len(atoms),
        integrator=settings.describe(),
        model=args.model,
        dtype=args.dtype,
    )
    if args.json:
        print_json(result)
    else:
        print(summary_table(result))
    return 0


def _continuation(args, trajectory: Path, start: _Start, last_written: int | None) -> str:
    """What the trajectory holds and the command line that continues the run."""
    where = f"--restart {shlex.quote(str(trajectory))}"
    if last_written is None and start.point is not None:  # a new file: nothing in it yet
        where = (
            f"--restart {shlex.quote(str(start.point.path))} --trajectory "
            f"{shlex.quote(str(trajectory))} --overwrite"
        )
        held = f"no frame was written to {trajectory}"
    elif last_written is None:
        return f"no frame was written to {trajectory}"
    else:
        held = f"{trajectory} holds frames up to step {last_written}"
    log = f" --log {shlex.quote(args.log)}" if args.log else ""
    return f"{held}; continue with: distmlip md {where} --steps {args.steps}{log}"


def _run(args, settings, start: _Start, trajectory: Path, log_path: Path, model_given: bool):
    """The MD loop; returns the records, or an exit status after an interruption or failure."""
    from tqdm import tqdm

    from distmlip import WorkerError
    from distmlip.cli.md_restart import check_weights, frame_record, run_record
    from distmlip.cli.md_summary import progress_line, thermo_row
    from distmlip.md.dynamics import dynamics_state, make_dynamics, restore_dynamics_state
    from distmlip.md.trajectory import (
        FrameWriter,
        OutputError,
        ThermoLog,
        interrupts_deferred,
        save_state,
    )

    atoms, first_step, point = start.atoms, start.step, start.point
    step_seconds: list[float] = []
    worker_timings: list[list[dict]] = []
    rows: list[dict] = []
    last_written = first_step if start.appending else None
    previous = point.state if point is not None else None  # kept while the next is written
    warned: list[int] = []
    with contextlib.ExitStack() as stack:
        calc = stack.enter_context(worker_calculator(args, skin=args.skin))
        run = run_record(args, check_weights(args, calc, point, model_given))
        direct = getattr(calc.model, "direct_forces", False)
        if settings.ensemble == "npt" and direct:
            raise UsageError(f"--ensemble npt needs the stress; {args.model} has none")
        # Per-atom outputs beyond what every frame holds (energies per atom, magmoms, ...).
        per_atom = sorted(
            set(calc.implemented_properties) - {"energy", "free_energy", "forces", "stress"}
        )
        unknown = [name for name in args.extras if name not in per_atom]
        if unknown:
            raise UsageError(
                f"--extras {unknown[0]!r}: the per-atom outputs of {args.model} are "
                + ", ".join(per_atom)
            )
        wanted = ["energy", "forces"] + (["stress"] if atoms.cell.volume > 0 and not direct else [])
        wanted += [name for name in args.extras if name not in wanted]
        atoms.calc = calc
        dynamics = make_dynamics(atoms, settings)
        if point is not None and point.state is not None:
            restore_dynamics_state(dynamics, point.state["integrator_state"])
        info = frame_record(settings, run)
        writer = stack.enter_context(
            FrameWriter(trajectory, start.appending, tuple(args.extras), info)
        )
        log = stack.enter_context(ThermoLog(log_path, append=start.appending))
        progress = stack.enter_context(
            tqdm(
                total=args.steps,
                initial=first_step,
                desc="MD",
                unit="step",
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
                dynamic_ncols=True,
            )  # fmt: skip
        )
        print(
            f"distmlip md: {start.description}, {len(atoms)} atoms; model {args.model} "
            f"({args.dtype}, skin {args.skin:g} Å); {settings.describe()}; {args.nprocs} "
            f"workers; steps {first_step} → {args.steps}",
            file=sys.stderr,
        )
        try:
            steps = dynamics.irun(args.steps - first_step)
            next(steps)  # the first evaluation
            if first_step == 0:
                rows.append(
                    thermo_row(atoms, calc.get_properties(wanted, atoms), 0, 0.0, 0.0, calc)
                )
                log.write(**rows[-1])
            since_row, clock = [], time.perf_counter()
            for step in range(first_step + 1, args.steps + 1):
                next(steps)
                now = time.perf_counter()
                step_seconds.append(now - clock)
                since_row.append(now - clock)
                worker_timings.append(calc.last_timings)
                progress.update(1)
                if step % args.log_every and step != args.steps:
                    clock = time.perf_counter()
                    continue
                results = calc.get_properties(wanted, atoms)
                _check_sane(atoms, results, step, settings, warned)
                time_fs = start.time_fs + (step - first_step) * settings.timestep_fs
                row = thermo_row(atoms, results, step, time_fs, float(np.mean(since_row)), calc)
                state = {
                    "step": step,
                    "settings": asdict(settings),
                    "run": run,
                    "integrator_state": dynamics_state(dynamics),
                }
                # The log row, then the state (with the last frame's), then the frame: a write
                # that fails leaves the last frame and a state for it (a restart drops rows
                # after its frame).
                with interrupts_deferred():
                    log.write(**row)
                    save_state(trajectory, {**state, "previous": previous})
                    writer.write(atoms, results, step, time_fs)
                    last_written, previous = step, state
                rows.append(row)
                since_row = []
                progress.set_postfix(T=f"{row['temperature_K']:.0f} K", refresh=False)
                if progress.disable:
                    print(progress_line(row, args.steps), file=sys.stderr, flush=True)
                clock = time.perf_counter()  # the writes are not a step's time
        except (KeyboardInterrupt, WorkerError, ValueError, OutputError) as error:
            progress.close()  # ValueError: bad atoms; OutputError: a full disk
            kept = _continuation(args, trajectory, start, last_written)
            if isinstance(error, KeyboardInterrupt):
                return stopped(error, kept)
            if isinstance(error, OutputError):
                reason = f"writing {error.filename}: {error.strerror}"
            else:
                reason = (str(error).strip().splitlines() or [""])[0]
            print(f"distmlip: error: {reason}; {kept}", file=sys.stderr)
            return 1
        progress.close()
        return rows, step_seconds, worker_timings, calc.graph_builds, calc.graph_reuses
