"""A toy adapter written against the public protocol only (``distmlip.models.base`` and
``distmlip.exchange``): atom features exchanged every layer, and per-bond features as a declared
row kind, summed in parts on the workers that hold either end and sent back to every holder.

Workers import this module to unpickle the adapter (``PYTHONPATH`` points here).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from distmlip.exchange import Exchange, GraphTopology, RowDeclarer, undirected_edge_keys
from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.reference import ReferenceMPNN


class BondToy(DistributedModel):
    """Two layers: atoms receive radial-filtered messages weighted by a per-bond feature; each
    bond's feature is updated from the products of its two end atoms' features."""

    def __init__(self, cutoff: float = 4.5, hidden: int = 6, seed: int = 0):
        super().__init__()
        self.cutoff = cutoff
        self.num_layers = 2
        generator = torch.Generator().manual_seed(seed)

        def weights(*shape):
            return torch.nn.Parameter(torch.randn(*shape, generator=generator) / shape[0] ** 0.5)

        self.embed = weights(100, hidden)
        self.radial = weights(4, hidden)
        self.bond_in = weights(4, hidden)
        self.bond_update = torch.nn.ParameterList(weights(hidden, hidden) for _ in range(2))
        self.node_update = torch.nn.ParameterList(weights(hidden, hidden) for _ in range(2))
        self.readout = weights(hidden, 1)

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> tuple:
        edges = np.arange(len(topology.receivers))
        keys, _, owners = undirected_edge_keys(topology, edges, rows)
        layout = rows.declare("bonds", keys, owners)
        # (E,) bond row of each edge; (rows,) one edge of each bond row.
        return torch.as_tensor(layout.row), torch.as_tensor(edges[layout.first_key_of_row])

    def _basis(self, lengths: torch.Tensor) -> torch.Tensor:
        x = lengths.unsqueeze(1) / self.cutoff
        n = torch.arange(1, 5, dtype=lengths.dtype)
        return torch.sin(n * torch.pi * x) / x * (1 - x) ** 2  # smooth, zero at the cutoff

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        n_owned = inputs.n_owned
        senders, receivers = inputs.senders, inputs.receivers
        edge_row, bond_edge = inputs.prepared
        bonds = exchange.rows("bonds")
        basis = self._basis(torch.linalg.norm(inputs.vectors, dim=1))
        # Each local bond row from one of its local edges (both directions have one length).
        bond = basis[bond_edge] @ self.bond_in
        local = self.embed[inputs.numbers]
        owned = local[:n_owned]
        for layer in range(2):
            if layer > 0:
                local = exchange(owned)
            messages = (basis @ self.radial) * bond[edge_row] * local[senders]
            aggregated = owned.new_zeros(owned.shape).index_add(0, receivers, messages)
            owned = owned + torch.tanh(aggregated @ self.node_update[layer])
            # Bond update from both ends: each worker sums what its edges contribute.
            ends = owned[receivers] * local[senders]
            partial = bond.new_zeros(bond.shape).index_add(0, edge_row, ends)
            summed = bonds.reduce(partial)
            bond = bonds(bond[: bonds.n_owned] + torch.tanh(summed @ self.bond_update[layer]))
        return (owned @ self.readout).squeeze(1)


@pytest.fixture(scope="module")
def toy():
    with pytest.MonkeyPatch.context() as patch:
        path = str(Path(__file__).parent)
        patch.setenv("PYTHONPATH", os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]))
        yield BondToy()


def _systems():
    from conftest import cluster, small_cell, surface_slab

    return {"small_cell": small_cell(), "slab": surface_slab(), "cluster": cluster()}


@pytest.fixture(scope="module")
def single(toy):
    from conftest import evaluate

    from distmlip import DistributedCalculator

    with DistributedCalculator(toy, nprocs=1, timeout=120) as calc:
        return {name: evaluate(calc, atoms) for name, atoms in _systems().items()}


@pytest.mark.parametrize("partitioner", ["slab", "rcb"])
@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_toy_adapter_equals_single_process(toy, single, nprocs, partitioner):
    from conftest import evaluate

    from distmlip import DistributedCalculator

    with DistributedCalculator(toy, nprocs=nprocs, partitioner=partitioner, timeout=120) as calc:
        for name, atoms in _systems().items():
            got, expected = evaluate(calc, atoms), single[name]
            scale = max(1.0, abs(expected["energy"]))
            assert abs(got["energy"] - expected["energy"]) <= 1e-10 * scale, name
            np.testing.assert_allclose(got["forces"], expected["forces"], rtol=0, atol=1e-10)
            if "stress" in expected:
                np.testing.assert_allclose(got["stress"], expected["stress"], rtol=0, atol=1e-10)
            if nprocs > 1:
                assert all(s["exchanges"] >= 3 for s in calc.last_stats), "bonds were exchanged"


def test_toy_adapter_forces_equal_finite_differences(toy):
    from conftest import small_cell

    from distmlip import DistributedCalculator

    atoms = small_cell()
    with DistributedCalculator(toy, nprocs=3, partitioner="rcb", timeout=120) as calc:
        atoms.calc = calc
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 1e-3, "forces too small to test anything"
        step = 1e-5
        for atom, axis in [(0, 0), (5, 1), (11, 2)]:
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[atom, axis] += sign * step
                moved.calc = calc
                energies.append(moved.get_potential_energy())
            numeric = -(energies[0] - energies[1]) / (2 * step)
            assert abs(numeric - forces[atom, axis]) < 1e-6, (atom, axis)


class CrowdRefusingToy(ReferenceMPNN):
    """Refuses, through ``exchange.reject_if``, a structure in which an atom has more than
    ``max_degree`` edges (found while computing, on whichever worker owns it)."""

    max_degree = 20

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        degree = torch.bincount(inputs.receivers, minlength=inputs.n_owned)
        exchange.reject_if(int(degree.max()) > self.max_degree, "an atom is too crowded")
        return super().forward(inputs, exchange)


@pytest.mark.parametrize("halo", ["exchange", "ghost"])
def test_structure_rejected_by_workers_is_a_value_error_and_keeps_them(toy, halo):
    """Every worker refuses together (or, without collectives, each on its own): the caller gets
    one ValueError, the workers are not restarted and serve the next structure (``toy`` puts
    this module on the workers' path)."""
    from ase import Atoms
    from conftest import small_cell

    from distmlip import DistributedCalculator

    dimer = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[10, 10, 10], pbc=False)
    with DistributedCalculator(
        CrowdRefusingToy(cutoff=4.5, num_layers=2, hidden=8),
        nprocs=2,
        partitioner="rcb",
        halo=halo,
        timeout=120,
    ) as calc:
        calc.get_properties(["energy"], dimer)
        pids = [process.pid for process in calc.pool._workers.processes]
        with pytest.raises(ValueError, match="too crowded"):
            calc.get_properties(["energy", "forces"], small_cell())  # 42 neighbours in 4.5 Å
        assert calc.get_properties(["forces"], dimer)["forces"].shape == (2, 3)
        assert [process.pid for process in calc.pool._workers.processes] == pids
