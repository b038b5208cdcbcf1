"""Each worker's partition: computed once for metis, checked to agree for the others."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import bulk_cu

from distmlip.graphs.structure import Structure
from distmlip.worker import builders


class FakeComm:
    """Rank 1 of 2; collectives answer what the test scripts."""

    rank, world_size = 1, 2

    def __init__(self, broadcast=None, maxima=None):
        self.broadcast, self.maxima, self.calls = broadcast, list(maxima or []), []

    def broadcast_int64(self, values, length, root=0):
        self.calls.append(("broadcast", values, length, root))
        return self.broadcast

    def allreduce_int(self, value, op="sum"):
        self.calls.append(("allreduce", value, op))
        return self.maxima.pop(0) if self.maxima else value


def test_metis_runs_on_rank_0_only_and_is_broadcast(monkeypatch):
    structure = Structure.from_ase(bulk_cu())
    sent = np.arange(structure.n_atoms) % 2
    comm = FakeComm(broadcast=sent)
    monkeypatch.setattr(builders, "partition", lambda *args: pytest.fail("rank 1 partitioned"))
    owner = builders.owners(structure, comm, "metis", 5.0)
    np.testing.assert_array_equal(owner, sent)
    assert comm.calls == [("broadcast", None, structure.n_atoms, 0)]


def test_ranks_that_disagree_on_the_partition_refuse_to_compute():
    structure = Structure.from_ase(bulk_cu())
    agreeing = FakeComm()  # max(h) == -max(-h): every rank sent the same hash
    owner = builders.owners(structure, agreeing, "rcb", 5.0)
    assert set(np.unique(owner)) == {0, 1}
    assert [call[0] for call in agreeing.calls] == ["allreduce", "allreduce"]
    disagreeing = FakeComm(maxima=[7, -3])  # max(h) = 7 but min(h) = 3
    with pytest.raises(RuntimeError, match="different 'rcb' partitions"):
        builders.owners(structure, disagreeing, "rcb", 5.0)
