"""MD output files: complete frames only, torn frames dropped, Ctrl-C held while writing; and
the STRUCTURE argument."""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read

from distmlip.cli.structures import BulkSpec, structure_argument
from distmlip.md.trajectory import (
    FrameWriter,
    ThermoLog,
    interrupts_deferred,
    last_frame,
    load_state,
    save_state,
    trajectory_format,
)


def results(atoms, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "energy": float(rng.normal()),
        "forces": rng.normal(size=(len(atoms), 3)),
        "stress": rng.normal(size=6),
        "magmoms": rng.normal(size=len(atoms)),
    }


@pytest.mark.parametrize("name", ["frames.extxyz", "frames.traj"])
def test_frames_hold_what_a_restart_needs(tmp_path, name):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.set_momenta(np.random.default_rng(0).normal(size=(32, 3)))
    written = []
    with FrameWriter(tmp_path / name, extras=("magmoms",)) as writer:
        for step in (5, 10):
            atoms.positions += 0.01
            written.append(results(atoms, step))
            writer.write(atoms, written[-1], step, step * 2.0)
    frames = read(tmp_path / name, ":")
    assert [f.info["step"] for f in frames] == [5, 10]
    assert frames[-1].info["time_fs"] == 20.0
    tolerance = 1e-7 if name.endswith("extxyz") else 0  # extended XYZ keeps 8 decimals
    last = frames[-1]
    np.testing.assert_allclose(last.positions, atoms.positions, atol=tolerance, rtol=0)
    np.testing.assert_allclose(last.get_momenta(), atoms.get_momenta(), atol=tolerance, rtol=0)
    np.testing.assert_allclose(last.get_forces(), written[-1]["forces"], atol=tolerance, rtol=0)
    np.testing.assert_allclose(last.get_stress(), written[-1]["stress"], atol=tolerance, rtol=0)
    np.testing.assert_allclose(last.calc.results["magmoms"], written[-1]["magmoms"], atol=1e-7)
    frame, count = last_frame(tmp_path / name)
    assert count == 2 and frame.info["step"] == 10


def _three_frames(path):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.set_momenta(np.ones((4, 3)))
    with FrameWriter(path) as writer:
        for step in (1, 2, 3):
            writer.write(atoms, results(atoms, step), step, float(step))
    return atoms, path.read_text()


@pytest.mark.parametrize("cut", [60, 1, 400], ids=["mid-line", "last-newline", "mid-frame"])
def test_a_torn_final_frame_is_dropped_and_the_file_repaired(tmp_path, cut):
    path = tmp_path / "torn.extxyz"
    atoms, text = _three_frames(path)
    path.write_text(text[: len(text) - cut])  # killed while writing frame 3
    frame, count = last_frame(path)  # without repair: read, file untouched
    assert count == 2 and frame.info["step"] == 2
    assert path.read_text() == text[: len(text) - cut]
    frame, count = last_frame(path, repair=True)
    assert count == 2 and [f.info["step"] for f in read(path, ":")] == [1, 2]
    with FrameWriter(path, append=True) as writer:
        writer.write(atoms, results(atoms, 4), 4, 4.0)
    assert [f.info["step"] for f in read(path, ":")] == [1, 2, 4]


def test_a_damaged_frame_before_the_last_is_an_error_and_changes_nothing(tmp_path):
    path = tmp_path / "damaged.extxyz"
    _, text = _three_frames(path)
    lines = text.splitlines(keepends=True)
    damaged = "".join(lines[:6] + lines[7:])  # frame 1 lost an atom line
    path.write_text(damaged)
    with pytest.raises(ValueError, match="is damaged"):
        last_frame(path, repair=True)
    assert path.read_text() == damaged


def test_no_complete_frame_is_an_error(tmp_path):
    path = tmp_path / "empty.extxyz"
    path.write_text("4\nLattice=")
    with pytest.raises(ValueError, match="no complete frame"):
        last_frame(path)


def test_state_is_replaced_atomically_and_a_broken_one_is_ignored(tmp_path):
    trajectory = tmp_path / "run.traj"
    assert load_state(trajectory) is None
    save_state(trajectory, {"step": 3})
    save_state(trajectory, {"step": 4})
    assert load_state(trajectory) == {"step": 4}
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "run.traj.state.json").write_text("{not json")
    assert load_state(trajectory) is None


