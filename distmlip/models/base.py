"""The adapter protocol every model family implements.

An adapter is a ``torch.nn.Module`` that wraps an upstream model (reusing its submodules and
weights) and computes per-owned-atom energies from one worker's local graph, calling
``exchange`` wherever the upstream forward reads features of neighbouring atoms that another
worker owns. The engine owns everything else: graphs, partitions, communication, autograd for
forces and stress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distmlip.comm import Communicator
    from distmlip.graph import Structure
    from distmlip.halo import LocalGraph

__all__ = ["GraphInputs", "DistributedModel", "Exchange"]

Exchange = Callable[[torch.Tensor], torch.Tensor]
"""``exchange(owned_rows) -> local_rows``: (n_owned, ...) → (n_owned + n_halo, ...).

The object the engine passes (:class:`distmlip.engine.AtomExchange`) also has
``exchange.start(owned_rows) -> (owned_rows, pending)`` and ``pending.finish() -> halo_rows``, to
overlap the transfer with work that needs only owned rows."""


@dataclass
class GraphInputs:
    """One worker's local graph as tensors.

    Attributes:
        numbers: (n_local,) int64 atomic numbers of owned rows then halo rows.
        vectors: (E, 3) edge vectors v = x_sender + shift·cell − x_receiver, Å; the autograd leaf
            for forces and stress.
        receivers: (E,) int64 local rows, all < n_owned.
        senders: (E,) int64 local rows.
        n_owned: number of owned rows.
        graph: the numpy :class:`~distmlip.halo.LocalGraph` (global indices, shifts, plan), for
            adapters that derive more structure (bond graphs) from it.
        structure: the replicated :class:`~distmlip.graph.Structure`.
        comm: the :class:`~distmlip.comm.Communicator`, for adapters that exchange rows other
            than atoms (``comm.exchange(rows, plan)`` with a plan of their own).
    """

    numbers: torch.Tensor
    vectors: torch.Tensor
    receivers: torch.Tensor
    senders: torch.Tensor
    n_owned: int
    graph: LocalGraph | None = None
    structure: Structure | None = None
    comm: Communicator | None = None

    @property
    def n_local(self) -> int:
        return int(self.numbers.shape[0])


class DistributedModel(torch.nn.Module):
    """Base class of adapters.

    Subclasses set ``cutoff`` (Å, the atom-graph cutoff) and implement :meth:`forward`; they may
    narrow ``supported_numbers`` (the atomic numbers the model knows) and declare extra per-atom
    outputs in ``site_properties``.
    """

    cutoff: float
    supported_numbers: frozenset[int] | None = None
    num_layers: int | None = None
    """Message-passing layers: the ghost depth of the ``halo="ghost"`` baseline (None: the
    adapter does not support that baseline)."""
    site_properties: tuple[str, ...] = ()
    """Names of extra per-atom outputs; ``forward`` then sets ``self.last_site_properties``
    to a dict name → (n_owned, ...) tensor, which the calculator returns as a property."""

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        """Per-owned-atom energies, (n_owned,) eV."""
        raise NotImplementedError

    def check_numbers(self, numbers) -> None:
        """Raise ``ValueError`` naming the elements this model does not know."""
        if self.supported_numbers is None:
            return
        from ase.data import chemical_symbols

        unknown = sorted(set(int(z) for z in set(numbers.tolist())) - set(self.supported_numbers))
        if unknown:
            names = ", ".join(
                chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown
            )
            raise ValueError(
                f"{type(self).__name__} does not know element(s) {names}; "
                "remove them or use a model trained on them"
            )
