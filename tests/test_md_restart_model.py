"""``distmlip md --restart`` continues the run's science: its model, dtype, skin and ensemble,
recorded in the state file and in every frame; and a full disk ends a run with one line."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

import distmlip.md.durable
from distmlip import DistributedCalculator
from distmlip.cli import main

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

CU = ["bulk:Cu:fcc:3.61:cubic", "--repeat", "2", "2", "2"]  # 32 atoms
FAST = ["--nprocs", "1", "--log-every", "5"]


def md(trajectory, *extra, steps: int = 5) -> list[str]:
    return ["md", *CU, *FAST, "--steps", str(steps), "--trajectory", str(trajectory), *extra]


def restart(trajectory, *extra, steps: int = 10) -> list[str]:
    return ["md", "--restart", str(trajectory), *FAST, "--steps", str(steps), *extra]


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def saved_run(trajectory) -> dict:
    return json.loads(trajectory.with_name(trajectory.name + ".state.json").read_text())


@pytest.fixture(scope="module")
def mace_models(tmp_path_factory):
    """Two MACE model files of the same shape with different random weights."""
    from test_mace import build_model

    directory = tmp_path_factory.mktemp("models")
    paths = []
    for seed in (0, 1):
        paths.append(directory / f"seed{seed}.model")
        torch.save(build_model("residual_2x_L1_c3", seed=seed), paths[-1])
    return paths


def energies(model, frames) -> list[float]:
    """``model``'s energies of ``frames`` (eV), evaluated afresh."""
    with DistributedCalculator(str(model), nprocs=1, dtype="float64") as calc:
        return [calc.get_potential_energy(frame.copy()) for frame in frames]


def test_a_restart_continues_with_the_recorded_model_unless_another_is_given(
    tmp_path, mace_models, capsys
):
    """Without --model the restart runs the run's model file (the energies of its frames are
    that model's, not the default CHGNet's); --model another file is noted, and then used."""
    first, other = (shutil.copy(path, tmp_path / path.name) for path in mace_models)
    trajectory = tmp_path / "run.traj"  # exact positions: energies comparable to 1e-9
    assert main(md(trajectory, "--model", str(first), "--dtype", "float64")) == 0
    assert f"model {first} (float64, skin 1 Å)" in capsys.readouterr().err  # start-up line
    assert main(restart(trajectory)) == 0
    err = capsys.readouterr().err
    assert f"model {first.resolve()} (float64" in err and "changed on restart" not in err
    assert saved_run(trajectory)["run"]["model"] == str(first.resolve())
    assert main(restart(trajectory, "--model", str(other), steps=15)) == 0
    assert f"changed on restart: --model {other} (the run had {first.resolve()})" in (
        capsys.readouterr().err
    )
    frames = read(trajectory, ":")
    assert [f.info["step"] for f in frames] == [5, 10, 15]
    assert [f.info["model"] for f in frames] == [str(first.resolve())] * 2 + [str(other)]
    stored = [frame.get_potential_energy() for frame in frames]
    by_first, by_other = energies(first, frames[1:]), energies(other, frames[1:])
    assert stored[1] == pytest.approx(by_first[0], rel=0, abs=1e-9)  # restarted: the run's
    assert abs(stored[1] - by_other[0]) > 1e-3  # the two models differ here
    assert stored[2] == pytest.approx(by_other[1], rel=0, abs=1e-9)  # then the one asked for


def test_a_restart_refuses_a_model_file_that_changed_or_is_gone(tmp_path, mace_models, capsys):
    model = shutil.copy(mace_models[0], tmp_path / "model.model")
    trajectory = tmp_path / "run.extxyz"
    assert main(md(trajectory, "--model", str(model), steps=1)) == 0
    written = trajectory.read_bytes()
    shutil.copy(mace_models[1], model)  # other weights under the same name
    capsys.readouterr()
    assert main(restart(trajectory)) == 2
    error = last_error(capsys)
    assert error.startswith("distmlip: error: the run's model file") and "changed since" in error
    assert f"give --model {model.resolve()}" in error
    assert trajectory.read_bytes() == written  # nothing appended, nothing cut
    model.unlink()
    assert main(restart(trajectory)) == 2
    assert "is gone; give --model" in last_error(capsys)
    assert trajectory.read_bytes() == written


def test_a_named_model_whose_weights_changed_is_refused_or_noted(tmp_path, capsys):
    """A name (here the seeded reference model) is recorded with a hash of its weights: a
    package upgrade that changes them does not pass unnoticed."""
    trajectory = tmp_path / "run.extxyz"
    assert main(md(trajectory, "--model", "reference", steps=1)) == 0
    recorded = saved_run(trajectory)["run"]["model_hash"]
    assert recorded.startswith("weights:")
    for path in (trajectory, trajectory.with_name(trajectory.name + ".state.json")):
        path.write_text(path.read_text().replace(recorded, "weights:0123456789abcdef"))
    capsys.readouterr()
    assert main(restart(trajectory, steps=2)) == 2
    assert "weights of reference are not the run's" in last_error(capsys)
    assert [f.info["step"] for f in read(trajectory, ":")] == [1]
    assert main(restart(trajectory, "--model", "reference", steps=2)) == 0
    assert "changed on restart: the weights of reference" in capsys.readouterr().err
    assert saved_run(trajectory)["run"]["model_hash"] == recorded


