"""``distmlip md``: molecular dynamics on P workers, written so that it can always be continued.

Every ``--log-every`` steps (and at the last) a frame goes to the trajectory, a row to the thermo
log and the integrator state, with the run's settings, to ``<trajectory>.state.json``, together
and never half (Ctrl-C and SIGTERM are held while they are written). ``--restart FILE``
continues from FILE's last complete frame with its step count, time, settings and integrator
state; ``--steps`` is the step the run ends at, so the interrupted command line with
``--restart FILE`` added finishes the run.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import UsageError, worker_calculator, writable_path
from distmlip.cli.output import json_only_stdout, print_json

__all__ = ["md", "SETTING_DEFAULTS"]

SETTING_DEFAULTS = {
    "ensemble": "nve",
    "thermostat": "langevin",
    "temperature": 300.0,
    "timestep": 1.0,
    "friction": 0.01,
    "tdamp": None,
    "pressure": 0.0,
    "pdamp": None,
}
"""The MD options' defaults for a new run; a restart takes the run's own instead."""

_SETTING_FIELDS = {
    "ensemble": "ensemble",
    "thermostat": "thermostat",
    "temperature": "temperature_K",
    "timestep": "timestep_fs",
    "friction": "friction_per_fs",
    "tdamp": "tdamp_fs",
    "pressure": "pressure_GPa",
    "pdamp": "pdamp_fs",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit): stop like Ctrl-C, frames intact."""


def _settings(args, saved: dict | None):
    """MDSettings from the options given, else the restarted run's, else the defaults."""
    from distmlip.dynamics import MDSettings

    values, changed = {}, []
    for option, field in _SETTING_FIELDS.items():
        given = getattr(args, option)
        if given is not None:
            values[field] = given
            if saved and field in saved and saved[field] != given:
                changed.append(f"--{option} {given} (the run had {saved[field]})")
        elif saved and field in saved:
            values[field] = saved[field]
        else:
            values[field] = SETTING_DEFAULTS[option]
    if changed:
        print("distmlip: note: changed on restart: " + ", ".join(changed), file=sys.stderr)
    try:
        return MDSettings(seed=args.seed, **values)
    except ValueError as error:
        raise UsageError(str(error)) from None


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
    from distmlip.trajectory import state_path, trajectory_format

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


def _start(args, trajectory: Path, log: Path, settings):
    """(atoms with momenta, first step, its time in fs, saved state or None, append?, what)."""
    from distmlip.cli.structures import load_structures
    from distmlip.dynamics import initial_velocities
    from distmlip.trajectory import last_frame, load_state, state_path

    if args.restart is not None:
        restart = Path(args.restart)
        if not restart.is_file():
            raise UsageError(f"no such file {str(restart)!r} to restart from")
        appending = trajectory.exists() and trajectory.resolve() == restart.resolve()
        if not appending:
            _refuse_existing(args, trajectory, log)
        size = restart.stat().st_size
        frame, frames = last_frame(restart, repair=appending)
        if "step" not in frame.info:
            raise ValueError(
                f"{str(restart)!r} has no step numbers (not a distmlip md trajectory); to start "
                "from its last frame's positions and momenta, give it as STRUCTURE with "
                "--keep-velocities"
            )
        if restart.stat().st_size != size:
            print(f"distmlip: note: dropped a torn final frame of {restart}", file=sys.stderr)
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
                f"distmlip: note: continuing {restart}; {', '.join(ignored)} not used",
                file=sys.stderr,
            )
        step = int(frame.info["step"])
        if appending:
            from distmlip.trajectory import truncate_log

            truncate_log(log, step)  # rows after the frame continued from belong to no frame
        state = load_state(restart)
        if state is not None and state.get("step") != step:
            state = None
        atoms = frame.copy()  # positions, momenta, cell; not the stored results
        time_fs = float(frame.info.get("time_fs", np.nan))
        return atoms, step, time_fs, state, appending, f"{restart} (frame {frames}, step {step})"
    _refuse_existing(args, trajectory, log)
    state_path(trajectory).unlink(missing_ok=True)  # --overwrite: the old run's state goes too
    frames, description = load_structures(args, default_index=-1)
    if len(frames) != 1:
        raise UsageError("--index must select one frame to start MD from")
    atoms = frames[0]
    if not args.keep_velocities:
        initial_velocities(atoms, settings.temperature_K, args.seed)
    elif not atoms.has("momenta"):
        raise UsageError("--keep-velocities: STRUCTURE has no velocities (momenta)")
    return atoms, 0, 0.0, None, False, description


