"""The ghost baseline: what zero-redundancy exchange is measured against.

The conventional spatial decomposition (LAMMPS-style, as in SevenNet's and MACE's parallel
modes): each worker recomputes ``num_layers`` graph hops of ghost atoms around its owned ones
and exchanges nothing between layers. Results are identical to halo exchange; the cost is the
redundant ghost work. Used with ``DistributedCalculator(..., halo="ghost")`` for benchmarks.
Everything the baseline needs is here: its graph builder and its ``exchange``.
"""

from __future__ import annotations

import torch

from distmlip.exchange.checkpoint import CheckpointRegions
from distmlip.exchange.protocol import StructureRejected

__all__ = ["GhostExchange"]


class GhostExchange(CheckpointRegions):
    """The ghost baseline's ``exchange``: ghost rows are recomputed, nothing is fetched.

    The outermost ghosts only ever matter through their species (layer 0); at later layers they
    feed nodes whose features are already out of their exact range, so zeros serve.
    """

    def __init__(self, n_computed: int, n_local: int, checkpoint: bool | int = False):
        self.n_owned, self.n_local = n_computed, n_local
        self._init_checkpointing(checkpoint)  # no collectives: nothing to replay

    def _outer(self, computed: torch.Tensor) -> torch.Tensor:
        return computed.new_zeros((self.n_local - self.n_owned, *computed.shape[1:]))

    def __call__(self, computed: torch.Tensor) -> torch.Tensor:
        return torch.cat([computed, self._outer(computed)])

    def start(self, computed: torch.Tensor):
        return computed, _Ready(self._outer(computed))

    def rows(self, kind: str):
        raise NotImplementedError("the ghost baseline does not exchange declared row kinds")

    def sum_over_ranks(self, value: int) -> int:
        raise NotImplementedError("the ghost baseline runs no collectives")

    def reject_if(self, condition: bool, message: str) -> None:
        # No collectives here, and none to leave waiting: a worker refuses on its own.
        if condition:
            raise StructureRejected(message)

    def forward_exchange(self, feats: torch.Tensor, out: torch.Tensor, width: int) -> None:
        out.copy_(feats)

    def reverse_exchange(self, grad: torch.Tensor, gout: torch.Tensor, width: int) -> None:
        gout.zero_()
        gout[: self.n_owned] = grad[: self.n_owned]


class _Ready:
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def finish(self) -> torch.Tensor:
        return self.rows
