"""Long NVE stability: the same MD run with distributed forces (P = 2) and in one process (P = 1).

Runs ``distmlip md`` twice from the same start (positions, seeded Maxwell–Boltzmann velocities),
one after the other so they do not share the cores, then compares: per-frame deviation of the
positions between the two runs, and each run's total-energy drift (linear fit over the run, per
atom per ps), its largest excursion and its fluctuation.

    python benchmarks/md_stability.py --out docs/benchmarks                  # 10,000 steps
    python benchmarks/md_stability.py --steps 200 --out /tmp/quick          # a smoke run
    python benchmarks/md_stability.py --report-only --work DIR --out docs/benchmarks
    python benchmarks/md_stability.py --resume --work DIR ...   # continue interrupted runs

Writes ``<out>/md_stability.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report
from distmlip.md.trajectory import THERMO_COLUMNS

STRUCTURE = ["bulk:Si:diamond:5.43:cubic", "--repeat", "3", "3", "3", "--rattle", "0.02"]
"""216 Si atoms (3³ diamond cells), rattled: CHGNet's 3 Å bond graph gives three-body terms."""


def run(nprocs: int, args, work: Path) -> None:
    trajectory = work / f"p{nprocs}.traj"
    command = [sys.executable, "-m", "distmlip", "md", *STRUCTURE, "--model", args.model]
    command += ["--nprocs", str(nprocs), "--dtype", args.dtype, "--ensemble", "nve"]
    command += ["--temperature", str(args.temperature), "--timestep", str(args.timestep)]
    command += ["--steps", str(args.steps), "--log-every", str(args.log_every), "--seed", "0"]
    command += ["--skin", str(args.skin), "--trajectory", str(trajectory), "--json"]
    # An interrupted study continues where it stopped (distmlip md --restart); else starts anew.
    command += (
        ["--restart", str(trajectory)] if args.resume and trajectory.exists() else ["--overwrite"]
    )
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=open(work / f"p{nprocs}.json", "w"))  # noqa: SIM115


def analyse(work: Path, args) -> dict:
    import json

    from ase.io import iread

    runs = {}
    for nprocs in (1, 2):
        log = np.loadtxt(work / f"p{nprocs}.log")
        columns = dict(zip(THERMO_COLUMNS, log.T, strict=True))
        summary = json.loads((work / f"p{nprocs}.json").read_text())
        time_ps = columns["time_fs"] / 1000
        total = columns["etotal_eV"]
        n_atoms = summary["atoms"]
        slope = np.polyfit(time_ps, total, 1)[0]
        # graph_builds counts per calculator: a restarted segment (--resume) starts again at 1.
        builds = columns["graph_builds"]
        pairs = zip(builds[:-1], builds[1:], strict=True)
        restarts = [int(s) for s, (a, b) in zip(columns["step"][:-1], pairs, strict=True) if b < a]
        pairs = zip(builds[:-1], builds[1:], strict=True)
        total_builds = builds[0] + sum(b if b < a else b - a for a, b in pairs)
        runs[nprocs] = {
            "time_ps": time_ps.tolist(),
            "etotal_per_atom_meV": ((total - total[0]) / n_atoms * 1000).tolist(),
            "temperature_K": columns["temperature_K"].tolist(),
            "drift_meV_per_atom_per_ps": slope / n_atoms * 1000,
            "max_excursion_meV_per_atom": float(np.abs(total - total[0]).max() / n_atoms * 1000),
            "fluctuation_meV_per_atom": float(np.std(total) / n_atoms * 1000),
            "mean_temperature_K": float(columns["temperature_K"].mean()),
            "median_step_s": float(np.median(columns["seconds_per_step"][1:])),
            "graph_builds": int(total_builds),
            "restarted_at_steps": restarts,
            "atoms": n_atoms,
        }
    deviation = []
    one, two = (iread(str(work / f"p{p}.traj"), index=":") for p in (1, 2))
    for a, b in zip(one, two, strict=True):
        deviation.append(float(np.abs(a.positions - b.positions).max()))
    step = np.array(runs[1]["time_ps"][1:]) * 1000 / args.timestep
    return {"runs": runs, "frame_steps": step.tolist(), "max_position_difference_A": deviation}


