"""What ``distmlip md`` reports: a thermo row per frame, where the step time went, the summary."""

from __future__ import annotations

import statistics

import numpy as np

from distmlip.cli.output import table
from distmlip.cli.predict import GPA_PER_EV_PER_A3

__all__ = ["thermo_row", "step_breakdown", "summary", "summary_table", "progress_line"]


def thermo_row(atoms, results: dict, step: int, time_fs: float, seconds: float, calc) -> dict:
    """The thermo log's columns (``distmlip.md.trajectory.THERMO_COLUMNS``) for the current state.

    The pressure is ASE's ``-trace(stress)/3`` including the kinetic (ideal-gas) part,
    ``Σ p pᵀ / m / V``, in GPa; nan without a periodic cell or without a stress."""
    pressure = float("nan")
    if atoms.cell.volume > 0 and "stress" in results:
        momenta = atoms.get_momenta()
        kinetic = (momenta.T @ (momenta / atoms.get_masses()[:, None])) / atoms.cell.volume
        virial_part = -np.mean(np.asarray(results["stress"])[:3])  # eV/Å³, compression > 0
        pressure = (np.trace(kinetic) / 3 + virial_part) * GPA_PER_EV_PER_A3
    edges = [s["edges"] for s in calc.last_stats] if calc.last_stats else [0]
    kinetic_energy = float(atoms.get_kinetic_energy())
    return {
        "step": step,
        "time_fs": time_fs,
        "epot_eV": float(results["energy"]),
        "ekin_eV": kinetic_energy,
        "etotal_eV": float(results["energy"]) + kinetic_energy,
        "temperature_K": float(atoms.get_temperature()) if len(atoms) else 0.0,
        "pressure_GPa": pressure,
        "volume_A3": float(atoms.cell.volume),
        "seconds_per_step": seconds,
        "graph_builds": calc.graph_builds,
        "imbalance": float(max(edges) / np.mean(edges)) if np.mean(edges) > 0 else 1.0,
    }


def step_breakdown(step_seconds: list[float], worker_timings: list[list[dict]]) -> dict:
    """Where the step time went, as shares of the total step time.

    Args:
        step_seconds: wall time of each step in the driver (integrator, the call, assembly), s.
        worker_timings: per step, every worker's ``last_timings``.

    Returns ``model`` (the critical worker's forward, backward and forces, with the waits on
    halo exchanges in them: ``communication``), ``graph`` (its partition, neighbour list, plan,
    model inputs) and ``outside_model`` = 1 − model (graph work, transfers between driver and
    workers, the integrator)."""
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


def summary(rows: list[dict], step_seconds: list[float], worker_timings, wall: float) -> dict:
    """The run's summary (JSON-able): steps, times, temperatures, total energy change, shares."""
    first, last = rows[0], rows[-1]
    span_ps = (last["time_fs"] - first["time_fs"]) / 1000
    change = last["etotal_eV"] - first["etotal_eV"]
    return {
        "steps_run": len(step_seconds),
        "logged_rows": len(rows),
        "last_step": last["step"],
        "wall_s": wall,
        "median_step_s": statistics.median(step_seconds) if step_seconds else 0.0,
        "final_temperature_K": last["temperature_K"],
        "mean_temperature_K": float(np.mean([r["temperature_K"] for r in rows])),
        "total_energy_change_eV": change,
        "total_energy_change_per_ps_eV": change / span_ps if span_ps > 0 else 0.0,
        "step_time_shares": step_breakdown(step_seconds, worker_timings),
    }


def summary_table(result: dict) -> str:
    shares = result["step_time_shares"]
    rows = [
        ("atoms", f"{result['atoms']}"),
        ("model", f"{result['model']} ({result['dtype']})"),
        ("integrator", result["integrator"]),
        ("steps", f"{result['steps_run']} run, now at step {result['last_step']}"),
        ("time", f"{result['wall_s']:.1f} s, median {result['median_step_s']:.3f} s per step"),
        (
            "temperature",
            f"final {result['final_temperature_K']:.1f} K, "
            f"mean of logged {result['mean_temperature_K']:.1f} K",
        ),
        (
            "total energy change",
            f"{result['total_energy_change_eV']:+.3e} eV over the logged rows"
            if result["logged_rows"] > 1
            else "– (one logged row)",
        ),
        ("graphs", f"{result['graph_builds']} built, {result['graph_reuses']} reused"),
        (
            "step time",
            f"model {shares['model']:.0%} (of it waiting on exchanges "
            f"{shares['communication']:.0%}), outside the model {shares['outside_model']:.0%} "
            f"(worker graph work {shares['graph']:.0%})",
        ),
        ("trajectory", result["trajectory"]),
        ("log", result["log"]),
    ]
    return table(rows)


def progress_line(row: dict, total: int) -> str:
    """One plain progress line (when standard error is not a terminal)."""
    return (
        f"step {row['step']}/{total}  T {row['temperature_K']:.1f} K  "
        f"Epot {row['epot_eV']:.6f} eV  Etot {row['etotal_eV']:.6f} eV  "
        f"{row['seconds_per_step']:.3f} s/step"
    )
