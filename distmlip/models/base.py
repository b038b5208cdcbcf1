"""The adapter protocol every model family implements.

An adapter is a ``torch.nn.Module`` that wraps an upstream model (reusing its submodules and
weights) and computes per-owned-atom energies from one worker's local graph, calling
``exchange`` wherever the upstream forward reads features of neighbouring atoms that another
worker owns. The engine owns everything else: graphs, partitions, communication, autograd for
forces and stress. Adapters import this module and :mod:`distmlip.exchange`, nothing else of
distmlip; see docs/adapters.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distmlip.exchange import Exchange, GraphTopology, RowDeclarer

__all__ = ["GraphInputs", "DistributedModel"]


@dataclass
class GraphInputs:
    """One worker's local graph as tensors, for one call.

    Attributes:
        numbers: (n_local,) int64 atomic numbers of owned rows then halo rows.
        vectors: (E, 3) edge vectors v = x_sender + shift·cell − x_receiver, Å; the autograd leaf
            for forces and stress.
        receivers: (E,) int64 local rows, all < n_owned.
        senders: (E,) int64 local rows.
        n_owned: number of owned rows.
        prepared: what the adapter's ``prepare`` returned for this graph (None without one).
        kept_edges: (E,) int64 index of each edge in the graph ``prepare`` saw, when the graph
            was built with a Verlet skin and is being reused (only the edges shorter than the
            cutoff are given); None when the edges are exactly those ``prepare`` saw.
        system: what the adapter's ``system_inputs`` read from this structure (e.g. its total
            charge), the same on every worker; empty for adapters that read nothing.
    """

    numbers: torch.Tensor
    vectors: torch.Tensor
    receivers: torch.Tensor
    senders: torch.Tensor
    n_owned: int
    prepared: Any = None
    kept_edges: torch.Tensor | None = None
    system: dict[str, Any] = field(default_factory=dict)

    @property
    def n_local(self) -> int:
        return int(self.numbers.shape[0])


class DistributedModel(torch.nn.Module):
    """Base class of adapters.

    Subclasses set ``cutoff`` (Å, the atom-graph cutoff) and implement :meth:`forward`; they may
    narrow ``supported_numbers`` (the atomic numbers the model knows), declare extra per-atom
    outputs in ``site_properties`` and derive per-graph structure once in :meth:`prepare`.
    """

    cutoff: float
    supported_numbers: frozenset[int] | None = None
    num_layers: int | None = None
    """Message-passing layers: the ghost depth of the ``halo="ghost"`` baseline (None: the
    adapter does not support that baseline)."""
    max_skin: float | None = None
    """Largest Verlet skin (Å) the adapter supports (None: its cutoff)."""
    site_properties: tuple[str, ...] = ()
    """Names of extra per-atom outputs, which ``forward`` returns in its second value."""
    direct_forces: bool = False
    """True for models that predict forces per atom instead of as the energy's gradient:
    ``forward`` then also returns ``"forces"`` (n_owned, 3) eV/Å in its second value, runs
    without autograd, and there is no stress."""

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> Any:
        """Derive structure from a newly built graph (numpy; collective: every rank calls it).

        Called once per graph build, not per call: with a Verlet skin the result serves every
        call that reuses the graph (as ``inputs.prepared``). Declare row kinds other than atoms
        here with ``rows.declare``. Default: nothing to prepare.
        """
        return None

    def system_inputs(self, atoms) -> dict[str, Any]:
        """Per-structure inputs other than positions (e.g. total charge and spin from
        ``atoms.info``), read and validated in the calling process before any worker computes
        (raise ``ValueError`` for bad values); sent to every worker as ``inputs.system``.
        Default: none."""
        return {}

    def forward(
        self, inputs: GraphInputs, exchange: Exchange
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-owned-atom energies, (n_owned,) eV; or ``(energies, {name: (n_owned, ...)})``
        with the outputs named in ``site_properties``."""
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
