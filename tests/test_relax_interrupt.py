"""An interrupted ``distmlip relax`` keeps its current structure; a full disk keeps the old
output and leaves no partial one."""

from __future__ import annotations

import errno
import os
import signal
import sys

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from test_interrupts import start_as_from_a_terminal

from distmlip import DistributedCalculator
from distmlip.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals"),
]


def start_structure(path) -> None:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)  # 108 atoms
    atoms.rattle(0.15, seed=7)
    write(path, atoms)


def energy(atoms) -> float:
    with DistributedCalculator("reference", nprocs=1, dtype="float64") as calc:
        return calc.get_potential_energy(atoms.copy())


@pytest.mark.parametrize("fault", ["sigint", "sigterm"])
def test_an_interrupted_relax_writes_its_current_structure_and_says_where(tmp_path, fault):
    start, output = tmp_path / "start.extxyz", tmp_path / "relaxed.extxyz"
    start_structure(start)
    command = [sys.executable, "-m", "distmlip", "relax", str(start), "--model", "reference"]
    command += ["--dtype", "float64", "--nprocs", "1", "--fmax", "1e-9", "--steps", "100000"]
    command += ["--output", str(output)]  # fmax unreachable: it runs until stopped
    driver = start_as_from_a_terminal(command)
    seen = []
    for line in driver.stderr:
        seen.append(line)
        if line.startswith("step 5:"):
            break
    if fault == "sigint":  # Ctrl-C in a terminal: the whole process group
        os.killpg(driver.pid, signal.SIGINT)
    else:  # a batch scheduler's time limit: the driver
        driver.terminate()
    _, rest = driver.communicate(timeout=90)
    stderr = "".join(seen) + rest
    assert driver.returncode == {"sigint": 130, "sigterm": 143}[fault], stderr
    last = stderr.strip().splitlines()[-1]
    prefix = {"sigint": "interrupted", "sigterm": "terminated (SIGTERM)"}[fault]
    assert last.startswith(f"distmlip: {prefix}; the structure after ") and str(output) in last
    steps = int(last.split("after ")[1].split()[0])
    assert steps >= 5
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    relaxed, initial = read(output), read(start)
    assert len(relaxed) == len(initial)
    assert np.abs(relaxed.positions - initial.positions).max() > 1e-3  # it moved
    assert energy(relaxed) < energy(initial)  # downhill: the relaxation's, not the input
    # The last *evaluated* step, not the one in progress (whose positions already moved).
    printed = [line for line in stderr.splitlines() if line.startswith(f"step {steps}: E ")]
    assert printed, stderr
    assert abs(float(printed[-1].split("E ")[1].split()[0]) - energy(relaxed)) < 2e-6


@pytest.mark.parametrize(("fault", "status"), [("sigterm", 143), ("ctrl-c", 130)])
def test_a_relax_stopped_while_its_workers_start_says_so(
    tmp_path, monkeypatch, capsys, fault, status
):
    import distmlip.cli.relax as relax_module
    from distmlip.cli import main
    from distmlip.cli.stopping import Terminated

    start, output = tmp_path / "start.extxyz", tmp_path / "relaxed.extxyz"
    start_structure(start)

    def starting(args, **options):
        raise Terminated if fault == "sigterm" else KeyboardInterrupt

    monkeypatch.setattr(relax_module, "worker_calculator", starting)
    assert main(["relax", str(start), "--model", "reference", "--output", str(output)]) == status
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "before the first step; nothing written to" in last and not output.exists()


def test_a_full_disk_keeps_the_old_output_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import ase.io

    start, output = tmp_path / "start.extxyz", tmp_path / "relaxed.extxyz"
    start_structure(start)
    output.write_text("an earlier result\n")
    real = ase.io.write

    def half_then_full(path, atoms, **options):
        """Half the file is written, then the disk is full."""
        real(path, atoms, **options)
        data = open(path, "rb").read()  # noqa: SIM115
        open(path, "wb").write(data[: len(data) // 2])  # noqa: SIM115
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ase.io, "write", half_then_full)
    argv = ["relax", str(start), "--model", "reference", "--nprocs", "1", "--steps", "3"]
    assert main([*argv, "--output", str(output), "--overwrite"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"distmlip: error: writing {output}: No space left on device;")
    assert output.read_text() == "an earlier result\n"
    assert sorted(os.listdir(tmp_path)) == ["relaxed.extxyz", "start.extxyz"]
