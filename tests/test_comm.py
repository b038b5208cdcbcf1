"""Halo exchanges: the overlapped (start / finish) exchange equals the blocking one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SYSTEMS, evaluate

from distmlip import ReferenceMPNN


@pytest.fixture(scope="module")
def blocking_model() -> ReferenceMPNN:
    """The session's reference model (same seed), waiting for each halo before any message."""
    return ReferenceMPNN(cutoff=5.0, num_layers=3, hidden=32, seed=0, overlap=False)


@pytest.mark.slow
def test_overlapped_exchange_equals_blocking(pools, blocking_model):
    names = ("bulk", "small_cell", "slab")
    calc = pools.get(3, "rcb", model=blocking_model, trace=True)
    blocking = {name: evaluate(calc, SYSTEMS[name]()) for name in names}
    whats = {entry["what"] for trace in calc.last_traces for entry in trace.named("exchange")}
    assert "halo exchange" in whats and "halo exchange (overlapped)" not in whats

    calc = pools.get(3, "rcb", trace=True)  # the default model overlaps
    for name in names:
        overlapped = evaluate(calc, SYSTEMS[name]())
        for key, expected in blocking[name].items():
            scale = max(np.abs(expected).max(), 1e-300)
            error = np.abs(overlapped[key] - expected).max() / scale
            assert error <= 1e-12, f"{name}: {key} relative error {error:.2e}"
    logs = [trace.named("exchange") for trace in calc.last_traces]
    whats = {entry["what"] for log in logs for entry in log}
    assert "halo exchange (overlapped)" in whats and "halo exchange" not in whats
    # num_layers − 1 overlapped exchanges forward, each answered by one reverse transfer, plus
    # the reverse sum of the forces.
    for log in logs:
        kinds = [entry["what"] for entry in log]
        assert kinds.count("halo exchange (overlapped)") == 2
        assert kinds.count("reverse halo exchange") == 3
        assert all(entry["seconds"] >= 0 for entry in log)
