"""CPU workers forked from a zygote (distmlip.driver.zygote): the same numbers, environment and
process handling as workers started as fresh interpreters."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import evaluate, small_cell
from test_launch import assert_all_gone

from distmlip import DistributedCalculator, WorkerError
from distmlip.driver.zygote import START_ENVIRONMENT, close_zygotes, start_method
from distmlip.exchange import Exchange
from distmlip.models.base import GraphInputs
from distmlip.models.reference import ReferenceMPNN

pytestmark = pytest.mark.skipif(
    start_method("cpu", False) != "fork", reason="workers are forked only on Linux"
)


def _parent(pid: int) -> psutil.Process:
    return psutil.Process(pid).parent()


def _is_zygote(process: psutil.Process) -> bool:
    return "distmlip.worker.zygote" in process.cmdline()


def _rattled():
    atoms = small_cell().repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    return atoms


def test_forked_workers_give_the_numbers_fresh_interpreters_give(reference_model, monkeypatch):
    results = {}
    for method in ("fork", "exec"):
        monkeypatch.setenv(START_ENVIRONMENT, method)
        with DistributedCalculator(reference_model, nprocs=3, partitioner="rcb") as calc:
            parents = {_parent(pid).pid for pid in calc.pool.pids}
            if method == "fork":
                assert len(parents) == 1 and _is_zygote(_parent(calc.pool.pids[0]))
            else:
                assert parents == {os.getpid()}
            results[method] = evaluate(calc, _rattled())
    for name in ("energy", "forces", "stress"):
        np.testing.assert_array_equal(results["fork"][name], results["exec"][name])


def test_one_zygote_serves_pool_after_pool_and_reaps_their_workers(reference_model):
    zygotes, workers = set(), []
    for _ in range(2):
        with DistributedCalculator(reference_model, nprocs=2) as calc:
            assert abs(evaluate(calc, small_cell())["energy"]) > 0
            zygotes |= {_parent(pid).pid for pid in calc.pool.pids}
            workers += calc.pool.pids
    assert len(zygotes) == 1
    assert_all_gone(workers)
    # Reaped: none is left as a zombie (the zygote may serve other pools' workers).
    children = {child.pid for child in psutil.Process(zygotes.pop()).children()}
    assert children.isdisjoint(workers), "the zygote left zombies"


def test_a_changed_environment_or_directory_gets_its_own_zygote(
    reference_model, monkeypatch, tmp_path
):
    def zygote_pid() -> int:
        with DistributedCalculator(reference_model, nprocs=1) as calc:
            return _parent(calc.pool.pids[0]).pid

    first = zygote_pid()
    assert zygote_pid() == first
    monkeypatch.setenv("DISTMLIP_TEST_MARK", "1")
    marked = zygote_pid()
    monkeypatch.chdir(tmp_path)
    assert len({first, marked, zygote_pid()}) == 3


class EnvironmentReportingToy(ReferenceMPNN):
    """Refuses every structure, saying what its worker's environment holds and where its
    C library serves a 4 MB allocation from (``heap``: glibc's ``MALLOC_MMAP_MAX_=0`` is in
    effect; ``mmap``: glibc's defaults)."""

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        address = libc.malloc(4 << 20)
        where = _region(address)
        libc.free(ctypes.c_void_p(address))
        report = " ".join(
            f"{name}={os.environ.get(name)}"
            for name in ("OMP_NUM_THREADS", "MALLOC_MMAP_MAX_", "DISTMLIP_TEST_MARK")
        )
        exchange.reject_if(True, f"{report} allocation={where} cwd={os.getcwd()}")
        return super().forward(inputs, exchange)


def _region(address: int) -> str:
    """``heap`` or ``mmap``: where ``address`` lies in this process's memory map."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(value, 16) for value in line.split()[0].split("-"))
            if start <= address < end:
                return "heap" if line.rstrip().endswith("[heap]") else "mmap"
    return "unknown"


@pytest.fixture
def on_worker_path(monkeypatch):
    """Workers can unpickle this module's models."""
    path = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("method", ["fork", "exec"])
def test_workers_have_the_pools_environment_and_allocator(
    method, on_worker_path, monkeypatch, tmp_path
):
    monkeypatch.setenv(START_ENVIRONMENT, method)
    monkeypatch.setenv("DISTMLIP_TEST_MARK", method)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    toy = EnvironmentReportingToy(cutoff=4.5, num_layers=1, hidden=4)
    reports = {}
    for allocator in ("keep", "system", "keep"):  # keep after system: from the same zygote
        with DistributedCalculator(toy, nprocs=2, allocator=allocator, timeout=60) as calc:
            with pytest.raises(ValueError) as refused:
                calc.get_properties(["energy"], small_cell())
            reports[allocator] = str(refused.value)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for allocator, mmap_max, region in (("keep", "0", "heap"), ("system", "None", "mmap")):
        report = reports[allocator]
        assert f"OMP_NUM_THREADS={threads} " in report, report
        assert f"MALLOC_MMAP_MAX_={mmap_max} " in report, report
        assert f"DISTMLIP_TEST_MARK={method} " in report, report
        assert f"allocation={region} " in report, report
        assert f"cwd={os.getcwd()}" in report, report


class TalkativeToy(ReferenceMPNN):
    """Writes to standard output and error in its worker, as models' banners and warnings do
    (both buffered: neither is a terminal here)."""

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        print(f"banner of worker {os.getpid()}")
        sys.stderr.write(f"[warning of worker {os.getpid()}]")
        return super().forward(inputs, exchange)


@pytest.mark.parametrize("method", ["fork", "exec"])
def test_workers_write_where_the_drivers_output_goes_now_and_nothing_is_lost(
    method, on_worker_path, monkeypatch, tmp_path
):
    """A worker's output goes where the driver's standard output and error point when the pool
    starts (the command line points stdout at stderr during a --json run), also when its
    zygote started before; what it wrote before it exited is all there."""
    from distmlip.driver.zygote import prestart

    monkeypatch.setenv(START_ENVIRONMENT, method)
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # the workers' streams buffer
    prestart()  # a zygote that starts with this process's streams as they are now
    files = {fd: tmp_path / f"fd{fd}" for fd in (1, 2)}
    saved = {fd: os.dup(fd) for fd in files}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, path in files.items():
            opened = os.open(path, os.O_WRONLY | os.O_CREAT)
            os.dup2(opened, fd)
            os.close(opened)
        toy = TalkativeToy(cutoff=4.5, num_layers=1, hidden=4)
        with DistributedCalculator(toy, nprocs=2, timeout=60) as calc:
            calc.get_properties(["energy"], small_cell())
            pids = calc.pool.pids
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
    assert_all_gone(pids)
    out, err = (files[fd].read_text() for fd in (1, 2))
    for pid in pids:
        assert f"banner of worker {pid}" in out, out
        assert f"[warning of worker {pid}]" in err, err


def test_a_killed_forked_worker_reports_its_signal(reference_model):
    calc = DistributedCalculator(reference_model, nprocs=2, timeout=30)
    try:
        pids = calc.pool.pids
        os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(
            WorkerError, match=rf"worker 1 \(pid {pids[1]}\) died with exit code -9"
        ):
            evaluate(calc, small_cell())
        assert_all_gone(pids)
    finally:
        calc.close()


def test_workers_outlive_a_zygote_that_dies(reference_model):
    """A zygote that fails (or is stopped) takes no running pool with it; the next pool gets
    a new zygote."""
    calc = DistributedCalculator(reference_model, nprocs=2, timeout=30)
    try:
        before = evaluate(calc, small_cell())
        pids = calc.pool.pids
        zygote = _parent(pids[0])
        zygote.kill()
        zygote.wait(10)
        after = evaluate(calc, small_cell())
        assert calc.pool.pids == pids
        assert after["energy"] == before["energy"]
    finally:
        calc.close()
    assert_all_gone(pids)
    with DistributedCalculator(reference_model, nprocs=1) as fresh:
        assert _is_zygote(_parent(fresh.pool.pids[0]))
        assert _parent(fresh.pool.pids[0]).pid != zygote.pid


def test_without_a_zygote_workers_start_as_fresh_interpreters(reference_model, monkeypatch):
    from distmlip.driver import zygote

    def cannot_start(*args, **kwargs):
        raise OSError("no zygote today")

    close_zygotes()
    monkeypatch.setattr(zygote, "_Zygote", cannot_start)
    with DistributedCalculator(reference_model, nprocs=2) as calc:
        assert {_parent(pid).pid for pid in calc.pool.pids} == {os.getpid()}
        assert abs(evaluate(calc, small_cell())["energy"]) > 0


def test_start_method_rules(monkeypatch):
    assert start_method("cpu", False) == "fork"
    assert start_method("cuda", False) == "exec"  # a fork must not inherit CUDA
    assert start_method("cpu", True) == "exec"  # a torchrun/SLURM rank runs in its own job
    monkeypatch.setenv(START_ENVIRONMENT, "exec")
    assert start_method("cpu", False) == "exec"
    monkeypatch.setenv(START_ENVIRONMENT, "spawn")
    with pytest.raises(ValueError, match=r"^DISTMLIP_WORKER_START='spawn': use 'fork'"):
        DistributedCalculator("reference", nprocs=1)


def test_a_new_zygote_gets_the_start_up_time_even_with_nothing_to_preload(
    reference_model, monkeypatch
):
    """The first answer of a zygote waits for it to import torch (seconds), also when the
    model names no installed module to preload; later answers are quick (a fork)."""
    from distmlip.driver import pool as launch
    from distmlip.driver import zygote

    monkeypatch.setattr(launch, "preload_modules", lambda model: ())
    monkeypatch.setattr(zygote, "_REPLY_TIMEOUT", 0.5)  # < importing torch, > forking
    monkeypatch.setenv("DISTMLIP_TEST_MARK", "nothing to preload")  # a zygote of its own
    with DistributedCalculator(reference_model, nprocs=2) as calc:
        assert all(_is_zygote(_parent(pid)) for pid in calc.pool.pids)
        assert abs(evaluate(calc, small_cell())["energy"]) > 0


def _zygotes_of_this_process() -> set[int]:
    return {child.pid for child in psutil.Process().children() if _is_zygote(child)}


def test_a_prestarted_zygote_is_claimed_by_the_next_pool(reference_model, monkeypatch):
    """prestart's zygote imports torch while the caller goes on; the next pool with the same
    environment and working directory forks from it, and starts no other."""
    from distmlip.driver.zygote import prestart

    monkeypatch.setenv("DISTMLIP_TEST_MARK", "prestarted")
    before = _zygotes_of_this_process()
    prestart()
    prestart()  # one spare per environment and directory
    (spare,) = _zygotes_of_this_process() - before
    with DistributedCalculator(reference_model, nprocs=2) as calc:
        assert {_parent(pid).pid for pid in calc.pool.pids} == {spare}
        assert abs(evaluate(calc, small_cell())["energy"]) > 0
    assert _zygotes_of_this_process() - before == {spare}
    prestart()  # a zygote for these packages runs: nothing more is started
    assert _zygotes_of_this_process() - before == {spare}


def test_a_spare_that_imported_another_package_is_not_forked_for_this_model(
    reference_model, monkeypatch
):
    """A spare that imported a package the model does not need (here ase) is stopped, and
    the pool gets a zygote that imported only what its model needs."""
    from distmlip.driver.zygote import prestart

    monkeypatch.setenv("DISTMLIP_TEST_MARK", "another package")
    before = _zygotes_of_this_process()
    prestart(("ase.io",))
    (spare,) = _zygotes_of_this_process() - before
    with DistributedCalculator(reference_model, nprocs=1) as calc:
        (zygote,) = {_parent(pid).pid for pid in calc.pool.pids}
        assert zygote != spare
    assert_all_gone([spare])


def test_an_unclaimed_spare_is_stopped(monkeypatch):
    from distmlip.driver.zygote import discard_spares, prestart

    monkeypatch.setenv("DISTMLIP_TEST_MARK", "unclaimed")
    before = _zygotes_of_this_process()
    prestart()
    spares = _zygotes_of_this_process() - before
    assert len(spares) == 1
    discard_spares()
    assert_all_gone(sorted(spares))


@pytest.mark.parametrize("model", ["reference", "chgnet"])
def test_the_command_line_forks_its_workers_from_the_zygote_it_prestarted(
    model, monkeypatch, tmp_path, capsys
):
    """`distmlip predict` starts the zygote before it loads the model; its pool claims it
    (one zygote started in all) and none is left unclaimed."""
    from distmlip.cli import main
    from distmlip.driver import zygote

    started = []
    original = zygote._Zygote.__init__

    def counting(self, environment):
        started.append(self)
        original(self, environment)

    monkeypatch.setattr(zygote._Zygote, "__init__", counting)
    monkeypatch.chdir(tmp_path)  # a directory no zygote serves yet
    argv = ["predict", "--model", model, "--size", "2", "--nprocs", "2", "--json"]
    assert main(argv) == 0
    assert '"energy"' in capsys.readouterr().out
    assert len(started) == 1 and started[0].alive()
    started[0].discard()  # it serves tmp_path, which no other test uses
