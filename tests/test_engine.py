"""The engine in-process (one rank): per-call tensors must not outlive the call."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import small_cell

from distmlip.exchange.comm import Communicator
from distmlip.graphs.halo import build_local_graph, resolve_send_index
from distmlip.graphs.structure import Structure
from distmlip.models import ReferenceMPNN
from distmlip.worker.engine import call_exchange, call_graph, evaluate


class Recording(ReferenceMPNN):
    """Keeps weak references to every exchanged tensor (and pending overlapped exchange)."""

    def __init__(self, overlap: bool):
        super().__init__(overlap=overlap)
        self.seen: list[weakref.ref] = []

    def forward(self, inputs, exchange):
        seen = self.seen

        class RecordingExchange:
            def __call__(self, rows):
                local = exchange(rows)
                seen.append(weakref.ref(local))
                return local

            def checkpoint(self, function, *args, **kwargs):
                return exchange.checkpoint(function, *args, **kwargs)

            def chunks(self, n_edges):
                return exchange.chunks(n_edges)

            def start(self, rows):
                owned, pending = exchange.start(rows)
                seen.extend([weakref.ref(owned), weakref.ref(pending)])
                return owned, RecordingPending(pending)

        class RecordingPending:
            def __init__(self, pending):
                self.pending = pending

            def finish(self):
                halo = self.pending.finish()
                seen.append(weakref.ref(halo))
                return halo

        return super().forward(inputs, RecordingExchange())


@pytest.mark.parametrize("checkpoint", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_exchanged_tensors_are_freed_after_the_call(overlap, checkpoint):
    model = Recording(overlap).double()
    structure = Structure.from_ase(small_cell())
    owner = np.zeros(structure.n_atoms, dtype=np.int64)
    graph = build_local_graph(structure, owner, 0, 1, model.cutoff)
    comm = Communicator(0, 1, torch.device("cpu"))
    resolve_send_index(graph, comm.exchange_requests(graph.requests()))
    call = call_graph(model, graph, structure, comm, torch.float64, torch.device("cpu"))
    result = evaluate(model, call, call_exchange(call, comm, checkpoint), comm)
    again = evaluate(model, call, call_exchange(call, comm, checkpoint), comm)
    # One communicator serves call after call: each starts its counters afresh.
    assert again.stats["exchanges"] == result.stats["exchanges"] > 0
    assert again.stats["bytes_sent"] == result.stats["bytes_sent"]
    assert again.energy == result.energy
    per_exchange = 3 if overlap else 1
    assert np.isfinite(result.energy)
    # A checkpointed layer runs twice (forward, then recomputed in the backward, its exchanges
    # replayed: the same tensors again).
    runs = 2 if checkpoint else 1
    assert len(model.seen) == per_exchange * (model.num_layers - 1) * runs * 2  # two calls
    gc.collect()
    # The autograd node of an exchange references the communicator, which held its output:
    # a cycle through C++ that leaked one call's tensors per call until the engine broke it.
    assert all(ref() is None for ref in model.seen)
    assert comm.outputs == []
