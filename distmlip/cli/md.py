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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import (
    Formatter,
    UsageError,
    finite_float,
    non_negative_float,
    positive_float,
    positive_int,
    worker_calculator,
)
from distmlip.cli.common import (
    add_model_option,
    add_skin_option,
    add_worker_options,
)
from distmlip.cli.md_restart import SETTING_DEFAULTS
from distmlip.cli.md_start import (
    Start,
    check_launched,
    check_options,
    fresh_start,
    restart_point,
    run_paths,
    warn_lost_state,
)
from distmlip.cli.output import json_only_stdout, print_json
from distmlip.cli.stopping import sigterm_as_interrupt, stopped
from distmlip.cli.structures import add_structure_arguments
from distmlip.errors import first_line

__all__ = ["md", "SETTING_DEFAULTS"]


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
    from distmlip.cli.md_restart import (
        choose_model,
        md_settings,
        note_changes,
    )
    from distmlip.cli.md_summary import summary, summary_table

    trajectory, log_path = run_paths(args)
    given = {option for option in ("model", "dtype", "skin") if getattr(args, option) is not None}
    point, appending = None, False
    if args.restart is not None:
        point, appending = restart_point(args, trajectory, log_path)
    settings, changed = md_settings(args, point.settings if point else None)
    changed += choose_model(args, point)
    check_options(args, settings)
    check_launched(args, given)
    note_changes(changed)
    if point is not None:
        warn_lost_state(args, point, settings)
        if appending:
            from distmlip.md.trajectory import truncate_log

            truncate_log(log_path, point.step)  # rows after the frame continued from: no frame
        description = f"{point.path} (frame {point.frames}, step {point.step})"
        time_fs = point.time_fs if np.isfinite(point.time_fs) else point.step * settings.timestep_fs
        start = Start(point.frame.copy(), point.step, time_fs, point, appending, description)
    else:
        start = fresh_start(args, trajectory, log_path, settings)
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


def _continuation(args, trajectory: Path, start: Start, last_written: int | None) -> str:
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


def _run(args, settings, start: Start, trajectory: Path, log_path: Path, model_given: bool):
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
                reason = first_line(error, "")
            print(f"distmlip: error: {reason}; {kept}", file=sys.stderr)
            return 1
        progress.close()
        return rows, step_seconds, worker_timings, calc.graph_builds, calc.graph_reuses


def add_parser(commands) -> None:
    """``distmlip md``'s arguments."""
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
    add_model_option(m, "chgnet")
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
    add_skin_option(m)
    add_worker_options(m, dtype="float32", timeout=1800.0)
    m.add_argument("--json", action="store_true", help="print the final summary as JSON")
    # None: not given, so a restart takes the run's own (distmlip.cli.md_restart).
    m.set_defaults(handler=md, model=None, dtype=None, skin=None)
