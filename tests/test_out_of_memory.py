"""Out of memory is an answer, not a crash; and how much memory a structure will need.

A worker that runs out of memory (under ``memory_limit``, or the GPU's) raises one
``OutOfMemoryError`` in the driver that says what it held, what it had and what to change,
at once (its peers, waiting for it in an exchange, are not waited for); the next call works.
``estimate_memory`` predicts the per-worker peak of a larger structure from smaller ones.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.cluster import Icosahedron

from distmlip import DistributedCalculator, OutOfMemoryError, WorkerError
from distmlip.capacity import carve, repeat_counts
from distmlip.driver.failures import KILLED_HINT, out_of_memory_message
from distmlip.graphs.neighbors import neighbor_list
from distmlip.graphs.structure import Structure
from distmlip.graphs.validate import validate_structure
from distmlip.options import WorkerOptions, check_memory_limit
from distmlip.worker.memory import PeakMemory, out_of_memory_kind, requested_bytes

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

CPU_MESSAGE = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)"
)
CUDA_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.14 GiB "
    "of which 3.50 MiB is free."
)


def copper(n: int):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    atoms.rattle(0.05, seed=0)
    return atoms


# --- classification and message: pure functions ---------------------------------------------


def test_the_three_kinds_of_out_of_memory_are_recognised():
    assert out_of_memory_kind(MemoryError()) == "cpu"
    with pytest.raises(MemoryError) as numpy_error:  # numpy's own, from a failed malloc
        np.empty(2**60, dtype=np.uint8)
    assert out_of_memory_kind(numpy_error.value) == "cpu"
    assert out_of_memory_kind(RuntimeError(CPU_MESSAGE)) == "cpu"
    assert out_of_memory_kind(torch.OutOfMemoryError(CUDA_MESSAGE)) == "cuda"
    assert out_of_memory_kind(RuntimeError(CUDA_MESSAGE)) == "cuda"  # older torch, or wrapped
    for other in (RuntimeError("shapes do not match"), ValueError("bad"), KeyError("x")):
        assert out_of_memory_kind(other) is None
    try:  # raised while handling one, or from one
        try:
            raise MemoryError
        except MemoryError as error:
            raise RuntimeError("the model failed") from error
    except RuntimeError as wrapped:
        assert out_of_memory_kind(wrapped) == "cpu"


def test_requested_sizes_are_read_from_the_messages():
    assert requested_bytes(CPU_MESSAGE) == 3221225472
    assert requested_bytes(CUDA_MESSAGE) == 20 * 2**20
    assert requested_bytes("Unable to allocate 7.45 GiB for an array") == 7.45 * 2**30
    assert requested_bytes("out of memory") is None


REPORT = {
    "kind": "cpu",
    "phase": "evaluating",
    "error": "RuntimeError: DefaultCPUAllocator: can't allocate memory",
    "requested_bytes": 19048448.0,
    "n_atoms": 4000,
    "owned_atoms": 2000,
    "halo_atoms": 986,
    "computed_atoms": 2000,
    "edges": 84000,
    "peak_rss_mb": 484.3,
    "memory_limit_mb": 512.0,
    "machine_mb": 24105.5,
    "cgroup_limit_mb": None,
}


def test_message_names_worker_atoms_memory_and_remedies():
    message = out_of_memory_message(1, REPORT, nprocs=2)
    assert "\n" not in message
    assert message.startswith("worker 1 ran out of memory (could not allocate 18.2 MB)")
    assert "2,000 owned + 986 halo atoms and 84,000 edges of a 4,000-atom structure" in message
    assert "peak RSS 484 MB, memory_limit 512 MB, machine 23.5 GB" in message
    for remedy in ("nprocs > 2", "checkpoint=True", "a larger memory_limit", "smaller structure"):
        assert remedy in message
    assert "estimate_memory" in message

    gpu = {**REPORT, "kind": "cuda", "memory_limit_mb": None, "gpu_total_mb": 81040.0}
    gpu.update(gpu_peak_mb=80000.0, computed_atoms=2500, requested_bytes=None)
    message = out_of_memory_message(0, gpu, nprocs=4)
    assert message.startswith("worker 0 ran out of GPU memory (RuntimeError: DefaultCPU")
    assert "2,500 computed" in message  # the ghost baseline's recomputed atoms
    assert "GPU peak allocated 78.1 GB of 79.1 GB" in message
    assert "memory_limit" not in message and "nprocs > 4" in message

    starting = {"kind": "cpu", "phase": "starting", "error": "MemoryError", "peak_rss_mb": 200.0}
    message = out_of_memory_message(0, starting, nprocs=2)
    assert message.startswith(
        "worker 0 ran out of memory (MemoryError) while starting (loading the model); peak RSS"
    )


def test_memory_limit_is_checked():
    assert WorkerOptions().memory_limit is None
    assert WorkerOptions(memory_limit=2).memory_limit == 2.0
    assert check_memory_limit(0.5) == 0.5
    for bad in (0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="memory_limit must be"):
            WorkerOptions(memory_limit=bad)
    with pytest.raises(ValueError, match="memory_limit bounds CPU workers"):
        WorkerOptions(device="cuda", memory_limit=4.0)
    with pytest.raises(ValueError, match="memory_limit must be"):
        DistributedCalculator("reference", nprocs=1, memory_limit=-1)


@linux
def test_per_call_peak_resets_and_lifetime_peak_stays():
    peaks = PeakMemory()
    peaks.start()
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    del block
    first = peaks.stats()
    peaks.start()
    second = peaks.stats()
    assert first["call_peak_rss_mb"] > second["call_peak_rss_mb"] + 150
    assert second["peak_rss_mb"] >= first["call_peak_rss_mb"]


# --- real workers ---------------------------------------------------------------------------


@pytest.mark.slow
@linux
def test_worker_out_of_memory_is_one_clear_error_and_the_next_call_works():
    """A 4,000-atom call needs ~700 MB per worker, a 500-atom one ~320 MB (baseline ~230 MB)."""
    with DistributedCalculator(
        "reference", nprocs=2, timeout=60, memory_limit=0.5, threads_per_worker=1
    ) as calc:
        pids = calc.pool.pids
        start = time.monotonic()
        with pytest.raises(OutOfMemoryError) as caught:
            calc.compute(Structure.from_ase(copper(10)))
        # The worker answers at once; its peers, stuck in an exchange, are not waited for (that
        # would take the 60 s timeout). Measured (docs/performance.md, "Bound"): 0.65-1.0 s
        # idle, 1.5-1.7 s beside a two-worker job on this 2-core VM: 5 s leaves 3x for load.
        assert time.monotonic() - start < 5
        error = caught.value
        assert isinstance(error, WorkerError) and isinstance(error, MemoryError)
        message = str(error)
        assert "\n" not in message
        assert message.startswith("evaluating: worker ")
        assert "ran out of memory" in message
        assert "2,000 owned + " in message and " halo atoms and " in message
        assert "of a 4,000-atom structure" in message
        assert "memory_limit 512 MB" in message and "peak RSS" in message
        assert "nprocs > 2" in message and "checkpoint=True" in message
        assert "restart on the next call" in message
        assert error.report["owned_atoms"] == 2000 and error.report["edges"] > 80000
        assert "Traceback" in error.worker_traceback
        small = calc.compute(Structure.from_ase(copper(5)))
        assert np.isfinite(small["energy"]) and np.abs(small["forces"]).max() > 0
        assert set(calc.pool.pids).isdisjoint(pids)
        assert max(s["call_peak_rss_mb"] for s in calc.last_stats) < 512


@linux
def test_out_of_memory_while_starting_is_the_same_clear_error():
    with pytest.raises(OutOfMemoryError, match=r"^starting workers: worker \d ran out of memory"):
        DistributedCalculator("reference", nprocs=1, timeout=60, memory_limit=0.05)


@linux
@pytest.mark.parametrize("method", ["fork", "exec"])
def test_a_limit_below_what_a_worker_needs_to_start_says_to_raise_it(method, monkeypatch):
    """Near torch's own footprint a worker fails in ways that do not say "memory" (an
    allocator's or a new thread's EAGAIN, OpenBLAS exiting), while starting or in its first
    call (a worker forked from a zygote inherits its modules: it starts in less): the error
    names the limit either way."""
    monkeypatch.setenv("DISTMLIP_WORKER_START", method)
    with pytest.raises(WorkerError, match="^(starting workers|evaluating)") as caught:
        with DistributedCalculator("reference", nprocs=1, timeout=60, memory_limit=0.2) as calc:
            calc.compute(Structure.from_ase(copper(2)))
    assert "memory_limit" in str(caught.value) and "\n" not in str(caught.value)


def test_a_worker_killed_by_sigkill_is_said_to_be_probably_out_of_memory(reference_model):
    with DistributedCalculator(reference_model, nprocs=2, timeout=30) as calc:
        os.kill(calc.pool.pids[1], signal.SIGKILL)
        time.sleep(0.2)
        with pytest.raises(WorkerError, match="died with exit code -9") as caught:
            calc.compute(Structure.from_ase(copper(2)))
        assert KILLED_HINT in str(caught.value) and "\n" not in str(caught.value)


# --- capacity -------------------------------------------------------------------------------


def _edges_per_atom(structure: Structure, cutoff: float = 5.0) -> float:
    edges = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    return len(edges) / structure.n_atoms


@pytest.mark.parametrize(
    ("atoms", "counts"),
    [
        (bulk("Cu", "fcc", a=3.61, cubic=True).repeat(6), [6, 6, 6]),
        # Primitive cells: L/7 of a 6-cell axis is off by only 0.36 Å, and must not pass.
        (bulk("Cu", "fcc", a=3.61).repeat((6, 7, 8)), [6, 7, 8]),
        (fcc111("Cu", size=(6, 6, 5), vacuum=8.0), [6, 6, 1]),
        (bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat(4), [4, 4, 4]),
    ],
)
def test_calibration_pieces_are_smaller_supercells_of_the_target(atoms, counts):
    atoms.rattle(0.05, seed=1)
    target = Structure.from_ase(atoms)
    assert repeat_counts(target) == counts
    for fraction in (0.125, 0.25, 0.5):
        piece, periodic = carve(target, fraction)
        validate_structure(piece, 2)  # no overlapping atoms at the cuts
        assert periodic and piece.n_atoms <= fraction * target.n_atoms
        assert piece.pbc.tolist() == target.pbc.tolist()
        # The same environment: the same edges per atom as the target (rattle aside).
        assert _edges_per_atom(piece) == pytest.approx(_edges_per_atom(target), rel=0.02)


def test_targets_without_periods_are_cut_open():
    cluster = Icosahedron("Cu", noshells=5)
    cluster.center(vacuum=6.0)
    cluster.pbc = False
    target = Structure.from_ase(cluster)
    assert repeat_counts(target) == [1, 1, 1]
    piece, periodic = carve(target, 0.25)
    validate_structure(piece, 2)
    assert not periodic and 0 < piece.n_atoms <= 0.25 * target.n_atoms


REFERENCE_TOLERANCE = 0.25
CHGNET_TOLERANCE = 0.15
"""What the docs claim of ``estimate_memory`` (README, docs/performance.md "Capacity"), per
worker and for the peak, relative to the measured per-call peak. Measured with the targets of
the tests below (``python benchmarks/memory_estimate.py --runs 8``, this 2-core VM): the
reference model −12 % to +8 % per worker (by hand earlier, −12 % to +21 % in 32 runs:
allocator="keep" makes peaks scatter by ±10 % between workers and runs), CHGNet −4 % to +11 %
(by hand earlier, −7 % to +8 % in 16 runs)."""


def _assert_within(estimate, calc, tolerance: float) -> None:
    measured = [s["call_peak_rss_mb"] for s in calc.last_stats]
    assert estimate.edges == [s["edges"] for s in calc.last_stats]  # the same partition
    assert estimate.owned_atoms == [s["owned_atoms"] for s in calc.last_stats]
    for rank, (predicted, peak) in enumerate(zip(estimate.per_worker_mb, measured, strict=True)):
        assert abs(predicted - peak) <= tolerance * peak, (rank, predicted, peak)
    assert abs(estimate.peak_mb - max(measured)) <= tolerance * max(measured)


@pytest.mark.slow
@linux
def test_estimate_predicts_the_peak_of_a_larger_structure(reference_model):
    atoms = copper(10)  # 4,000 atoms; calibration structures up to half of it
    with DistributedCalculator(reference_model, nprocs=2, timeout=120) as calc:
        estimate = calc.estimate_memory(atoms)
        assert estimate.nprocs == 2 and estimate.n_atoms == 4000
        assert len(estimate.calibration) >= 3
        assert all(r["atoms"] <= 2000 and r["periodic"] for r in estimate.calibration)
        assert estimate.mb_per_edge > 0 and 100 < estimate.base_mb < 1000
        calc.compute(Structure.from_ase(atoms))
        _assert_within(estimate, calc, REFERENCE_TOLERANCE)
        other = calc.estimate_memory(atoms, nprocs=4)  # predictions for another P: smaller
        assert other.nprocs == 4 and other.peak_mb < estimate.peak_mb
        assert sum(other.owned_atoms) == 4000
        with pytest.raises(ValueError, match="nprocs"):
            calc.estimate_memory(atoms, nprocs=0)


@pytest.mark.slow
@linux
def test_estimate_for_chgnet():
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat((4, 4, 5))  # 640 atoms
    atoms.rattle(0.03, seed=0)
    with DistributedCalculator(
        "chgnet", nprocs=2, partitioner="rcb", dtype="float32", timeout=600
    ) as calc:
        estimate = calc.estimate_memory(atoms)
        assert max(r["atoms"] for r in estimate.calibration) <= 320
        calc.compute(Structure.from_ase(atoms))
        _assert_within(estimate, calc, CHGNET_TOLERANCE)


@linux
def test_estimate_command_prints_json(tmp_path, capsys):
    from ase.io import write

    from distmlip.cli import main

    path = tmp_path / "cu.xyz"
    write(path, [copper(5), copper(6)])  # the last frame (864 atoms) by default
    argv = ["estimate", str(path), "--model", "reference", "--nprocs", "3", "--json"]
    assert main([*argv, "--memory-limit", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory_limit_mb"] == 50 * 1024 and report["exceeds_limit"] is False
    assert report["nprocs"] == 3 and report["n_atoms"] == 864
    assert len(report["per_worker_mb"]) == 3 and report["peak_mb"] == max(report["per_worker_mb"])
    assert report["calibration_nprocs"] == 2 and len(report["calibration"]) >= 2
    status = main(["estimate", str(path), "--model", "reference", "--index", ":"])
    assert status == 2
    started = time.monotonic()  # P larger than the atoms: refused before any worker starts
    assert main(["estimate", "bulk:Cu:fcc:3.61", "--repeat", "2", "1", "1", "--nprocs", "3"]) == 2
    assert "--nprocs 3 is larger than the structure's 2 atoms" in capsys.readouterr().err
    assert time.monotonic() - started < 2


def test_an_estimate_above_the_memory_limit_says_so():
    from distmlip.capacity import MemoryEstimate

    estimate = MemoryEstimate(
        n_atoms=10, nprocs=2, per_worker_mb=[900.0, 1100.0], owned_atoms=[5, 5],
        halo_atoms=[3, 3], edges=[90, 110], base_mb=0.0, mb_per_edge=10.0,
    )  # fmt: skip
    assert not estimate.exceeds_limit  # no limit
    estimate.memory_limit_mb = 1024.0
    assert estimate.exceeds_limit and estimate.to_dict()["exceeds_limit"]
    estimate.memory_limit_mb = 2048.0
    assert not estimate.exceeds_limit
