"""``distmlip md``, ``distmlip relax`` and ``predict --json`` end to end, on small systems."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from ase.build import bulk
from ase.io import read
from test_interrupts import start_as_from_a_terminal, workers_of
from test_launch import assert_all_gone

from distmlip import DistributedCalculator
from distmlip.cli import main
from distmlip.md.trajectory import THERMO_COLUMNS

pytestmark = pytest.mark.slow  # every test runs the CLI with its own worker pool

CU = ["bulk:Cu:fcc:3.61:cubic", "--repeat", "2", "2", "2"]  # 32 atoms
COMMON = ["--model", "reference", "--dtype", "float64", "--nprocs", "2"]


def md(tmp_path, *extra, name="run.extxyz", steps=20, every=5) -> list[str]:
    return ["md", *CU, *COMMON, "--steps", str(steps), "--log-every", str(every),
            "--trajectory", str(tmp_path / name), *extra]  # fmt: skip


def thermo(path) -> np.ndarray:
    with open(path) as handle:
        assert handle.readline().split() == ["#", *THERMO_COLUMNS]
    return np.atleast_2d(np.loadtxt(path))


def test_predict_json_is_all_of_stdout_and_equals_the_python_api():
    command = [sys.executable, "-m", "distmlip", "predict", "bulk:Al:fcc:4.05", "--repeat"]
    command += ["3", "3", "3", "--rattle", "0.05", "--seed", "3", *COMMON, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # the whole of stdout is one JSON object
    atoms = bulk("Al", "fcc", a=4.05).repeat((3, 3, 3))
    atoms.rattle(stdev=0.05, seed=3)
    with DistributedCalculator("reference", nprocs=1, dtype="float64") as calc:
        expected = calc.get_properties(["energy", "forces", "stress"], atoms)
    assert result["energy"] == pytest.approx(expected["energy"], rel=1e-10)
    np.testing.assert_allclose(result["forces"], expected["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(result["stress"], expected["stress"], rtol=0, atol=1e-12)
    assert np.shape(result["forces"]) == (27, 3) and len(result["stress"]) == 6


def test_md_writes_frames_and_a_parseable_log_and_conserves_energy(tmp_path, capsys):
    assert main(md(tmp_path, "--temperature", "500")) == 0
    assert "outside the model" in capsys.readouterr().out
    frames = read(tmp_path / "run.extxyz", ":")
    assert [frame.info["step"] for frame in frames] == [5, 10, 15, 20]  # steps / log-every
    assert [frame.info["time_fs"] for frame in frames] == [5.0, 10.0, 15.0, 20.0]
    for frame in frames:
        assert frame.get_momenta().shape == (32, 3) and np.abs(frame.get_momenta()).max() > 0
        assert frame.get_forces().shape == (32, 3) and frame.get_stress().shape == (6,)
        assert np.isfinite(frame.get_potential_energy())
    log = thermo(tmp_path / "run.log")
    columns = dict(zip(THERMO_COLUMNS, log.T, strict=True))
    assert list(columns["step"]) == [0, 5, 10, 15, 20]
    assert columns["temperature_K"][0] == pytest.approx(500)
    np.testing.assert_allclose(columns["epot_eV"][1:], [f.get_potential_energy() for f in frames])
    total = columns["etotal_eV"]
    assert np.ptp(columns["epot_eV"]) > 20 * np.ptp(total)  # energy moves between the two
    assert np.ptp(total) < 1e-4 * len(frames[0])  # NVE: total energy conserved
    # Pressure: -trace(stress)/3 of the model plus the kinetic part, from the frame itself.
    last = frames[-1]
    momenta = last.get_momenta()
    kinetic = np.trace(momenta.T @ (momenta / last.get_masses()[:, None])) / 3 / last.get_volume()
    expected = (kinetic - np.mean(last.get_stress()[:3])) * 160.21766208
    assert columns["pressure_GPa"][-1] == pytest.approx(expected, rel=1e-6)
    assert np.all((columns["imbalance"] >= 1) & (columns["imbalance"] < 1.3))  # max/mean edges
    state = json.loads((tmp_path / "run.extxyz.state.json").read_text())
    assert state["step"] == 20 and state["integrator_state"]["integrator"] == "VelocityVerlet"


def test_a_last_step_between_log_rows_is_written_too(tmp_path):
    assert main(md(tmp_path, steps=12)) == 0
    assert [f.info["step"] for f in read(tmp_path / "run.extxyz", ":")] == [5, 10, 12]
    assert list(thermo(tmp_path / "run.log")[:, 0]) == [0, 5, 10, 12]


SETTINGS = ["--temperature", "450", "--timestep", "2", "--seed", "7"]


@pytest.mark.parametrize(
    "ensemble",
    [
        ["--ensemble", "nvt", "--friction", "0.05"],
        ["--ensemble", "nvt", "--thermostat", "nose-hoover", "--tdamp", "30"],
        ["--ensemble", "npt", "--pressure", "2", "--tdamp", "30", "--pdamp", "60"],
    ],
    ids=["langevin", "nose-hoover", "mtk-npt"],
)
def test_restart_continues_the_step_count_and_the_trajectory(tmp_path, ensemble, capsys):
    """Stopped at step 10 and restarted to 20 equals one run to 20: the thermostat state, the
    random stream and the settings (not repeated on the restart's command line) carry over;
    .traj keeps positions bit for bit."""
    assert main(md(tmp_path, *ensemble, *SETTINGS, name="whole.traj")) == 0
    assert main(md(tmp_path, *ensemble, *SETTINGS, name="part.traj", steps=10)) == 0
    assert main(md(tmp_path, *ensemble, name="part.traj")) == 2  # it exists: refused
    part = str(tmp_path / "part.traj")
    capsys.readouterr()
    assert main(["md", *COMMON, "--steps", "20", "--log-every", "5", "--restart", part]) == 0
    assert "changed on restart" not in capsys.readouterr().err
    whole, part = read(tmp_path / "whole.traj", ":"), read(tmp_path / "part.traj", ":")
    assert [f.info["step"] for f in part] == [5, 10, 15, 20]
    assert [f.info["time_fs"] for f in part] == [10.0, 20.0, 30.0, 40.0]
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_allclose(b.cell[:], a.cell[:], rtol=0, atol=1e-12)
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(b.get_momenta(), a.get_momenta(), rtol=0, atol=1e-12)
    log = thermo(tmp_path / "part.log")
    assert list(log[:, 0]) == [0, 5, 10, 15, 20]  # one header, rows continue


def test_the_same_command_line_with_restart_finishes_the_run(tmp_path, capsys):
    first = md(tmp_path, "--ensemble", "nvt", *SETTINGS, steps=5)
    assert main(first) == 0
    again = [
        *first[: first.index("--steps")],
        "--steps",
        "10",
        *first[first.index("--steps") + 2 :],
    ]
    assert main([*again, "--restart", str(tmp_path / "run.extxyz"), "--temperature", "900"]) == 0
    err = capsys.readouterr().err
    assert (
        "STRUCTURE, --repeat not used" in err and "--temperature 900.0 (the run had 450.0)" in err
    )
    assert [f.info["step"] for f in read(tmp_path / "run.extxyz", ":")] == [5, 10]
    state = json.loads((tmp_path / "run.extxyz.state.json").read_text())
    assert state["settings"]["temperature_K"] == 900 and state["settings"]["timestep_fs"] == 2


@pytest.mark.parametrize("name", ["torn.extxyz", "torn.traj"])
def test_restart_after_a_torn_final_frame_cuts_the_log_back(tmp_path, name, capsys):
    """A kill in the middle of writing a frame: the restart drops the torn frame and the log
    rows after the last complete one, and continues from there."""
    assert main(md(tmp_path, name=name, steps=15)) == 0
    path = tmp_path / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # frame 15 torn
    argv = ["md", *COMMON, "--steps", "20", "--log-every", "5", "--restart", str(path)]
    assert main(argv) == 0
    assert "dropped a torn final frame" in capsys.readouterr().err
    assert [f.info["step"] for f in read(path, ":")] == [5, 10, 15, 20]
    assert list(thermo(path.with_suffix(".log"))[:, 0]) == [0, 5, 10, 15, 20]


def test_a_diverged_run_stops_with_one_line(tmp_path):
    from distmlip.cli.md import BlownUp, _check_sane
    from distmlip.md.dynamics import MDSettings

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_momenta(np.full((4, 3), np.nan))
    with pytest.raises(BlownUp, match="diverged at step 7.*smaller --timestep"):
        _check_sane(atoms, {"energy": 1.0}, 7, MDSettings(), [])


def test_an_existing_log_is_not_overwritten(tmp_path):
    (tmp_path / "run.log").write_text("someone's log\n")
    assert main(md(tmp_path, steps=5)) == 2
    assert (tmp_path / "run.log").read_text() == "someone's log\n"
    assert not (tmp_path / "run.extxyz").exists()
    assert main(md(tmp_path, "--overwrite", steps=5)) == 2  # not a thermo log: never replaced
    assert (tmp_path / "run.log").read_text() == "someone's log\n"
    (tmp_path / "run.log").unlink()
    assert main(md(tmp_path, steps=5)) == 0
    assert main(md(tmp_path, "--overwrite", steps=10)) == 0  # an earlier run's log: replaced
    assert list(thermo(tmp_path / "run.log")[:, 0]) == [0, 5, 10]


def test_extras_are_stored_in_every_frame(tmp_path):
    """CHGNet's magnetic moments, through the command line, equal the Python API's."""
    path = tmp_path / "si.extxyz"
    argv = ["md", "bulk:Si:diamond:5.43:cubic", "--model", "chgnet", "--nprocs", "2"]
    argv += ["--dtype", "float64", "--steps", "2", "--log-every", "1", "--extras", "magmoms"]
    assert main([*argv, "--trajectory", str(path), "--temperature", "100"]) == 0
    frames = read(path, ":")
    assert len(frames) == 2
    with DistributedCalculator("chgnet", nprocs=1, dtype="float64") as calc:
        for frame in frames:
            stored = frame.calc.results["magmoms"]
            expected = calc.get_properties(["magmoms"], frame.copy())["magmoms"]
            assert stored.shape == (8,) and np.abs(stored).max() > 0
            np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-7)


def test_restart_without_the_saved_state_warns_and_nve_needs_none(tmp_path, capsys):
    assert main(md(tmp_path, "--ensemble", "nvt", steps=5)) == 0
    (tmp_path / "run.extxyz.state.json").unlink()
    argv = ["md", *COMMON, "--ensemble", "nvt", "--steps", "10", "--log-every", "5"]
    argv += [
        "--restart",
        str(tmp_path / "run.extxyz"),
        "--trajectory",
        str(tmp_path / "run.extxyz"),
    ]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Langevin's random stream restarts from --seed 0" in capsys.readouterr().err
    assert [f.info["step"] for f in read(tmp_path / "run.extxyz", ":")] == [5, 10]
    assert main(argv) == 0  # already at step 10: nothing to run
    assert "nothing to run" in capsys.readouterr().out


def test_npt_moves_a_triclinic_cell(tmp_path):
    argv = ["md", "bulk:Cu:fcc:3.4", "--repeat", "3", "3", "3", *COMMON, "--ensemble", "npt"]
    argv += ["--pressure", "1", "--pdamp", "20", "--steps", "10", "--log-every", "5"]
    argv += ["--trajectory", str(tmp_path / "npt.extxyz")]
    assert main(argv) == 0
    start = bulk("Cu", "fcc", a=3.4).repeat(3)
    last = read(tmp_path / "npt.extxyz")
    assert last.cell.angles() == pytest.approx(start.cell.angles(), abs=5)  # triclinic (60°)
    assert not np.allclose(last.cell[:], start.cell[:], atol=1e-4)  # the barostat moved it
    volumes = thermo(tmp_path / "npt.log")[:, THERMO_COLUMNS.index("volume_A3")]
    assert len(set(volumes)) == len(volumes)


def test_relax_lowers_the_largest_force_below_the_threshold(tmp_path, capsys):
    output = tmp_path / "relaxed.extxyz"
    argv = ["relax", *CU, "--rattle", "0.1", *COMMON, "--fmax", "0.02", "--optimizer", "bfgs"]
    assert main([*argv, "--output", str(output), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["converged"] and result["initial_max_force_eV_per_A"] > 0.1
    relaxed = read(output)
    with DistributedCalculator("reference", nprocs=1, dtype="float64") as calc:
        forces = calc.get_properties(["forces"], relaxed)["forces"]
    assert np.linalg.norm(forces, axis=1).max() < 0.02
    assert result["energy_eV"] < result["initial_energy_eV"]


def test_relax_with_the_cell_reaches_the_stress_threshold(tmp_path, capsys):
    output = tmp_path / "cell.extxyz"
    argv = ["relax", "bulk:Cu:fcc:3.75:cubic", "--model", "reference", "--nprocs", "1"]
    argv += ["--cell", "--smax", "0.05", "--fmax", "0.01", "--output", str(output), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["converged"] and result["max_stress_residual_GPa"] < 0.05
    relaxed = read(output)
    with DistributedCalculator("reference", nprocs=1, dtype="float64") as calc:
        stress = calc.get_properties(["stress"], relaxed)["stress"] * 160.21766208
    assert np.abs(stress).max() < 0.05
    assert relaxed.cell.volume != pytest.approx(3.75**3, rel=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["md", *CU, "--ensemble", "nve", "--pressure", "1"], "--pressure and --pdamp apply to"),
        (["md", *CU, "--friction", "0.1"], "--friction applies to the Langevin"),
        (["md", *CU, "--thermostat", "nose-hoover"], "--thermostat applies to --ensemble nvt"),
        (["md", *CU, "--trajectory", "out.pdb"], "name it .extxyz, .xyz"),
        (["md"], "give STRUCTURE"),
        (["md", "--restart", "missing.traj"], "no such file 'missing.traj'"),
        (["md", "bulk:Cu:fcx:3.6"], "unknown crystal structure 'fcx'"),
        (["md", "bulk:Qq:fcc:3.6"], "'Qq' is not a chemical symbol"),
        (["md", "bulk:Cu"], "a generator spec is bulk:SYMBOL:CRYSTAL"),
        (["md", *CU, "--repeat", "2", "0", "2"], "--repeat: must be a positive integer"),
        (["md", *CU, "--model", "reference", "--extras", "charges"], "--extras 'charges'"),
        (["predict", "bulk:Cu:fcc:3.6", "--index", "0"], "--index selects frames of a STRUCTURE"),
        (["relax", *CU, "--pressure", "2"], "--pressure applies with --cell"),
        (["relax", *CU, "--trajectory", "steps.extxyz"], "name it .traj"),
        (["md", *CU, "--ensemble", "npt", "--pressure", "nan"], "--pressure: must be a finite"),
        (["md", "--restart", "x.extxyz", "--steps", "5"], "no such file 'x.extxyz'"),
        (["md", *CU, "--trajectory", "a.extxyz", "--log", "a.extxyz"], "same file as --trajectory"),
        (["md", *CU, "--log", "md.extxyz.state.json"], "is the same file as its state"),
        (["md", *CU, "--trajectory", "nodir/a.extxyz"], "no directory 'nodir'"),
        (["md", *CU, "--log", "notes.txt", "--overwrite"], "is not a thermo log"),
        (["md", *CU, "--model", "reference", "--extras", "stress"], "outputs of reference are"),
        (["md", *CU, "--seed", "-1"], "--seed: must be an integer from 0 to 2**32 - 1"),
        (["md", *CU, "--repeat", "9999", "9999", "9999"], "use smaller repeats"),
        (["md", "bulk:Cu:orthorhombic:3.6"], "orthorhombic needs lattice parameters"),
        (["md", "bulk:Cu:bct:3"], "bct needs lattice parameters"),
        (["md", "bulk:Cu:fcc:1000"], "between 0 and 1000 Å"),
        (["relax", *CU, "--output", "nodir/r.extxyz"], "--output 'nodir/r.extxyz': no directory"),
        (["relax", *CU, "--output", "r.foo"], "cannot tell the format from the name"),
        (["relax", *CU, "--output", "r.traj", "--trajectory", "r.traj"], "name the same file"),
        (["relax", *CU, "--smax", "0.05"], "--smax applies with --cell"),
    ],
)
def test_bad_md_and_relax_command_lines(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a log\n")
    assert main(argv) in (1, 2)
    error = capsys.readouterr().err.strip().splitlines()
    assert message in error[-1] and error[-1].startswith("distmlip: error:")
    assert not list(tmp_path.glob("md.*")) and not list(tmp_path.glob("*.extxyz"))
    assert (tmp_path / "notes.txt").read_text() == "not a log\n"  # nothing overwritten


def _run_until_frames(command: list[str], trajectory, frames: int) -> subprocess.Popen:
    driver = start_as_from_a_terminal(command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if trajectory.exists() and trajectory.read_text().count("Lattice=") >= frames:
            return driver
        time.sleep(0.2)
    driver.kill()
    raise AssertionError(f"no {frames} frames: {driver.communicate()[1]}")


@pytest.mark.parametrize("fault", ["sigint", "sigterm", "dead worker"])
def test_interrupted_md_leaves_a_readable_trajectory_and_no_workers(tmp_path, fault):
    trajectory = tmp_path / "long.extxyz"
    command = [sys.executable, "-m", "distmlip", "md", "bulk:Cu:fcc:3.61:cubic", "--repeat"]
    command += ["5", "5", "5", *COMMON, "--steps", "100000", "--log-every", "2"]
    command += ["--trajectory", str(trajectory), "--timeout", "60"]
    driver = _run_until_frames(command, trajectory, 3)
    workers = workers_of(psutil.Process(driver.pid))
    assert len(workers) == 2
    if fault == "sigint":  # Ctrl-C in a terminal: the whole process group
        os.killpg(driver.pid, signal.SIGINT)
    elif fault == "sigterm":  # a batch scheduler's time limit: the driver
        driver.terminate()
    else:
        workers[1].kill()
    _, stderr = driver.communicate(timeout=90)
    assert driver.returncode == {"sigint": 130, "sigterm": 143}.get(fault, 1), stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("distmlip: ") and f"--restart {trajectory}" in last
    frames = read(trajectory, ":")
    steps = [frame.info["step"] for frame in frames]
    assert len(steps) >= 3 and steps == list(range(2, 2 * len(steps) + 1, 2))
    assert f"up to step {steps[-1]};" in last
    assert_all_gone([worker.pid for worker in workers])
    if fault == "sigint":  # and the run continues from there
        argv = ["md", "--restart", str(trajectory), *COMMON, "--log-every", "2"]
        assert main([*argv, "--steps", str(steps[-1] + 4)]) == 0
        after = [frame.info["step"] for frame in read(trajectory, ":")]
        assert after == [*steps, steps[-1] + 2, steps[-1] + 4]
