"""The exchange protocol: how an adapter reaches rows that other workers own.

Everything an adapter needs, and all it may import besides :mod:`distmlip.models.base`:

* :class:`GraphTopology`: one worker's local graph as numpy arrays (global indices, owners of
  the rows, edges, image shifts, edge vectors), what :meth:`DistributedModel.prepare` sees.
* :class:`RowDeclarer`: in ``prepare``, declare rows other than atoms (bonds, edges, ...),
  keyed by global integer keys with an owner rank each; distmlip builds and agrees the halo
  plan, and the adapter gets each key's local row.
* :class:`Exchange`: what ``forward`` receives. ``exchange(owned)`` refreshes the atom halo
  (blocking); ``exchange.start(owned)`` / ``pending.finish()`` overlap it with work;
  ``exchange.reduce(local)`` sums halo partials into their owners (the adjoint);
  ``exchange.rows(kind)`` does the same for a declared row kind; ``exchange.sum_over_ranks``
  agrees an integer; ``exchange.reject_if`` refuses a structure on every worker together;
  ``exchange.checkpoint(layer, *args)`` runs a layer with activation checkpointing when the
  user asked for it (``exchange.checkpoint_modules(modules)`` for upstream layer loops).
  ``forward_exchange`` / ``reverse_exchange`` are the raw pair MACE's LAMMPS ML-IAP hook
  calls, so an adapter passes the exchange itself as MACE's ``lammps_class``.

Every differentiable exchange registers its output itself, so the engine ties it into every
rank's backward (a rank whose energy does not depend on a halo row must still answer its
peers' reverse transfers). Adapters never see plans, tags or the communicator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distmlip.errors import StructureRejected
from distmlip.exchange.checkpoint import CheckpointRegions
from distmlip.exchange.comm import Communicator, PendingExchange
from distmlip.graphs.halo import HaloPlan, rows_of

__all__ = [
    "StructureRejected",
    "GraphTopology",
    "RowLayout",
    "RowDeclarer",
    "Exchange",
    "RowExchange",
    "undirected_edge_keys",
    "sum_into",
]


@dataclass(frozen=True)
class GraphTopology:
    """One worker's local graph (numpy), as ``prepare`` sees it.

    Attributes:
        rank, world_size: this worker and P.
        n_atoms: atoms in the whole structure.
        n_owned: owned rows (the first ones).
        global_index: (n_local,) int64 global atom index of each local row.
        row_owner: (n_local,) int64 rank that owns each local row.
        receivers, senders: (E,) int64 local rows of each edge (receivers < n_owned).
        shifts: (E, 3) int64 image shift of each edge's sender.
        vectors: (E, 3) float64 edge vectors x_sender + shift·cell − x_receiver at build time, Å.
        skin: Å. The graph holds every edge shorter than ``cutoff + skin``; it is reused while
            no atom moves more than ``skin / 2``, with ``forward`` given the edges shorter than
            the cutoff (``GraphInputs.kept_edges``). Derived structure with a cutoff of its own
            (CHGNet's 3 Å bonds) must also be built with ``+ skin`` and re-selected per call.
    """

    rank: int
    world_size: int
    n_atoms: int
    n_owned: int
    global_index: np.ndarray
    row_owner: np.ndarray
    receivers: np.ndarray
    senders: np.ndarray
    shifts: np.ndarray
    vectors: np.ndarray
    skin: float = 0.0

    @property
    def n_local(self) -> int:
        return len(self.global_index)


@dataclass(frozen=True)
class RowLayout:
    """Local rows of a declared row kind: ``[owned..., halo grouped by owner rank...]``.

    Attributes:
        kind: the name it was declared with.
        row: (K,) local row of each declared key (equal keys share a row).
        n_owned: rows this worker owns (the first ones).
        n_local: owned + halo rows.
        first_key_of_row: (n_local,) index into the declared keys of one key of each row.
    """

    kind: str
    row: np.ndarray
    n_owned: int
    n_local: int
    first_key_of_row: np.ndarray


class RowDeclarer:
    """Given to ``prepare``: declares row kinds other than atoms (collective on every rank)."""

    def __init__(self, comm: Communicator):
        self._comm = comm
        self.plans: dict[str, HaloPlan] = {}

    def declare(self, kind: str, keys: np.ndarray, owners: np.ndarray) -> RowLayout:
        """Rows for ``keys`` (K,) int64 global keys, ``owners`` (K,) the rank owning each key.

        Every rank that holds a key must name the same owner for it, and the owner must
        hold it too. Rows this rank owns come first (by key), then halo rows grouped by
        owner rank (by key within a group), as for atoms.
        """
        comm = self._comm
        rank, world = comm.rank, comm.world_size
        keys = np.asarray(keys, dtype=np.int64)
        owners = np.asarray(owners, dtype=np.int64)
        unique_keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        unique_owner = owners[first]
        order = np.lexsort((unique_keys, unique_owner, unique_owner != rank))
        row_of_unique = np.empty(len(order), dtype=np.int64)
        row_of_unique[order] = np.arange(len(order))
        ordered_keys = unique_keys[order]
        n_owned = int(np.sum(unique_owner == rank))
        halo_owner = unique_owner[order][n_owned:]
        recv_counts = np.bincount(halo_owner, minlength=world).astype(np.int64)
        requests = np.split(ordered_keys[n_owned:], np.cumsum(recv_counts)[:-1])
        send_index = rows_of(ordered_keys[:n_owned], comm.exchange_requests(requests), rank)
        self.plans[kind] = HaloPlan(rank, world, n_owned, recv_counts, tuple(send_index))
        return RowLayout(
            kind=kind,
            row=row_of_unique[inverse.reshape(-1)],
            n_owned=n_owned,
            n_local=len(order),
            first_key_of_row=first[order],
        )

    def max_over_ranks(self, value: int) -> int:
        return self._comm.allreduce_int(value, "max")


def undirected_edge_keys(
    topology: GraphTopology, edges: np.ndarray, declarer: RowDeclarer
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A global key per undirected edge {a, b, S}, shared by both directions, and its owner.

    The canonical direction has receiver min(a, b) (for a self-image edge a = b, the one whose
    shift's first non-zero component is positive); the owner of the key is the owner of that
    receiver. The key packs (min end, max end, canonical shift) with a shift range agreed by
    all ranks (collective: every rank calls it).

    Args:
        edges: (K,) indices into ``topology``'s edges.

    Returns:
        keys (K,) int64, canonical (K,) bool (the edge is its key's canonical direction),
        owners (K,) int64.
    """
    receivers_g = topology.global_index[topology.receivers[edges]]
    senders_g = topology.global_index[topology.senders[edges]]
    shifts = topology.shifts[edges].astype(np.int64)
    first = np.argmax(shifts != 0, axis=1)
    negative = shifts[np.arange(len(shifts)), first] < 0
    flip = (receivers_g > senders_g) | ((receivers_g == senders_g) & negative)
    low = np.where(flip, senders_g, receivers_g)
    high = np.where(flip, receivers_g, senders_g)
    canonical_shift = np.where(flip[:, None], -shifts, shifts)
    bound = declarer.max_over_ranks(int(np.abs(canonical_shift).max()) if len(edges) else 0)
    base = 2 * bound + 1
    n = int(topology.n_atoms)
    if float(n) * n * float(base) ** 3 >= 2.0**62:
        raise ValueError(f"cannot key the edges of {n} atoms with image shifts up to {bound}")
    code = ((canonical_shift[:, 0] + bound) * base + canonical_shift[:, 1] + bound) * base
    code = code + canonical_shift[:, 2] + bound
    keys = (low * n + high) * base**3 + code
    owner_row = np.where(flip, topology.senders[edges], topology.receivers[edges])
    return keys, ~flip, topology.row_owner[owner_row]


class _SumInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, target, index, source):
        ctx.save_for_backward(index)
        return target.index_add(0, index, source)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)


