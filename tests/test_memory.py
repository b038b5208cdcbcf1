"""Worker memory stays flat over MD-like steps: no call leaves tensors behind.

A leak once kept every call's exchanged tensors alive through a reference cycle between autograd
nodes and the communicator (test_engine.py checks the reference model in-process); these run
the adapters where the exchanges of bonds (CHGNet) and of MACE's LAMMPS hook live, in real
worker processes, measuring their resident memory. Re-introducing that leak (not clearing the
communicator's outputs) makes the CHGNet test fail (+115-213 MB); MACE's hook forms no such
cycle (+2-22 MB with it), so there the bound catches leaks of more than ~1.6 MB per call.
"""

from __future__ import annotations

import mace  # noqa: F401  (before e3nn)
import numpy as np
import psutil
import pytest
import torch
from ase.build import bulk
from conftest import trajectory

from distmlip import DistributedCalculator

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

STEPS = 30
WARM_UP = 10
GROWTH_LIMIT_MB = 64.0


def worker_rss_mb(calc) -> list[float]:
    return [psutil.Process(pid).memory_info().rss / 2**20 for pid in calc.pool.pids]


def run_steps(calc, atoms) -> tuple[list[float], list[float], list[float]]:
    """Worker RSS before the first call, after the warm-up and after the last step (MB)."""
    before = worker_rss_mb(calc)
    after_warm_up = None
    for step, frame in enumerate(trajectory(atoms, STEPS, step_size=0.02, seed=5)):
        frame.calc = calc
        calc.get_properties(["energy", "forces", "stress"], frame)
        if step + 1 == WARM_UP:
            after_warm_up = worker_rss_mb(calc)
    return before, after_warm_up, worker_rss_mb(calc)


def assert_flat(before, after_warm_up, end, label: str) -> None:
    for rank, (start, warm, last) in enumerate(zip(before, after_warm_up, end, strict=True)):
        per_call = warm - start  # what the first calls made resident: graphs and activations
        growth = last - warm
        # Measured without a leak: 0-5 MB alone, 35 MB once late in a full-suite run (CHGNet);
        # with the communicator's outputs left alive (the leak this guards against) CHGNet grew
        # 115-184 MB over these 20 steps.
        assert growth < GROWTH_LIMIT_MB, (
            f"{label} worker {rank}: RSS grew {growth:.0f} MB over {STEPS - WARM_UP} steps "
            f"(first calls: +{per_call:.0f} MB)"
        )


def test_chgnet_workers_memory_is_flat():
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat(3)  # 216 atoms
    atoms.rattle(0.03, seed=3)
    with DistributedCalculator("chgnet", nprocs=2, partitioner="rcb", dtype="float32") as calc:
        assert_flat(*run_steps(calc, atoms), "CHGNet")


def test_mace_workers_memory_is_flat(tmp_path):
    from test_mace import build_model

    path = tmp_path / "model.model"
    torch.save(build_model("residual_2x_L1_c3"), path)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(4)  # 256 atoms
    atoms.numbers[::3] = 28
    atoms.rattle(0.03, seed=4)
    with DistributedCalculator(str(path), nprocs=2, partitioner="slab") as calc:
        before, warm, end = run_steps(calc, atoms)
        assert np.all(np.array(warm) > np.array(before))  # the calls did allocate
        assert_flat(before, warm, end, "MACE")
