"""A model that only asks for a graph: what preprocessing costs inside real workers.

``GraphOnly`` has a cutoff and no layers: its forward returns zero energies at once, so an
energy-only call on a ``DistributedCalculator`` runs everything a real model's call runs before
the first layer (partition, local graph, the halo-plan handshake between the workers over
gloo, the model's ``prepare``, the input tensors) and nothing after. Workers import it by
module name, so ``benchmarks/`` must be on their ``PYTHONPATH`` (benchmarks/handshake.py sets
it).
"""

from __future__ import annotations

import torch

from distmlip import DistributedModel


class GraphOnly(DistributedModel):
    """Zero energy for every atom; ``cutoff`` Å decides the graph."""

    def __init__(self, cutoff: float = 5.0):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, inputs, exchange) -> torch.Tensor:
        return inputs.vectors.new_zeros(inputs.n_owned)
