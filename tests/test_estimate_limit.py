"""``estimate_memory`` under a ``memory_limit``: the calibration runs within the limit, so the
estimate works for any structure that fits it, and one that cannot fit is one clear line."""

from __future__ import annotations

import sys

import pytest
from ase.build import bulk
from test_out_of_memory import CHGNET_TOLERANCE

from distmlip import DistributedCalculator, OutOfMemoryError
from distmlip.graphs.structure import Structure

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA is Linux's")


def copper(repeat: int):
    """fcc Cu, 4·repeat³ atoms, rattled."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=0)
    return atoms


def magnesia(repeat: tuple[int, int, int]):
    """Rocksalt MgO, 8 atoms per cubic cell, rattled."""
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat(repeat)
    atoms.rattle(0.03, seed=0)
    return atoms


@linux
def test_no_calibration_piece_holds_more_per_worker_than_the_target():
    """2 calibrating workers, a prediction for 8: pieces of at most 864 × 2 / 8 = 216 atoms
    (without the limit they would reach half the structure, 432 atoms per worker)."""
    with DistributedCalculator("reference", nprocs=2, timeout=120, memory_limit=0.6) as calc:
        estimate = calc.estimate_memory(copper(6), nprocs=8)
        assert len(estimate.calibration) >= 2
        assert max(r["atoms"] for r in estimate.calibration) <= 216
        assert estimate.memory_limit_mb == pytest.approx(0.6 * 1024)
        assert not estimate.exceeds_limit
        # A structure too small for START_ATOMS per worker still gives two sizes.
        small = calc.estimate_memory(copper(3))  # 108 atoms on 2 workers
        sizes = [r["atoms"] for r in small.calibration]
        assert len(set(sizes)) >= 2 and max(sizes) <= 54


@pytest.mark.slow
@linux
def test_chgnet_estimate_under_a_tight_limit():
    """CHGNet (float64) under 1 GB per worker: a 96-atom MgO cell fits (~0.9 GB), and its
    estimate, calibrated within the limit, matches the measured peak; a 640-atom one does not
    fit (its calibration runs out of memory), which is one line saying so."""
    with DistributedCalculator(
        "chgnet", nprocs=2, dtype="float64", timeout=600, memory_limit=1.0, threads_per_worker=1
    ) as calc:
        with pytest.raises(OutOfMemoryError) as caught:
            calc.estimate_memory(magnesia((4, 4, 5)))
        message = str(caught.value)
        assert "\n" not in message and caught.value.worker_traceback is None
        assert message.startswith("estimating memory: a ")
        assert "memory_limit=1 GB" in message and "does not fit either" in message
        atoms = magnesia((3, 2, 2))  # 96 atoms
        estimate = calc.estimate_memory(atoms)
        assert len(estimate.calibration) >= 2
        assert all(r["atoms"] <= 48 for r in estimate.calibration)
        assert all(max(r["peak_mb"]) < 1024 for r in estimate.calibration)
        assert not estimate.exceeds_limit
        calc.compute(Structure.from_ase(atoms))  # fits, as predicted
        measured = max(s["call_peak_rss_mb"] for s in calc.last_stats)
        error = abs(estimate.peak_mb - measured)
        assert error <= CHGNET_TOLERANCE * measured, (estimate.peak_mb, measured)


class LinearMemoryCalc:
    """A stand-in for a calculator (no workers): each call's per-worker peak is 200 MB plus
    0.01 MB per edge, 40 edges per atom, so what a call would use is known exactly."""

    def __init__(self, memory_limit: float | None, nprocs: int = 2):
        from types import SimpleNamespace

        from distmlip import ReferenceMPNN

        self.model, self.nprocs = ReferenceMPNN(), nprocs
        self.partitioner, self.halo = "slab", "exchange"
        self.graph_builds = self.graph_reuses = 0
        options = SimpleNamespace(device="cpu", memory_limit=memory_limit)
        self.pool = SimpleNamespace(options=options, close=lambda: None)
        self.peaks: list[float] = []

    def compute(self, structure, forces=True):
        edges = 40 * structure.n_atoms // self.nprocs
        self.peaks.append(200.0 + 0.01 * edges)
        self.last_stats = [{"edges": edges, "call_peak_rss_mb": self.peaks[-1]}] * self.nprocs


def test_calibration_calls_stay_within_the_share_of_memory_limit():
    """Under memory_limit=0.5 GB no calibration call is predicted to, or does, use more than
    LIMIT_SHARE of it (410 MB here); without the limit the same calibration goes further (to
    a 256 MB growth, ~600 MB), so it is the limit that stops it."""
    from distmlip.capacity import LIMIT_SHARE, estimate_memory

    atoms = copper(10)  # 4000 atoms
    limited = LinearMemoryCalc(memory_limit=0.5)
    estimate = estimate_memory(limited, atoms)
    assert len(estimate.calibration) >= 2
    assert max(limited.peaks) <= LIMIT_SHARE * 0.5 * 1024
    free = LinearMemoryCalc(memory_limit=None)
    estimate_memory(free, atoms)
    assert max(free.peaks) > LIMIT_SHARE * 0.5 * 1024
