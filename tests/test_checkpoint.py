"""Activation checkpointing (``checkpoint=True``) changes what is kept for the backward, not the
numbers: equal to the plain evaluation and to the truth to round-off, forces equal to finite
differences, the same messages sent, and far fewer activations kept.

The adapters' own test files compare checkpointed runs with their upstream packages
(test_chgnet, test_mace, test_tensornet, test_fairchem).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    SYSTEMS,
    assert_forces_are_finite_differences,
    evaluate,
    relative_error,
    small_cell,
)

from distmlip.exchange import Exchange
from distmlip.exchange.checkpoint import chunks
from distmlip.exchange.comm import Communicator
from distmlip.graphs.structure import Structure
from distmlip.options import GraphOptions
from distmlip.worker.builders import SkinGraphs
from distmlip.worker.engine import call_exchange
from distmlip.worker.engine import evaluate as evaluate_worker

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs

RTOL = 1e-10


@pytest.mark.parametrize(("nprocs", "partitioner"), [(1, "slab"), (2, "rcb"), (3, "slab")])
def test_checkpointed_equals_single_process(nprocs, partitioner, pools, single_process_results):
    calc = pools.get(nprocs, partitioner, checkpoint=True)
    for name, make in SYSTEMS.items():
        got = evaluate(calc, make())
        for key, expected in single_process_results[name].items():
            error = relative_error(got[key], expected)
            assert error <= RTOL, f"{name}: {key} relative error {error:.2e} (P={nprocs})"


def test_checkpointed_sends_the_same_messages(pools):
    """Recomputation replays its exchanges from memory: not one message more."""
    atoms = SYSTEMS["triclinic"]()
    counts = {}
    for checkpoint in (False, True):
        calc = pools.get(3, "rcb", checkpoint=checkpoint)
        evaluate(calc, atoms)
        counts[checkpoint] = [(s["exchanges"], s["bytes_sent"]) for s in calc.last_stats]
        regions = [s["checkpoint_regions"] for s in calc.last_stats]
        assert all(r == (3 if checkpoint else 0) for r in regions), regions  # one per layer
    assert counts[True] == counts[False]
    assert all(exchanges > 0 for exchanges, _ in counts[True])


def test_checkpointed_ghost_baseline(pools, single_process_results):
    calc = pools.get(2, "slab", halo="ghost", checkpoint=True)
    got = evaluate(calc, SYSTEMS["small_cell"]())
    for key, expected in single_process_results["small_cell"].items():
        assert relative_error(got[key], expected) <= RTOL, key


def test_checkpointed_forces_match_finite_differences(pools):
    calc = pools.get(2, "rcb", checkpoint=True)
    assert_forces_are_finite_differences(calc, small_cell(), (0, 5, 11))


def saved_for_backward(model, atoms, checkpoint: bool | int) -> tuple[int, float, np.ndarray, int]:
    """Bytes of distinct storages autograd keeps for the backward outside checkpointed
    regions (a region keeps only its inputs), the energy and forces, in this process, and the
    most edge chunks a layer was split into."""
    model = model.double()
    structure = Structure.from_ase(atoms)
    comm = Communicator(0, 1, torch.device("cpu"))
    call = SkinGraphs(model, GraphOptions(), torch.device("cpu"), torch.float64).get(
        structure, comm
    )
    storages: dict[int, int] = {}
    pieces = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    chunks = Exchange.chunks

    def counted(exchange, n_edges):
        split = chunks(exchange, n_edges)
        pieces[0] = max(pieces[0], len(split))
        return split

    with (
        pytest.MonkeyPatch.context() as patch,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        patch.setattr(Exchange, "chunks", counted)
        result = evaluate_worker(model, call, call_exchange(call, comm, checkpoint), comm)
    return sum(storages.values()), result.energy, result.forces, pieces[0]


def assert_checkpointing_keeps_less(model, atoms, factor: float, chunk: int | None = None) -> None:
    """Checkpointing keeps ``factor`` × fewer bytes for the backward, with the same energy and
    forces; with ``chunk`` edges per chunk, some layer's edges really are split in pieces."""
    plain, energy, forces, _ = saved_for_backward(model, atoms, False)
    kept, energy_ck, forces_ck, pieces = saved_for_backward(model, atoms, chunk or True)
    assert energy_ck == pytest.approx(energy, rel=1e-12)
    assert relative_error(forces_ck, forces) <= 1e-12
    assert kept * factor <= plain, f"checkpointing kept {kept} of {plain} bytes"
    if chunk is not None:
        assert pieces > 1, "no layer was split into edge chunks"


def test_reference_model_keeps_fewer_activations(reference_model):
    assert_checkpointing_keeps_less(reference_model, SYSTEMS["triclinic"](), factor=3.0)


def test_edge_chunks_cover_every_edge_once():
    assert chunks(10, 0) == [(0, 10)]
    assert chunks(10, 10) == [(0, 10)]
    assert chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunks(0, 4) == [(0, 0)]
