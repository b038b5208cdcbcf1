"""``distmlip md``: molecular dynamics on P workers, written so that it can always be continued.

Every ``--log-every`` steps (and at the last) a frame goes to the trajectory, a row to the thermo
log and the integrator state to ``<trajectory>.state.json``, together and never half (Ctrl-C is
held while they are written). ``--restart FILE`` continues from FILE's last complete frame with
its step count and integrator state; ``--steps`` is the step the run ends at, so the same command
line with ``--restart`` added finishes an interrupted run.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import UsageError
from distmlip.cli.output import json_only_stdout, print_json, table

__all__ = ["md", "step_breakdown"]

GPA_PER_EV_PER_A3 = 160.21766208


def _settings(args):
    from distmlip.dynamics import MDSettings

    try:
        return MDSettings(
            ensemble=args.ensemble,
            timestep_fs=args.timestep,
            temperature_K=args.temperature,
            thermostat=args.thermostat,
            friction_per_fs=0.01 if args.friction is None else args.friction,
            tdamp_fs=args.tdamp,
            pressure_GPa=args.pressure,
            pdamp_fs=args.pdamp,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_options(args) -> None:
    from distmlip.trajectory import trajectory_format

    if args.ensemble != "npt" and (args.pressure != 0 or args.pdamp is not None):
        raise UsageError("--pressure and --pdamp apply to --ensemble npt")
    if args.ensemble != "nvt" and args.thermostat != "langevin":
        raise UsageError("--thermostat applies to --ensemble nvt (npt uses MTK's Nosé–Hoover)")
    langevin = args.ensemble == "nvt" and args.thermostat == "langevin"
    if args.friction is not None and not langevin:
        raise UsageError("--friction applies to the Langevin thermostat (--ensemble nvt)")
    if args.tdamp is not None and (args.ensemble == "nve" or langevin):
        raise UsageError("--tdamp applies to --thermostat nose-hoover and --ensemble npt")
    for path in (args.trajectory, args.restart):
        if path is not None:
            try:
                trajectory_format(path)
            except ValueError as error:
                raise UsageError(str(error)) from None
    if args.restart is None and args.structure is None:
        raise UsageError("give STRUCTURE (a file or bulk:SYMBOL:CRYSTAL:A), or --restart FILE")
    if args.restart is not None and args.structure is not None:
        raise UsageError("--restart continues FILE's last frame; leave out STRUCTURE")
    if args.restart is not None and (args.repeat or args.rattle or args.index is not None):
        raise UsageError("--repeat, --rattle and --index apply to STRUCTURE, not to --restart")


def _start(args):
    """(atoms with momenta, first step, saved integrator state or None, append?, description)."""
    from distmlip.cli.structures import load_structures
    from distmlip.dynamics import initial_velocities
    from distmlip.trajectory import last_frame, load_state

    trajectory = Path(args.trajectory)
    if args.restart is not None:
        restart = Path(args.restart)
        if not restart.is_file():
            raise UsageError(f"no such file {str(restart)!r} to restart from")
        frame, frames = last_frame(restart)
        if "step" not in frame.info:
            raise ValueError(
                f"{str(restart)!r} has no step numbers; restart from a distmlip md trajectory"
            )
        step = int(frame.info["step"])
        atoms = frame.copy()  # positions, momenta, cell; not the stored results
        state = load_state(restart)
        if state is not None and state.get("step") != step:
            state = None
        appending = trajectory.exists() and trajectory.resolve() == restart.resolve()
        if not appending and trajectory.exists() and not args.overwrite:
            raise UsageError(f"{str(trajectory)!r} exists; give --overwrite or another name")
        return atoms, step, state, appending, f"{restart} (frame {frames}, step {step})"
    if trajectory.exists() and not args.overwrite:
        raise UsageError(
            f"{str(trajectory)!r} exists; give --overwrite, another --trajectory, or --restart "
            f"{str(trajectory)!r} to continue it"
        )
    frames, description = load_structures(args, default_index=-1)
    if len(frames) != 1:
        raise UsageError("--index must select one frame to start MD from")
    atoms = frames[0]
    if not args.keep_velocities:
        initial_velocities(atoms, args.temperature, args.seed)
    elif not atoms.has("momenta"):
        raise UsageError("--keep-velocities: STRUCTURE has no velocities (momenta)")
    return atoms, 0, None, False, description


def step_breakdown(step_seconds: list[float], worker_timings: list[list[dict]]) -> dict:
    """Where the step time went: model, worker graph work, waiting on exchanges, the rest.

    Args:
        step_seconds: wall time of each step (driver), s.
        worker_timings: per step, every worker's ``last_timings``.

    Returns shares of the total step time (model includes its communication; ``outside_model``
    = 1 − model: graph, partition, transfers, integrator, assembly)."""
    total = sum(step_seconds)
    model = graph = communication = 0.0
    for timings in worker_timings:
        worker = max(timings, key=lambda t: sum(t.values()))  # the critical worker
        model += worker.get("forward", 0) + worker.get("backward", 0) + worker.get("forces", 0)
        graph += sum(worker.get(k, 0) for k in ("partition", "prepare", "graph", "inputs"))
        communication += worker.get("communication", 0)
    if total <= 0:
        return {"model": 0.0, "graph": 0.0, "communication": 0.0, "outside_model": 0.0}
    return {
        "model": model / total,
        "graph": graph / total,
        "communication": communication / total,
        "outside_model": 1 - model / total,
    }


def _thermo(atoms, results: dict, step: int, settings, seconds: float, calc) -> dict:
    periodic = atoms.cell.volume > 0 and "stress" in results
    pressure = float("nan")
    if periodic:
        kinetic = atoms.get_momenta()
        ideal = (kinetic.T @ (kinetic / atoms.get_masses()[:, None])) / atoms.cell.volume
        stress = -np.trace(ideal) / 3 + np.mean(results["stress"][:3])  # eV/Å³, tension > 0
        pressure = -stress * GPA_PER_EV_PER_A3
    edges = [s["edges"] for s in calc.last_stats] if calc.last_stats else [0]
    kinetic_energy = float(atoms.get_kinetic_energy())
    return {
        "step": step,
        "time_fs": step * settings.timestep_fs,
        "epot_eV": float(results["energy"]),
        "ekin_eV": kinetic_energy,
        "etotal_eV": float(results["energy"]) + kinetic_energy,
        "temperature_K": float(atoms.get_temperature()) if len(atoms) else 0.0,
        "pressure_GPa": pressure,
        "volume_A3": float(atoms.cell.volume),
        "seconds_per_step": seconds,
        "graph_builds": calc.graph_builds,
        "imbalance": max(edges) / np.mean(edges) if np.mean(edges) > 0 else 1.0,
    }


def _progress(args, first: int):
    from tqdm import tqdm

    return tqdm(
        total=args.steps,
        initial=first,
        desc="MD",
        unit="step",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def md(args) -> int:
    from distmlip import DistributedCalculator, WorkerError
    from distmlip.dynamics import dynamics_state, make_dynamics, restore_dynamics_state
    from distmlip.trajectory import FrameWriter, ThermoLog, interrupts_deferred, save_state

    _check_options(args)
    settings = _settings(args)
    atoms, first_step, state, appending, description = _start(args)
    trajectory = Path(args.trajectory)
    log_path = Path(args.log) if args.log else trajectory.with_suffix(".log")
    if first_step >= args.steps:
        print(f"{description} is at step {first_step} >= --steps {args.steps}: nothing to run")
        return 0
    wanted = ["energy", "forces"] + (["stress"] if atoms.cell.volume > 0 else [])
    step_seconds: list[float] = []
    worker_timings: list[list[dict]] = []
    last_written = first_step if args.restart else None
    rows: list[dict] = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(json_only_stdout(args.json))
        calc = stack.enter_context(
            DistributedCalculator(
                args.model,
                nprocs=args.nprocs,
                partitioner=args.partitioner,
                device=args.device,
                backend=args.backend,
                dtype=args.dtype,
                timeout=args.timeout,
                skin=args.skin,
                checkpoint=args.checkpoint,
            )
        )
        unknown = [name for name in args.extras if name not in calc.implemented_properties]
        if unknown:
            extra = sorted(set(calc.implemented_properties) - {"energy", "free_energy", "forces"})
            raise UsageError(f"--extras {unknown[0]!r}: {args.model} has {', '.join(extra)}")
        atoms.calc = calc
        dynamics = make_dynamics(atoms, settings)
        if state is not None:
            restore_dynamics_state(dynamics, state["integrator_state"])
        elif args.restart is not None and args.ensemble != "nve":
            print(
                f"distmlip: warning: no integrator state for step {first_step} beside "
                f"{args.restart}; the thermostat variables start from zero",
                file=sys.stderr,
            )
        writer = stack.enter_context(FrameWriter(trajectory, appending, tuple(args.extras)))
        log = stack.enter_context(ThermoLog(log_path, append=appending))
        progress = stack.enter_context(_progress(args, first_step))
        print(
            f"distmlip md: {description}, {len(atoms)} atoms; {settings.describe()}; "
            f"{args.nprocs} workers; steps {first_step} → {args.steps}",
            file=sys.stderr,
        )
        try:
            steps = dynamics.irun(args.steps - first_step)
            next(steps)  # the first evaluation
            results = calc.get_properties(wanted, atoms)
            if first_step == 0:
                rows.append(_thermo(atoms, results, 0, settings, 0.0, calc))
                log.write(**rows[-1])
            since_row, clock = [], time.perf_counter()
            for step in range(first_step + 1, args.steps + 1):
                next(steps)
                now = time.perf_counter()
                step_seconds.append(now - clock)
                since_row.append(now - clock)
                worker_timings.append(calc.last_timings)
                clock = now
                progress.update(1)
                if step % args.log_every and step != args.steps:
                    continue
                results = calc.get_properties(wanted, atoms)
                row = _thermo(atoms, results, step, settings, float(np.mean(since_row)), calc)
                with interrupts_deferred():
                    writer.write(atoms, results, step, row["time_fs"])
                    save_state(
                        trajectory,
                        {"step": step, "integrator_state": dynamics_state(dynamics)},
                    )
                    log.write(**row)
                rows.append(row)
                last_written, since_row = step, []
                progress.set_postfix(T=f"{row['temperature_K']:.0f} K", refresh=False)
                if progress.disable:
                    print(_line(row, args.steps), file=sys.stderr, flush=True)
        except (KeyboardInterrupt, WorkerError, StopIteration) as error:
            progress.close()
            kept = (
                f"{trajectory} holds frames up to step {last_written}; continue with "
                f"--restart {trajectory}"
                if last_written is not None
                else f"no frame was written to {trajectory}"
            )
            if isinstance(error, KeyboardInterrupt):
                print(f"distmlip: interrupted; {kept}", file=sys.stderr)
                return 130
            if isinstance(error, StopIteration):
                raise RuntimeError(f"the integrator stopped early; {kept}") from None
            first_line = (str(error).strip().splitlines() or [""])[0]
            print(f"distmlip: error: {first_line}; {kept}", file=sys.stderr)
            return 1
        progress.close()
        builds, reuses = calc.graph_builds, calc.graph_reuses
    summary = _summary(args, rows, step_seconds, worker_timings, time.perf_counter() - started)
    summary.update(
        graph_builds=builds,
        graph_reuses=reuses,
        trajectory=str(trajectory),
        log=str(log_path),
        atoms=len(atoms),
        integrator=settings.describe(),
    )
    if args.json:
        print_json(summary)
    else:
        print(_summary_table(summary))
    return 0


def _line(row: dict, total: int) -> str:
    return (
        f"step {row['step']}/{total}  T {row['temperature_K']:.1f} K  "
        f"Epot {row['epot_eV']:.6f} eV  Etot {row['etotal_eV']:.6f} eV  "
        f"{row['seconds_per_step']:.3f} s/step"
    )


def _summary(args, rows, step_seconds, worker_timings, wall) -> dict:
    shares = step_breakdown(step_seconds, worker_timings)
    first, last = rows[0], rows[-1]
    span_ps = (last["time_fs"] - first["time_fs"]) / 1000
    drift = last["etotal_eV"] - first["etotal_eV"]
    return {
        "steps_run": len(step_seconds),
        "last_step": last["step"],
        "wall_s": wall,
        "median_step_s": statistics.median(step_seconds) if step_seconds else 0.0,
        "final_temperature_K": last["temperature_K"],
        "mean_temperature_K": float(np.mean([r["temperature_K"] for r in rows])),
        "total_energy_change_eV": drift,
        "total_energy_change_per_ps_eV": drift / span_ps if span_ps > 0 else 0.0,
        "step_time_shares": shares,
    }


def _summary_table(summary: dict) -> str:
    shares = summary["step_time_shares"]
    rows = [
        ("atoms", f"{summary['atoms']}"),
        ("integrator", summary["integrator"]),
        ("steps", f"{summary['steps_run']} run, now at step {summary['last_step']}"),
        ("time", f"{summary['wall_s']:.1f} s, median {summary['median_step_s']:.3f} s per step"),
        (
            "temperature",
            f"final {summary['final_temperature_K']:.1f} K, "
            f"mean of logged {summary['mean_temperature_K']:.1f} K",
        ),
        (
            "total energy change",
            f"{summary['total_energy_change_eV']:+.3e} eV over the logged rows",
        ),
        ("graphs", f"{summary['graph_builds']} built, {summary['graph_reuses']} reused"),
        (
            "step time",
            f"model {shares['model']:.0%} (of it waiting on exchanges "
            f"{shares['communication']:.0%}), outside the model {shares['outside_model']:.0%} "
            f"(worker graph work {shares['graph']:.0%})",
        ),
        ("trajectory", summary["trajectory"]),
        ("log", summary["log"]),
    ]
    return table(rows)