def test_thermo_log_columns_and_append(tmp_path):
    path = tmp_path / "run.log"
    row = dict(step=1, time_fs=1.0, epot_eV=-1.0, ekin_eV=0.5, etotal_eV=-0.5,
               temperature_K=300.0, pressure_GPa=float("nan"), volume_A3=10.0,
               seconds_per_step=0.1, graph_builds=1, imbalance=1.0)  # fmt: skip
    with ThermoLog(path) as log:
        log.write(**row)
    with ThermoLog(path, append=True) as log:
        log.write(**{**row, "step": 2})
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# step time_fs") and len(lines) == 3
    table = np.loadtxt(path)
    assert list(table[:, 0]) == [1, 2] and np.isnan(table[0, 6])


def test_json_only_stdout_sends_everything_else_to_stderr():
    """Python prints, C-level writes and child processes inside the block reach stderr; the
    JSON after it is all of stdout."""
    import subprocess
    import sys

    script = (
        "import os, subprocess, sys\n"
        "from distmlip.cli.output import json_only_stdout, print_json\n"
        "with json_only_stdout():\n"
        "    print('banner')\n"
        "    os.write(1, b'from C\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"child\")'])\n"
        "print_json({'energy': 1.5})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"energy": 1.5}
    assert done.stderr.split() == ["banner", "from", "C", "child"]


def test_ctrl_c_is_held_until_the_block_ends():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("after the signal")  # still runs: the frame gets written
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # and nothing was raised
    finally:
        signal.signal(signal.SIGINT, previous)


def test_trajectory_formats():
    assert trajectory_format("a.XYZ") == "extxyz" and trajectory_format("b.traj") == "traj"
    with pytest.raises(ValueError, match="name it .extxyz"):
        trajectory_format("c.pdb")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bulk:Al:fcc:4.05", BulkSpec("Al", "fcc", 4.05)),
        ("bulk:Cu:fcc", BulkSpec("Cu", "fcc")),
        ("bulk:Ni:fcc:3.52:cubic", BulkSpec("Ni", "fcc", 3.52, "cubic")),
        ("bulk:GaAs:zincblende:5.65", BulkSpec("GaAs", "zincblende", 5.65)),
    ],
)
def test_bulk_specs(text, expected):
    spec = structure_argument(text)
    assert spec == expected and str(spec) == text
    atoms = spec.build()
    reference = bulk(
        expected.symbol, expected.crystal, a=expected.a, cubic=expected.shape == "cubic"
    )
    np.testing.assert_allclose(atoms.cell[:], reference.cell[:])


@pytest.mark.parametrize(
    "text, message",
    [
        ("bulk:Al:fcc:abc", "neither a lattice constant"),
        ("bulk:Al:fcc:0", "lattice constant must be between 0 and 1000"),
        ("bulk::fcc:4", "a generator spec is"),
        ("bulk:Al:fcc:4:cubic:x", "a generator spec is"),
        ("bulk:Fe:hcp:2.5:cubic", "ase.build.bulk says"),
    ],
)
def test_bad_bulk_specs(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        structure_argument(text)


class _DiskFills:
    """``os`` as :mod:`distmlip.md.durable` sees it, but the disk fills during the first write:
    half the data goes out (a short write), then every write fails with ENOSPC."""

    def __init__(self):
        self.written = False

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data) -> int:
        import errno

        if self.written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written = True
        return os.write(fd, bytes(data[: len(data) // 2]))


def test_a_failed_append_is_cut_back_and_names_the_file(tmp_path, monkeypatch):
    import errno

    import distmlip.md.durable as durable

    path = tmp_path / "run.log"
    path.write_bytes(b"first record\n")
    fd = durable.open_appending(path, append=True)
    try:
        monkeypatch.setattr(durable, "os", _DiskFills())
        with pytest.raises(durable.OutputError) as caught:
            durable.append_durably(fd, b"second record, half written\n", path)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == b"first record\n"


def test_a_failed_replace_keeps_the_old_file_names_it_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    """The error names the file the user knows (not the temporary one beside it)."""
    import errno

    import distmlip.md.durable as durable

    target = tmp_path / "run.extxyz.state.json"
    target.write_text("old")
    monkeypatch.setattr(durable, "os", _DiskFills())
    with pytest.raises(durable.OutputError) as caught:
        durable.replace_durably(target, b"new " * 1000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == [target.name]