def _refuse_existing(args, trajectory: Path, log: Path) -> None:
    from distmlip.trajectory import is_thermo_log

    for path, what in ((trajectory, "--trajectory"), (log, "--log")):
        if path.exists() and not args.overwrite:
            raise UsageError(
                f"{str(path)!r} exists; give --overwrite, another {what}, or --restart "
                f"{str(trajectory)!r} to continue it"
            )
    if log.exists() and log.stat().st_size and not is_thermo_log(log):
        raise UsageError(f"--log {str(log)!r} exists and is not a thermo log; name another")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def stop(number, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def md(args) -> int:
    from distmlip.cli.md_summary import summary, summary_table
    from distmlip.trajectory import load_state

    trajectory, log_path = _paths(args)
    saved = None
    if args.restart is not None:
        saved = (load_state(args.restart) or {}).get("settings")
    settings = _settings(args, saved)
    _check_options(args, settings)
    atoms, first_step, first_time, state, appending, description = _start(
        args, trajectory, log_path, settings
    )
    if not np.isfinite(first_time):
        first_time = first_step * settings.timestep_fs
    if first_step >= args.steps:
        message = f"{description} is at step {first_step} >= --steps {args.steps}: nothing to run"
        print(message, file=sys.stderr if args.json else sys.stdout)
        if args.json:
            print_json({"steps_run": 0, "last_step": first_step, "trajectory": str(trajectory)})
        return 0
    if settings.ensemble == "npt" and not (np.all(atoms.pbc) and atoms.cell.volume > 0):
        raise UsageError("--ensemble npt needs a cell periodic in all three directions")
    started = time.perf_counter()
    with json_only_stdout(args.json), _sigterm_as_interrupt():
        outcome = _run(args, settings, atoms, first_step, first_time, state, appending,
                       trajectory, log_path, description)  # fmt: skip
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
    )
    if args.json:
        print_json(result)
    else:
        print(summary_table(result))
    return 0


def _run(args, settings, atoms, first_step, first_time, state, appending, trajectory, log_path,
         description):  # fmt: skip
    """The MD loop; returns the records, or an exit status after an interruption or failure."""
    from tqdm import tqdm

    from distmlip import WorkerError
    from distmlip.cli.md_summary import progress_line, thermo_row
    from distmlip.dynamics import dynamics_state, make_dynamics, restore_dynamics_state
    from distmlip.trajectory import FrameWriter, ThermoLog, interrupts_deferred, save_state

    step_seconds: list[float] = []
    worker_timings: list[list[dict]] = []
    rows: list[dict] = []
    last_written = first_step if args.restart is not None else None
    warned: list[int] = []
    with contextlib.ExitStack() as stack:
        calc = stack.enter_context(worker_calculator(args, skin=args.skin))
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
        if state is not None:
            restore_dynamics_state(dynamics, state["integrator_state"])
        elif args.restart is not None and settings.ensemble != "nve":
            print(
                f"distmlip: warning: no integrator state for step {first_step} beside "
                f"{args.restart}; the thermostat variables (and Langevin's random stream, from "
                "--seed) start afresh",
                file=sys.stderr,
            )
        writer = stack.enter_context(FrameWriter(trajectory, appending, tuple(args.extras)))
        log = stack.enter_context(ThermoLog(log_path, append=appending))
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
            f"distmlip md: {description}, {len(atoms)} atoms; {settings.describe()}; "
            f"{args.nprocs} workers; steps {first_step} → {args.steps}",
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
                time_fs = first_time + (step - first_step) * settings.timestep_fs
                row = thermo_row(atoms, results, step, time_fs, float(np.mean(since_row)), calc)
                with interrupts_deferred():
                    writer.write(atoms, results, step, time_fs)
                    log.write(**row)
                    save_state(
                        trajectory,
                        {
                            "step": step,
                            "settings": asdict(settings),
                            "integrator_state": dynamics_state(dynamics),
                        },
                    )
                    last_written = step
                rows.append(row)
                since_row = []
                progress.set_postfix(T=f"{row['temperature_K']:.0f} K", refresh=False)
                if progress.disable:
                    print(progress_line(row, args.steps), file=sys.stderr, flush=True)
                clock = time.perf_counter()  # the writes are not a step's time
        except (KeyboardInterrupt, WorkerError, ValueError) as error:  # ValueError: bad atoms
            progress.close()
            kept = (
                f"{trajectory} holds frames up to step {last_written}; continue with "
                f"--restart {trajectory}"
                if last_written is not None
                else f"no frame was written to {trajectory}"
            )
            if isinstance(error, Terminated):
                print(f"distmlip: terminated (SIGTERM); {kept}", file=sys.stderr)
                return 143
            if isinstance(error, KeyboardInterrupt):
                print(f"distmlip: interrupted; {kept}", file=sys.stderr)
                return 130
            first_line = (str(error).strip().splitlines() or [""])[0]
            print(f"distmlip: error: {first_line}; {kept}", file=sys.stderr)
            return 1
        progress.close()
        return rows, step_seconds, worker_timings, calc.graph_builds, calc.graph_reuses
