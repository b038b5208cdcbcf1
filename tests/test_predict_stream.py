"""``predict --json`` on several frames: a document streamed frame by frame, closed on Ctrl-C,
SIGTERM or a failure, and frames numbered by their index in the file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from test_interrupts import start_as_from_a_terminal

from distmlip import DistributedCalculator
from distmlip.cli import main
from distmlip.cli.structures import frame_numbers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals"),
]


def copper_frames(count: int) -> list:
    """``count`` distinct 32-atom fcc Cu frames (rattled with seeds 0, 1, ...)."""
    frames = []
    for seed in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.rattle(0.05, seed=seed)
        frames.append(atoms)
    return frames


def write_many_frames(path, count: int) -> None:
    """``count`` 4-atom fcc Cu frames as extended XYZ text (ASE's writer takes minutes for
    100,000); frame i has its first atom displaced by i × 1e-6 Å, so every frame differs."""
    head = 'Lattice="3.61 0 0 0 3.61 0 0 0 3.61" Properties=species:S:1:pos:R:3 pbc="T T T"'
    rest = "Cu 0.0 1.805 1.805\nCu 1.805 0.0 1.805\nCu 1.805 1.805 0.0\n"
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(f"4\n{head}\nCu {0.05 + i * 1e-6:.7f} 0.02 0.0\n{rest}")


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interrupted_json_run_keeps_every_computed_frame(tmp_path, stop):
    """300 frames, stopped once three are on stdout: stdout is one JSON document with the
    frames computed, each equal to a fresh run's, and says it was cut short."""
    path = tmp_path / "frames.extxyz"
    write(path, copper_frames(300))
    command = [sys.executable, "-m", "distmlip", "predict", str(path), "--model", "reference"]
    command += ["--nprocs", "2", "--timeout", "300", "--json"]
    driver = start_as_from_a_terminal(command)
    seen, done = [], 0
    for line in driver.stdout:
        seen.append(line)
        done += line.strip().startswith('"frame": ')
        if done == 3:
            break
    assert driver.poll() is None, "".join(seen) + driver.stderr.read()
    if stop == "ctrl-c":  # the whole process group, as a terminal does
        os.killpg(driver.pid, signal.SIGINT)
    else:  # a batch scheduler's time limit: the command alone
        os.kill(driver.pid, signal.SIGTERM)
    # Not communicate(): it reads the pipe itself and would lose what the loop above buffered.
    stdout, stderr = driver.stdout.read(), driver.stderr.read()
    driver.wait(timeout=60)
    document = json.loads("".join(seen) + stdout)
    last = stderr.strip().splitlines()[-1]
    if stop == "ctrl-c":
        assert driver.returncode == 130 and last == "distmlip: interrupted", stderr
    else:  # as md and relax: 143, and how far it got
        assert driver.returncode == 143, stderr
        kept = len(document["frames"])
        # A frame may have been evaluated after the last one written.
        said = re.escape("distmlip: terminated (SIGTERM); ") + f"({kept}|{kept + 1})"
        assert re.fullmatch(f"{said} of 300 frames evaluated; {kept} on stdout", last), last
    assert document["interrupted"] is True
    assert document["reason"] == (
        "interrupted (Ctrl-C)" if stop == "ctrl-c" else "terminated (SIGTERM)"
    )
    kept = document["frames"]
    assert document["frames_selected"] == 300 and 3 <= len(kept) < 300
    assert [frame["frame"] for frame in kept] == list(range(len(kept)))
    frames = read(path, index=f":{len(kept)}")
    with DistributedCalculator("reference", nprocs=2, timeout=120) as calc:
        for frame, atoms in zip(kept, frames, strict=True):
            atoms.calc = calc
            assert frame["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
            np.testing.assert_allclose(frame["forces"], atoms.get_forces(), rtol=0, atol=1e-10)


def test_a_complete_json_run_is_one_document_closed_as_not_interrupted(tmp_path):
    path = tmp_path / "frames.extxyz"
    write(path, copper_frames(3))
    argv = [sys.executable, "-m", "distmlip", "predict", str(path), "--model", "reference"]
    done = subprocess.run([*argv, "--nprocs", "1", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # the whole of stdout: banners went to stderr
    assert document["interrupted"] is False and "reason" not in document
    assert [frame["frame"] for frame in document["frames"]] == [0, 1, 2]
    assert document["frames_selected"] == 3 and document["units"]["energy"] == "eV"


def test_a_bad_frame_closes_the_document_with_the_frames_before_it(tmp_path, capfd):
    path = tmp_path / "bad_frame.xyz"
    path.write_text("2\n\nCu 0 0 0\nCu 0 0 2.5\n2\n\nCu 0 0 0\nCu 0 0 0\n")
    argv = ["predict", str(path), "--model", "reference", "--nprocs", "1", "--json"]
    assert main(argv) == 1
    captured = capfd.readouterr()
    assert captured.err.strip().splitlines()[-1].startswith("distmlip: error: frame 1 of")
    document = json.loads(captured.out)
    assert [frame["frame"] for frame in document["frames"]] == [0]
    assert document["interrupted"] is True and "frame 1 of" in document["reason"]


@pytest.mark.parametrize(
    "index",
    [0, 5, 11, -1, -12, slice(None), slice(7, 9), slice(-3, None), slice(None, -9),
     slice(None, None, -2), slice(2, None, 3), slice(1, -1, 4), slice(-1, None, -3), slice(20, 30)],
)  # fmt: skip
def test_frame_numbers_are_the_files_indices(tmp_path, index):
    path = tmp_path / "frames.extxyz"
    write_many_frames(path, 12)
    selected = read(path, index=index)
    selected = selected if isinstance(selected, list) else [selected]
    expected = list(range(12))[index]
    expected = expected if isinstance(expected, list) else [expected]
    assert frame_numbers(path, index, len(selected)) == expected
    for number, atoms in zip(expected, selected, strict=True):  # the frames ASE read: those
        assert atoms.positions[0, 0] == pytest.approx(0.05 + number * 1e-6, abs=1e-9)


def test_predict_labels_frames_by_their_index_in_a_100000_frame_file(tmp_path, capfd):
    path = tmp_path / "many.extxyz"
    write_many_frames(path, 100_000)
    common = ["predict", str(path), "--model", "reference", "--nprocs", "1", "--json"]
    assert main([*common, "--index", "-1"]) == 0
    last = json.loads(capfd.readouterr().out)
    assert last["frame"] == 99_999
    assert main([*common, "--index", "7:9"]) == 0
    pair = json.loads(capfd.readouterr().out)["frames"]
    assert [frame["frame"] for frame in pair] == [7, 8]
    assert main([*common[:-1], "--index=-3:"]) == 0  # the table too
    rows = [line.split() for line in capfd.readouterr().out.splitlines()]
    assert [row[0] for row in rows if row and row[0].isdigit()] == ["99997", "99998", "99999"]
    with DistributedCalculator("reference", nprocs=1, timeout=60) as calc:
        for frame in [last, *pair]:
            atoms = read(path, index=frame["frame"])
            atoms.calc = calc
            assert frame["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-12)


def test_an_extxyz_file_is_counted_by_its_lines_without_parsing_frames(tmp_path, monkeypatch):
    """Indices from the end count an extended XYZ file's frames by skipping lines: ASE's parser
    (seconds per 10,000 frames) is not used."""
    import ase.io

    path = tmp_path / "frames.extxyz"
    write_many_frames(path, 1000)

    def parse(*args, **kwargs):
        raise AssertionError("the frames were parsed to count them")

    monkeypatch.setattr(ase.io, "iread", parse)
    assert frame_numbers(path, -1, 1) == [999]
    assert frame_numbers(path, slice(-3, None), 3) == [997, 998, 999]


@pytest.mark.parametrize("suffix", [".extxyz", ".traj"])
def test_a_negative_index_before_the_first_frame_is_refused_not_read_as_frame_0(
    tmp_path, capfd, suffix
):
    """ASE reads ``-11`` of a 10-frame file as frame 0: predict, md and relax must refuse it
    (as they refuse index 10), and ``-10`` is frame 0, labelled 0."""
    path = tmp_path / f"ten{suffix}"
    write(path, copper_frames(10))
    for command in ("predict", "md", "relax"):
        argv = [command, str(path), "--index=-11", "--model", "reference", "--nprocs", "1"]
        assert main(argv) == 1
        err = capfd.readouterr().err
        assert "has no frame at index -11 (it has 10 frames)" in err, err
    argv = ["predict", str(path), "--index=-10", "--model", "reference", "--nprocs", "1"]
    assert main([*argv, "--json"]) == 0
    document = json.loads(capfd.readouterr().out)
    first = copper_frames(1)[0]
    assert np.allclose(document["forces"], _reference_forces(first), atol=1e-10)


def _reference_forces(atoms):
    with DistributedCalculator("reference", nprocs=1) as calc:
        atoms.calc = calc
        return atoms.get_forces()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_run_stopped_before_its_first_frame_still_prints_a_closed_document(
    tmp_path, capfd, monkeypatch, stop
):
    """Ctrl-C (or a failure) while the workers start: an empty, closed document, not nothing."""
    import distmlip.cli.predict as predict_module

    path = tmp_path / "three.extxyz"
    write(path, copper_frames(3))

    def no_workers(args, **options):
        raise stop("while the workers start")

    monkeypatch.setattr(predict_module, "worker_calculator", no_workers)
    status = main(["predict", str(path), "--model", "reference", "--json"])
    assert status == (130 if stop is KeyboardInterrupt else 1)
    document = json.loads(capfd.readouterr().out)
    assert document["frames"] == [] and document["interrupted"] is True
    assert document["frames_selected"] == 3 and document["startup_s"] is None