def test_dtype_and_skin_are_recorded_and_reused(tmp_path, capsys):
    trajectory = tmp_path / "run.extxyz"
    assert main(md(trajectory, "--model", "reference", "--dtype", "float64", "--skin", "0.4")) == 0
    assert main(restart(trajectory)) == 0
    assert "(float64, skin 0.4 Å)" in capsys.readouterr().err
    run = saved_run(trajectory)["run"]
    assert (run["dtype"], run["skin"]) == ("float64", 0.4)
    assert main(restart(trajectory, "--dtype", "float32", steps=15)) == 0
    assert "changed on restart: --dtype float32 (the run had float64)" in capsys.readouterr().err
    assert read(trajectory, "-1").info["dtype"] == "float32"


def test_a_restart_without_the_state_file_keeps_the_ensemble_and_says_what_is_lost(
    tmp_path, capsys
):
    """The frames record the ensemble: a Nosé–Hoover run whose state file is lost continues
    as Nosé–Hoover (not NVE), with a warning; switching the ensemble is refused."""
    trajectory = tmp_path / "run.extxyz"
    nose_hoover = ["--ensemble", "nvt", "--thermostat", "nose-hoover", "--tdamp", "30"]
    assert main(md(trajectory, "--model", "reference", *nose_hoover)) == 0
    trajectory.with_name(trajectory.name + ".state.json").unlink()
    capsys.readouterr()
    assert main(restart(trajectory, "--ensemble", "nve")) == 2
    assert "the run continued is NVT with a Nosé–Hoover chain, not NVE" in last_error(capsys)
    assert main(restart(trajectory)) == 0
    err = capsys.readouterr().err
    assert "warning: no integrator state for step 5" in err
    assert "Nosé–Hoover chain variables restart at zero" in err
    state = saved_run(trajectory)
    assert state["integrator_state"]["integrator"] == "NoseHooverChainNVT"
    assert state["settings"]["tdamp_fs"] == 30
    assert read(trajectory, "-1").info["thermostat"] == "nose-hoover"