def sum_into(target: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``target.index_add(0, index, source)``, whose backward keeps only ``index``.

    For summing edge chunks into atoms outside the chunks' checkpoint regions: torch's own
    ``index_add`` keeps ``source`` for its backward, which would keep every chunk.
    """
    if not torch.is_grad_enabled():
        return target.index_add(0, index, source)
    return _SumInto.apply(target, index, source)


class RowExchange:
    """Differentiable halo refresh and reduce of one row kind (atoms or a declared kind)."""

    def __init__(self, comm: Communicator, plan: HaloPlan):
        self._comm, self._plan = comm, plan
        self.n_owned, self.n_local = plan.n_owned, plan.n_local

    def __call__(self, owned: torch.Tensor) -> torch.Tensor:
        """(n_owned, ...) → (n_local, ...): owned rows, then the halo rows from their owners."""
        return self._comm.exchange(owned, self._plan)

    def reduce(self, local: torch.Tensor) -> torch.Tensor:
        """(n_local, ...) → (n_owned, ...): each owned row plus the partial values peers hold
        for it in their halo rows (the adjoint of the refresh; for sums computed in parts)."""
        return self._comm.reduce(local, self._plan)


class Exchange(CheckpointRegions, RowExchange):
    """The ``exchange`` adapters receive (halo-exchange mode); see the module docstring."""

    def __init__(
        self,
        comm: Communicator,
        plan: HaloPlan,
        row_plans: dict[str, HaloPlan],
        checkpoint: bool | int = False,
    ):
        super().__init__(comm, plan)
        self._row_plans = row_plans
        self._lammps_tags: list[int] = []
        self._bind = comm.bound  # a checkpointed region records, its re-run replays
        self._init_checkpointing(checkpoint)

    def start(self, owned: torch.Tensor) -> tuple[torch.Tensor, PendingExchange]:
        """``(owned, pending)`` at once; ``pending.finish()`` → (n_halo, ...) halo rows later.

        Compute with the returned ``owned`` (so the backward's reverse transfer overlaps the
        same work); ``cat([owned, pending.finish()])`` equals ``exchange(owned)``.
        """
        return self._comm.start_exchange(owned, self._plan)

    def rows(self, kind: str) -> RowExchange:
        """The exchange of a row kind declared in ``prepare``."""
        if kind not in self._row_plans:
            raise KeyError(f"no row kind {kind!r} was declared in prepare()")
        return RowExchange(self._comm, self._row_plans[kind])

    def sum_over_ranks(self, value: int) -> int:
        """An integer summed over all workers (collective)."""
        return self._comm.allreduce_int(value, "sum")

    def reject_if(self, condition: bool, message: str) -> None:
        """Refuse the structure if ``condition`` holds on any worker (collective: every worker
        calls it): all raise :class:`StructureRejected` (``message``), so none is left
        waiting in an exchange, and the caller gets one ``ValueError``."""
        if self.sum_over_ranks(int(bool(condition))):
            raise StructureRejected(message)

    # MACE's LAMMPS ML-IAP hook: mace.tools.utils.LAMMPS_MP calls these with owned rows padded
    # by ghost rows, and in its backward with the gradient of all local rows. Backward runs the
    # exchanges in reverse order on every rank, so a stack of tags pairs each with its forward.

    def forward_exchange(self, feats: torch.Tensor, out: torch.Tensor, width: int) -> None:
        comm = self._comm
        if comm.replay is not None and comm.replay.replaying:  # recomputing a checkpoint
            out.copy_(comm.replay.next())
            return
        tag = comm.next_tag()
        out.copy_(comm.forward_rows(feats[: self.n_owned].contiguous(), self._plan, tag))
        if comm.replay is not None:  # in a checkpointed region: keep the rows for its re-run
            comm.replay.record(out)
        self._lammps_tags.append(tag)
        comm.outputs.append(out)  # becomes LAMMPS_MP's output (same tensor, with a grad_fn)

    def reverse_exchange(self, grad: torch.Tensor, gout: torch.Tensor, width: int) -> None:
        gout.zero_()
        tag = self._lammps_tags.pop()
        gout[: self.n_owned] = self._comm.reverse_sum(grad.contiguous(), self._plan, tag + 1)
