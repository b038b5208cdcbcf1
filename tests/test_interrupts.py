"""Interrupted calls, threads and dropped calculators: never a stale or wrong result.

A call can be abandoned at any point by an exception raised from a signal handler (Ctrl-C, an
alarm). Every test evaluates *distinct* structures and compares with fresh single-process
results, so a reply that belonged to an earlier structure cannot pass.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe

import numpy as np
import psutil
import pytest
from ase.build import bulk
from ase.io import write
from conftest import small_cell
from test_launch import assert_all_gone

from distmlip import DistributedCalculator
from distmlip.driver.pool import NoAnswer, collect_replies

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX signals"),
]


def structure(seed: int, repeat: int = 11):
    """fcc Cu (4·repeat³ atoms), rattled differently for every seed."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.08, seed=seed)
    return atoms


class Interrupted(Exception):
    """What the test's signal handler raises, like a user's alarm handler would."""


class Alarm:
    """Raise :class:`Interrupted` in the main thread ``delay`` seconds after arming, once;
    ``seen`` is what ``probe()`` returned then (where the call was)."""

    def __init__(self, probe=lambda: None):
        self.probe = probe
        self.seen = None

    def __enter__(self):
        self.armed = False
        self.fired = False
        self.previous = signal.signal(signal.SIGALRM, self._handler)
        return self

    def _handler(self, *_):
        if self.armed:
            self.armed = False
            self.fired = True
            self.seen = self.probe()
            raise Interrupted

    def arm(self, delay: float) -> None:
        self.fired = False
        self.armed = True
        signal.setitimer(signal.ITIMER_REAL, delay)

    def disarm(self) -> None:
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        self.disarm()
        signal.signal(signal.SIGALRM, self.previous)


def energy_and_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


@pytest.fixture(scope="module")
def fresh(reference_model):
    """Single-process results of structures 0..12 (computed by a separate calculator)."""
    with DistributedCalculator(reference_model, nprocs=1, timeout=120) as single:
        return {seed: energy_and_forces(single, structure(seed)) for seed in range(13)}


def assert_fresh(calc, seed, fresh):
    energy, forces = energy_and_forces(calc, structure(seed))
    expected_energy, expected_forces = fresh[seed]
    assert energy == pytest.approx(expected_energy, rel=1e-10, abs=1e-9), f"structure {seed}"
    np.testing.assert_allclose(forces, expected_forces, rtol=0, atol=1e-9)


def test_collect_replies_discards_replies_to_abandoned_requests():
    driver_ends, worker_ends = zip(*(Pipe() for _ in range(2)), strict=True)
    # Worker 0 still answers request 6, abandoned; then both answer request 7.
    worker_ends[0].send(("ok", 6, "stale"))
    worker_ends[0].send(("ok", 7, "rank 0"))
    worker_ends[1].send(("ok", 7, "rank 1"))
    assert collect_replies(list(driver_ends), 7, timeout=5) == ["rank 0", "rank 1"]
    # Only a stale reply: that is no answer, not a result.
    worker_ends[1].send(("ok", 7, "stale"))
    with pytest.raises(NoAnswer):
        collect_replies(list(driver_ends), 8, timeout=0.5)


def worker_children() -> set[int]:
    """pids of this process's distmlip workers, of every calculator."""
    return {p.pid for p in workers_of(psutil.Process())}


def workers_of(driver: psutil.Process) -> list[psutil.Process]:
    """The live distmlip workers of ``driver``: its children started as fresh interpreters,
    and its zygotes' children (distmlip.driver.zygote)."""
    workers = []
    for child in driver.children():
        if _runs(child, "distmlip.worker"):
            workers.append(child)
        elif _runs(child, "distmlip.worker.zygote"):
            workers += child.children()
    return [p for p in workers if _live(p)]


def _runs(process: psutil.Process, module: str) -> bool:
    try:
        return module in process.cmdline()
    except psutil.Error:  # it just exited
        return False