def test_a_trajectory_that_records_nothing_needs_the_model_and_warns_of_the_ensemble(
    tmp_path, capsys
):
    """Frames with step numbers but no record (an older distmlip) and no state file."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.set_momenta(np.random.default_rng(0).normal(0, 0.05, (32, 3)))
    atoms.info.update(step=5, time_fs=5.0)
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((32, 3)))
    trajectory = tmp_path / "old.extxyz"
    write(trajectory, atoms)
    assert main(restart(trajectory)) == 2
    assert "does not record its model" in last_error(capsys)
    assert main(restart(trajectory, "--model", "reference")) == 0
    err = capsys.readouterr().err
    assert "old.extxyz records no ensemble" in err and "continuing as NVE" in err


class FullDisk:
    """``os`` as ``distmlip.md.durable`` sees it, but the disk fills up during the ``fail_at``-th
    write to a file whose name ends in ``name``: half of it is written, then every write
    fails with ENOSPC."""

    def __init__(self, name: str, fail_at: int):
        self.name, self.fail_at = name, fail_at
        self.paths: dict[int, str] = {}
        self.writes = 0
        self.full = False

    def __getattr__(self, attribute):
        return getattr(os, attribute)

    def open(self, path, flags, mode=0o777):
        fd = os.open(path, flags, mode)
        self.paths[fd] = os.path.basename(path)
        return fd

    def write(self, fd: int, data) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.paths.get(fd, "").endswith(self.name):
            self.writes += 1
            if self.writes == self.fail_at:
                self.full = True
                return os.write(fd, bytes(data[: len(data) // 2]))
        return os.write(fd, data)


@pytest.mark.parametrize(
    "name, fail_at, failed",
    [("run.extxyz", 3, "run.extxyz"), ("run.log", 4, "run.log"), (".tmp", 3, "state.json")],
    ids=["frame", "log", "state"],
)
def test_a_full_disk_ends_the_run_with_one_line_and_no_partial_files(
    tmp_path, monkeypatch, capsys, name, fail_at, failed
):
    """The disk fills up at step 15 while the frame, the log row or the state is written: one
    line names the file, the last complete step and the command that continues; nothing half
    written stays (no torn frame or row, no temporary file); that command then finishes the
    run from the last frame with its integrator state."""
    trajectory = tmp_path / "run.extxyz"
    argv = md(trajectory, "--model", "reference", "--ensemble", "nvt", "--thermostat",
              "nose-hoover", steps=20)  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(distmlip.md.durable, "os", FullDisk(name, fail_at))
        assert main(argv) == 1
    error = last_error(capsys)
    assert error.startswith("distmlip: error: writing ") and failed in error.split(":")[2]
    assert "No space left on device; " in error
    assert f"holds frames up to step 10; continue with: distmlip md --restart {trajectory} " \
        "--steps 20" in error  # fmt: skip
    assert not [path for path in os.listdir(tmp_path) if path.endswith(".tmp")]
    assert [frame.info["step"] for frame in read(trajectory, ":")] == [5, 10]
    assert saved_run(trajectory)["step"] in (10, 15)  # 15: its "previous" is step 10's
    assert main(restart(trajectory, steps=20)) == 0
    err = capsys.readouterr().err
    assert "no integrator state" not in err and "dropped a torn" not in err
    assert [frame.info["step"] for frame in read(trajectory, ":")] == [5, 10, 15, 20]
    log = np.loadtxt(tmp_path / "run.log")
    assert list(log[:, 0]) == [0, 5, 10, 15, 20]


def test_a_relative_model_path_is_kept_absolute_and_found_from_another_directory(
    tmp_path, mace_models, monkeypatch, capsys
):
    """``--model m.model`` given in one directory is recorded as its absolute path, so a
    restart run from another directory uses that file (not 'gone', not another model)."""
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    model = shutil.copy(mace_models[0], tmp_path / "here" / "m.model").resolve()
    trajectory = tmp_path / "run.extxyz"
    monkeypatch.chdir(tmp_path / "here")
    assert main(md(trajectory, "--model", "m.model", steps=1)) == 0
    assert saved_run(trajectory)["run"]["model"] == str(model)
    assert read(trajectory, "-1").info["model"] == str(model)
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(restart(trajectory, steps=2)) == 0
    err = capsys.readouterr().err
    assert f"model {model} (float32" in err and "changed on restart" not in err


def test_giving_the_runs_own_model_name_again_is_no_change(tmp_path, capsys):
    trajectory = tmp_path / "run.extxyz"
    assert main(md(trajectory, "--model", "reference", steps=1)) == 0
    capsys.readouterr()
    assert main(restart(trajectory, "--model", "reference", "--skin", "1", steps=2)) == 0
    assert "changed on restart" not in capsys.readouterr().err


def test_a_launched_restart_needs_the_runs_model_options_on_every_ranks_command_line(
    monkeypatch,
):
    """Under torchrun the other ranks read no trajectory: a model, dtype or skin taken from
    the run (not the defaults, not given) must be added to the command line."""
    from types import SimpleNamespace

    import distmlip.cluster.launch
    from distmlip.cli.arguments import UsageError
    from distmlip.cli.md_start import check_launched

    args = SimpleNamespace(model="reference", dtype="float64", skin=1.0)
    monkeypatch.setattr(distmlip.cluster.launch, "detect_launch", lambda: None)
    check_launched(args, given=set())  # not launched: nothing to add
    monkeypatch.setattr(
        distmlip.cluster.launch, "detect_launch", lambda: SimpleNamespace(source="torchrun")
    )
    with pytest.raises(UsageError, match="under torchrun .*add --model reference --dtype float64$"):
        check_launched(args, given=set())
    check_launched(args, given={"model", "dtype"})  # on the command line: every rank has them


@pytest.mark.parametrize(("fault", "status"), [("sigterm", 143), ("ctrl-c", 130)])
def test_md_stopped_while_its_workers_start_says_so(tmp_path, monkeypatch, capsys, fault, status):
    import distmlip.cli.md as md_module
    from distmlip.cli import main
    from distmlip.cli.stopping import Terminated

    def starting(args, **options):
        raise Terminated if fault == "sigterm" else KeyboardInterrupt

    monkeypatch.setattr(md_module, "worker_calculator", starting)
    trajectory = tmp_path / "md.extxyz"
    argv = ["md", "bulk:Cu:fcc:3.61:cubic", "--model", "reference", "--steps", "3"]
    assert main([*argv, "--trajectory", str(trajectory)]) == status
    last = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = "terminated (SIGTERM)" if fault == "sigterm" else "interrupted"
    assert last == f"distmlip: {prefix}; while the workers started; no step was run"


def test_a_state_file_of_another_run_at_the_same_step_is_not_used(tmp_path, capsys):
    """A state file is matched to the frame by its step; one from another run (a 900 K state
    beside a 300 K trajectory) would change the science: refused with a warning, and the run
    continues at its own 300 K."""
    cold, hot = tmp_path / "cold.extxyz", tmp_path / "hot.extxyz"
    langevin = ["--model", "reference", "--ensemble", "nvt", "--thermostat", "nose-hoover"]
    assert main(md(cold, *langevin, "--temperature", "300", "--tdamp", "30")) == 0
    assert main(md(hot, *langevin, "--temperature", "900", "--tdamp", "30")) == 0
    shutil.copy(hot.with_name(hot.name + ".state.json"), cold.with_name(cold.name + ".state.json"))
    capsys.readouterr()
    assert main(restart(cold)) == 0
    err = capsys.readouterr().err
    assert "warning: the integrator state beside" in err and "is not this run's" in err
    assert "temperature_K 900.0 in the state file, 300.0 in the frames" in err
    assert "no integrator state for step 5" in err  # and what that loses
    assert saved_run(cold)["settings"]["temperature_K"] == 300