def markdown(result: dict, args) -> str:
    runs, deviation = result["runs"], np.array(result["max_position_difference_A"])
    steps = np.array(result["frame_steps"])
    n_atoms = runs[1]["atoms"]
    lines = [
        "# Long NVE stability: distributed (P = 2) against one process (P = 1)",
        "",
        f"Machine: {machine_description('cpu')}. {args.model} ({args.dtype}), {n_atoms} Si atoms "
        f"(diamond, 3³ cells, rattled 0.02 Å), NVE velocity Verlet, {args.timestep:g} fs, "
        f"{args.steps:,} steps ({args.steps * args.timestep / 1000:g} ps), initial "
        f"{args.temperature:g} K from seed 0, skin {args.skin:g} Å (graphs rebuilt and atoms "
        "re-partitioned whenever one has moved half of it), slab partition. Drift: slope of a "
        "straight-line fit to the total energy over the whole run.",
        "",
    ]
    header = [
        "P",
        "drift (meV/atom/ps)",
        "largest ΔE_tot excursion (meV/atom)",
        "E_tot std (meV/atom)",
        "mean T (K)",
        "graph builds",
        "s/step",
    ]
    rows = [
        [
            nprocs,
            f"{run['drift_meV_per_atom_per_ps']:+.4f}",
            f"{run['max_excursion_meV_per_atom']:.4f}",
            f"{run['fluctuation_meV_per_atom']:.4f}",
            f"{run['mean_temperature_K']:.1f}",
            run["graph_builds"],
            f"{run['median_step_s']:.3f}",
        ]
        for nprocs, run in sorted(runs.items())
    ]
    lines += [markdown_table(header, rows), ""]
    for nprocs, run in sorted(runs.items()):
        if run["restarted_at_steps"]:
            steps_text = ", ".join(f"{step:,}" for step in run["restarted_at_steps"])
            lines += [
                f"The P = {nprocs} run was interrupted and continued with `distmlip md --restart` "
                f"(at step {steps_text}; `--resume`): one trajectory.",
                "",
            ]
    marks = [m for m in (100, 1000, 5000, args.steps) if m <= steps.max()]
    agreement = [
        [f"{int(m):,}", f"{deviation[steps <= m].max():.2e}"] for m in dict.fromkeys(marks)
    ]
    lines += [
        "Largest difference of any atom's position between the two runs, up to a step "
        f"(frames every {args.log_every} steps):",
        "",
        markdown_table(["up to step", "largest Δr (Å)"], agreement),
        "",
        "Float32 round-off differs between one process and two (sums in another order), and MD "
        "amplifies any difference exponentially (chaos), so the trajectories separate after "
        "enough steps, as two single-process runs on different hardware would; what must "
        "agree is the statistics: drift and fluctuation of the conserved energy.",
        "",
        "![energy drift](md_stability.png)",
    ]
    return "\n".join(lines) + "\n"


def figure(result: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for nprocs, run in sorted(result["runs"].items()):
        axes[0].plot(run["time_ps"], run["etotal_per_atom_meV"], label=f"P = {nprocs}", lw=0.8)
    axes[0].set_xlabel("time (ps)")
    axes[0].set_ylabel("E_tot − E_tot(0) (meV/atom)")
    axes[0].set_title("NVE total energy")
    axes[0].legend()
    deviation = np.maximum(result["max_position_difference_A"], 1e-16)
    axes[1].semilogy(result["frame_steps"], deviation)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("max |r(P=2) − r(P=1)| (Å)")
    axes[1].set_title("trajectory difference")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chgnet")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--timestep", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=600.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--skin",
        type=float,
        default=0.3,
        help="Å: small, so graphs are rebuilt and atoms re-partitioned often during the run",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/distmlip-md-stability"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--report-only", action="store_true", help="analyse an earlier --work")
    parser.add_argument(
        "--resume", action="store_true", help="continue the runs an interruption left in --work"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for nprocs in (1, 2):
            run(nprocs, args, args.work)
    result = analyse(args.work, args)
    payload = {"machine": machine_description("cpu"), "settings": vars(args) | {"work": None}}
    payload.update(result)
    write_report(
        args.out,
        "md_stability",
        payload=payload,
        markdown=markdown(result, args),
        figure=lambda: figure(result),
    )


if __name__ == "__main__":
    main()