def _live(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_no_stray_workers(calc, others: set[int]) -> None:
    """Every worker of this process belongs to ``calc``'s live pool or to another calculator."""
    strays = worker_children() - others - set(calc.pool.pids)
    assert_all_gone(sorted(strays))


def test_exception_from_signal_handler_at_any_point_of_a_call(reference_model, fresh, monkeypatch):
    """Interrupt before the workers answer, while they compute and while they restart; every
    later call on another structure equals a fresh single-process result, and no worker of an
    abandoned call is left."""
    checks = iter(range(1, 13))
    others = worker_children()
    calc = DistributedCalculator(reference_model, nprocs=2, timeout=120)
    with calc, Alarm(probe=lambda: calc.pool._state) as alarm:
        assert_fresh(calc, 0, fresh)
        durations = []
        for _ in range(2):  # warm calls: the first call after a restart takes longer
            calc.reset()
            start = time.perf_counter()
            assert_fresh(calc, 0, fresh)
            durations.append(time.perf_counter() - start)
        duration = min(durations)
        # In the driver before sending, while the workers compute, late in their computation.
        seen = []
        for attempt, delay in enumerate((1e-4, 0.3 * duration, 0.5 * duration, 0.7 * duration)):
            pids = calc.pool.pids
            alarm.arm(delay)
            try:
                energy_and_forces(calc, structure(100 + attempt))
            except Interrupted:
                pass
            finally:
                alarm.disarm()
            assert alarm.fired, f"the call ended within {delay:.3f} s"
            seen.append(alarm.seen)
            if alarm.seen == "busy":  # the request was out: the abandoned call stopped them
                assert not calc.pool.running
                assert_all_gone(pids)
            else:  # before anything was sent: the workers are untouched
                assert alarm.seen == "ready" and calc.pool.pids == pids
            assert_no_stray_workers(calc, others)
            assert_fresh(calc, next(checks), fresh)
            assert_fresh(calc, next(checks), fresh)
        assert seen[0] == "ready" and seen.count("busy") >= 2, seen
        # During a restart, after the previous call was abandoned: workers forked by a zygote
        # (tenths of a second) and fresh interpreters (seconds). The alarm is armed as the
        # workers start: at once (while they are spawned) and a third of the way through.
        for method in ("fork", "exec"):
            monkeypatch.setenv("DISTMLIP_WORKER_START", method)
            startups = []
            for _ in range(2):  # the shorter of two starts
                calc.pool.close()
                start = time.perf_counter()
                calc.pool.start()
                startups.append(time.perf_counter() - start)
            spawn = type(calc.pool)._spawn
            for attempt, delay in enumerate((1e-4, 0.3 * min(startups))):
                calc.pool.close()

                def armed(workers, delay=delay, spawn=spawn):
                    alarm.arm(delay)
                    spawn(calc.pool, workers)

                monkeypatch.setattr(calc.pool, "_spawn", armed)
                with pytest.raises(Interrupted):
                    energy_and_forces(calc, structure(200 + attempt))
                alarm.disarm()
                monkeypatch.delattr(calc.pool, "_spawn")
                assert alarm.seen == "starting", (method, delay)
                assert_no_stray_workers(calc, others)
                assert_fresh(calc, next(checks), fresh)


def test_caught_keyboard_interrupt_then_correct_call(reference_model, fresh):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with DistributedCalculator(reference_model, nprocs=2, timeout=120) as calc:
            assert_fresh(calc, 0, fresh)
            timer = threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                energy_and_forces(calc, structure(9, repeat=12))  # seconds per call
            timer.join()
            assert_fresh(calc, 10, fresh)
            assert_fresh(calc, 11, fresh)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_two_threads_share_a_calculator(pools):
    frames = []
    for seed in range(40):
        atoms = small_cell()
        atoms.rattle(0.05, seed=100 + seed)
        frames.append(atoms)
    single = pools.get(1)
    expected = [energy_and_forces(single, atoms) for atoms in frames]
    calc = pools.get(2)
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def run(indices):
        try:
            for index in indices:
                results[index] = energy_and_forces(calc, frames[index])
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(range(k, 40, 2),)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == list(range(40))
    for index, (energy, forces) in results.items():
        assert energy == pytest.approx(expected[index][0], rel=1e-10), f"frame {index}"
        np.testing.assert_allclose(forces, expected[index][1], rtol=0, atol=1e-9)


def test_dropped_calculators_stop_their_workers(reference_model):
    """A calculator dropped without close() stops its workers when its last reference goes,
    without waiting for the garbage collector (no reference cycle)."""

    def use_once(seed):
        calc = DistributedCalculator(reference_model, nprocs=2, timeout=60)
        atoms = small_cell()
        atoms.calc = calc
        atoms.get_potential_energy()
        return calc.pool.pids

    collecting = gc.isenabled()
    gc.disable()
    try:
        for seed in range(3):
            pids = use_once(seed)
            assert_all_gone(pids, within=15)
    finally:
        if collecting:
            gc.enable()


def start_as_from_a_terminal(command: list[str]) -> subprocess.Popen:
    """``command`` in its own process group (so a test can SIGINT the group, as Ctrl-C does),
    with SIGINT's default disposition (see :func:`_interrupt_after`), output captured."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _interrupt_after(marker: str, command: list[str]) -> tuple[subprocess.Popen, str, str, list]:
    """Start ``command`` in its own process group, wait for ``marker`` on its stdout, then
    SIGINT the whole group (what Ctrl-C in a terminal does).

    The command starts with SIGINT's default disposition, as from a terminal: a test run
    launched as a background job of a non-interactive shell inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler at all."""
    driver = start_as_from_a_terminal(command)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if marker in line:
            break
    workers = workers_of(psutil.Process(driver.pid))
    assert len(workers) == 2, "".join(seen)
    time.sleep(0.5)
    assert driver.poll() is None, "the call ended before the interrupt"
    os.killpg(driver.pid, signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=60)
    return driver, "".join(seen) + stdout, stderr, workers


def test_ctrl_c_during_a_cli_call_prints_one_line(tmp_path):
    """SIGINT to the command's process group while the workers compute the second frame:
    one line on stderr, exit status 130, no worker left."""
    frames = [structure(0, repeat=2), structure(1, repeat=15)]  # 32 atoms, then 13,500
    path = tmp_path / "frames.extxyz"
    write(path, frames)
    command = [sys.executable, "-m", "distmlip", "predict", "--model", "reference"]
    command += ["--structure", str(path), "--nprocs", "2", "--timeout", "300"]
    driver, stdout, stderr, workers = _interrupt_after("      0     32", command)
    assert driver.returncode == 130
    assert stderr.strip().splitlines() == ["distmlip: interrupted"]
    assert "      1  13500" not in stdout  # the second frame was interrupted, not finished
    assert_all_gone([worker.pid for worker in workers])


SCRIPT = """
import sys
from ase.build import bulk
from ase.io import write
from distmlip import DistributedCalculator

def crystal(seed, repeat):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.08, seed=seed)
    return atoms

with DistributedCalculator("reference", nprocs=1) as single:
    expected = single.get_potential_energy(crystal(7, 3))
with DistributedCalculator("reference", nprocs=2, timeout=300) as calc:
    calc.get_potential_energy(crystal(6, 3))
    print("calling", flush=True)
    try:
        calc.get_potential_energy(crystal(5, 15))
    except KeyboardInterrupt:
        print("caught", file=sys.stderr)
    print(calc.get_potential_energy(crystal(7, 3)) - expected, flush=True)
"""


def test_script_that_catches_ctrl_c_goes_on_correctly(tmp_path):
    """Ctrl-C in a terminal while a script's call runs: the workers print nothing, the script
    catches the interrupt and its next call is correct."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    driver, stdout, stderr, workers = _interrupt_after("calling", [sys.executable, str(script)])
    assert driver.returncode == 0, stderr
    assert stderr.strip().splitlines() == ["caught"]
    assert abs(float(stdout.split()[-1])) < 1e-9
    assert_all_gone([worker.pid for worker in workers])
