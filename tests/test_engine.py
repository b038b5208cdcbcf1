"""The engine in-process (one rank): per-call tensors must not outlive the call."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import torch
from conftest import small_cell

from distmlip.comm import Communicator
from distmlip.engine import evaluate
from distmlip.graph import Structure
from distmlip.halo import build_local_graph, resolve_send_index
from distmlip.models import ReferenceMPNN


class Recording(ReferenceMPNN):
    """Keeps weak references to every exchanged tensor."""

    def __init__(self):
        super().__init__()
        self.seen: list[weakref.ref] = []

    def forward(self, inputs, exchange):
        def recording_exchange(rows):
            local = exchange(rows)
            self.seen.append(weakref.ref(local))
            return local

        return super().forward(inputs, recording_exchange)


def test_exchanged_tensors_are_freed_after_the_call():
    model = Recording().double()
    structure = Structure.from_ase(small_cell())
    owner = np.zeros(structure.n_atoms, dtype=np.int64)
    graph = build_local_graph(structure, owner, 0, 1, model.cutoff)
    comm = Communicator(0, 1, torch.device("cpu"))
    resolve_send_index(graph, comm.exchange_requests(graph.requests()))
    result = evaluate(model, graph, structure, comm, torch.float64, torch.device("cpu"))
    assert np.isfinite(result.energy) and len(model.seen) == model.num_layers - 1
    gc.collect()
    # The autograd node of an exchange references the communicator, which held its output:
    # a cycle through C++ that leaked one call's tensors per call until the engine broke it.
    assert all(ref() is None for ref in model.seen)
    assert comm.outputs == []
