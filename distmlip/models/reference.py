"""A small message-passing potential in pure torch: the test bed of the engine.

Element embedding, Bessel radial basis with a smooth polynomial cutoff envelope, ``num_layers``
rounds of filtered messages with residual nonlinear node updates, and a per-atom energy readout
plus element reference energies. Random weights from ``seed``; it is not a physical potential,
but it has everything the engine must get right (several layers of halo exchange, smooth
forces, stress from edge vectors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distmlip.exchange import Exchange
from distmlip.models.base import DistributedModel, GraphInputs

__all__ = ["ReferenceMPNN", "bessel_basis", "polynomial_envelope"]


def bessel_basis(distances: torch.Tensor, cutoff: float, num_radial: int) -> torch.Tensor:
    """(E,) Å → (E, num_radial): sqrt(2/rc) sin(nπ r/rc) / r."""
    n = torch.arange(1, num_radial + 1, dtype=distances.dtype, device=distances.device)
    r = distances.unsqueeze(-1)
    return math.sqrt(2.0 / cutoff) * torch.sin(n * math.pi * r / cutoff) / r


def polynomial_envelope(distances: torch.Tensor, cutoff: float, p: int = 6) -> torch.Tensor:
    """(E,) → (E,): 1 at r=0, zero with p−1 vanishing derivatives at r = cutoff (DimeNet)."""
    x = distances / cutoff
    value = (
        1.0
        - (p + 1) * (p + 2) / 2 * x**p
        + p * (p + 2) * x ** (p + 1)
        - p * (p + 1) / 2 * x ** (p + 2)
    )
    return torch.where(x < 1.0, value, torch.zeros_like(value))


class ReferenceMPNN(DistributedModel):
    """Multi-layer scalar message-passing potential.

    Args:
        cutoff: Å.
        num_layers: message-passing layers T (T − 1 halo exchanges per evaluation).
        hidden: feature width.
        num_radial: Bessel functions.
        max_z: largest supported atomic number.
        seed: weight initialisation seed.
        weight_gain: factor on the default (PyTorch) initial weights.
        overlap: overlap each halo exchange with the messages along interior edges (sender
            owned), then add the boundary edges' messages (sender in the halo). False: wait for
            the halo first (the same sums in another order; for benchmarks).
    """

    def __init__(
        self,
        cutoff: float = 5.0,
        num_layers: int = 3,
        hidden: int = 32,
        num_radial: int = 8,
        max_z: int = 94,
        seed: int = 0,
        weight_gain: float = 2.0,
        overlap: bool = True,
    ):
        super().__init__()
        self.overlap = bool(overlap)
        self.cutoff = float(cutoff)
        self.num_layers = int(num_layers)
        self.num_radial = int(num_radial)
        self.supported_numbers = frozenset(range(1, max_z + 1))
        # Rough neighbour count within cutoff in a dense solid; 1/sqrt of it keeps sums O(1).
        self.avg_neighbors = 4.0 / 3.0 * math.pi * self.cutoff**3 * 0.08
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(max_z + 1, hidden)
            self.filters = nn.ModuleList(
                nn.Sequential(nn.Linear(num_radial, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                for _ in range(num_layers)
            )
            self.message = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
            self.update = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                for _ in range(num_layers)
            )
            self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            self.reference_energy = nn.Embedding(max_z + 1, 1)
            nn.init.uniform_(self.reference_energy.weight, -4.0, -1.0)
            # Larger-than-default weights give forces of order 0.1-1 eV/Å on rattled solids,
            # so exactness and finite-difference tests measure something.
            for module in (*self.filters, *self.message, *self.update, self.readout):
                for parameter in module.parameters():
                    parameter.data.mul_(weight_gain)

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        n_owned = inputs.n_owned
        distances = torch.linalg.norm(inputs.vectors, dim=-1)
        radial = bessel_basis(distances, self.cutoff, self.num_radial)
        envelope = polynomial_envelope(distances, self.cutoff).unsqueeze(-1)
        senders, receivers = inputs.senders, inputs.receivers
        overlap = self.overlap and hasattr(exchange, "start")
        if overlap:
            # Interior edges (sender owned) need only owned rows: their messages are computed
            # while the halo travels. Local graphs list them first (halo.build_local_graph), so
            # the split is two slices; any other order is sorted once here.
            n_interior = int((senders < n_owned).sum())
            if not bool((senders[:n_interior] < n_owned).all()):
                order = torch.argsort((senders >= n_owned).to(torch.int8), stable=True)
                senders, receivers = senders[order], receivers[order]
                radial, envelope = radial[order], envelope[order]
            interior = slice(0, n_interior)
            boundary = slice(n_interior, None)
            radial_parts = (radial[interior], radial[boundary])
            envelope_parts = (envelope[interior], envelope[boundary])
            boundary_senders = senders[boundary] - n_owned
        # Layer 0 needs only species, which every worker has for its halo: no exchange.
        local = self.embedding(inputs.numbers)
        owned = local[:n_owned]

        def step(layer: int, owned: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
            """Message-passing layer ``layer``: the new owned rows."""
            if layer > 0 and overlap:
                owned, pending = exchange.start(owned)
                weights = self.filters[layer](radial_parts[0]) * envelope_parts[0]
                messages = weights * self._node_message(layer, owned)[senders[interior]]
                aggregated = owned.new_zeros(owned.shape).index_add(
                    0, receivers[interior], messages
                )
                halo = self._node_message(layer, pending.finish())
                weights = self.filters[layer](radial_parts[1]) * envelope_parts[1]
                aggregated = aggregated.index_add(
                    0, receivers[boundary], weights * halo[boundary_senders]
                )
            else:
                if layer > 0:
                    local = exchange(owned)
                weights = self.filters[layer](radial) * envelope
                messages = weights * self._node_message(layer, local)[senders]
                aggregated = owned.new_zeros(owned.shape).index_add(0, receivers, messages)
            return owned + self.update[layer](
                torch.cat([owned, aggregated / math.sqrt(self.avg_neighbors)], dim=-1)
            )

        for layer in range(self.num_layers):
            owned = exchange.checkpoint(step, layer, owned, local)
            local = None  # only layer 0 reads it (later layers exchange their own)
        energies = self.readout(owned).squeeze(-1)
        return energies + self.reference_energy(inputs.numbers[:n_owned]).squeeze(-1)

    def _node_message(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.message[layer](features))
