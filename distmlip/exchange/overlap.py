"""A halo refresh that overlaps with computation: started, computed around, finished.

See :meth:`distmlip.exchange.comm.Communicator.start_exchange`; the transfers are the
communicator's.
"""

from __future__ import annotations

from typing import Protocol

import torch

from distmlip.graphs.halo import HaloPlan


class Communicator(Protocol):
    """What a pending exchange uses of :class:`distmlip.exchange.comm.Communicator` (which
    imports this module: the protocol keeps the imports one-way)."""

    world_size: int
    outputs: list

    def halo_indices(self, plan: HaloPlan) -> tuple: ...

    def peers_of(self, counts) -> list[int]: ...

    def post(self, sends, receives, tag: int, what: str) -> tuple: ...

    def wait_posted(self, posted: tuple) -> None: ...

    def replayed(self, compute): ...


__all__ = ["PendingExchange", "ExchangeStart"]


class PendingExchange:
    """A halo refresh in flight (see :meth:`Communicator.start_exchange`).

    Forward: the owned rows were posted to the peers and the halo rows are being received into
    ``halo``. Backward (in reverse order): ``finish``'s backward posts the halo gradients to their
    owners; the start's backward, which autograd runs after every use of the routed owned rows,
    waits for the gradients peers send back and sums them into the owned rows.
    """

    def __init__(self, comm: Communicator, plan: HaloPlan, tag: int):
        self.comm, self.plan, self.tag = comm, plan, tag
        self._started: torch.Tensor | None = None  # the start's output, until finish
        self.halo: torch.Tensor | None = None
        self.posted = None
        self.reverse = None  # (posted transfer, receive buffers) of the backward

    def finish(self) -> torch.Tensor:
        """(n_halo, ...) halo rows; waits for the transfer started by ``start_exchange``."""
        return self.comm.replayed(self._finish)

    def _finish(self) -> torch.Tensor:
        if self._started is None:
            raise RuntimeError("finish() called twice, or before start_exchange()")
        # Dropping the start's output here keeps autograd nodes from referencing this object
        # while it references them (a cycle Python's collector cannot see through).
        started, self._started = self._started, None
        halo = ExchangeFinish.apply(started, self)
        if halo.requires_grad:
            self.comm.outputs.append(halo)
        return halo

    def post_forward(self, owned: torch.Tensor) -> None:
        comm, plan = self.comm, self.plan
        self.halo = owned.new_empty((plan.n_local - plan.n_owned, *owned.shape[1:]))
        if comm.world_size == 1:
            return
        send_index, _ = comm.halo_indices(plan)
        sends = [(q, owned[send_index[q]].contiguous()) for q in comm.peers_of(plan.send_counts)]
        receives = [(q, self.halo[self._halo_slice(q)]) for q in comm.peers_of(plan.recv_counts)]
        self.posted = comm.post(sends, receives, self.tag, "halo exchange (overlapped)")

    def _halo_slice(self, peer: int) -> slice:
        """Rows of ``peer``'s atoms within the (n_halo, ...) halo block."""
        rows = self.comm.halo_indices(self.plan)[1][peer]
        return slice(rows.start - self.plan.n_owned, rows.stop - self.plan.n_owned)

    def wait_forward(self) -> torch.Tensor:
        if self.posted is not None:
            self.comm.wait_posted(self.posted)
            self.posted = None
        halo, self.halo = self.halo, None
        return halo

    def post_backward(self, grad_halo: torch.Tensor) -> None:
        comm, plan = self.comm, self.plan
        if comm.world_size == 1:
            return
        send_index, _ = comm.halo_indices(plan)
        grad_halo = grad_halo.contiguous()
        sends = [(q, grad_halo[self._halo_slice(q)]) for q in comm.peers_of(plan.recv_counts)]
        buffers = {
            q: grad_halo.new_empty((len(send_index[q]), *grad_halo.shape[1:]))
            for q in comm.peers_of(plan.send_counts)
        }
        posted = comm.post(sends, list(buffers.items()), self.tag + 1, "reverse halo exchange")
        self.reverse = (posted, buffers)

    def wait_backward(self, grad_owned: torch.Tensor) -> torch.Tensor:
        if self.reverse is None:
            return grad_owned
        posted, buffers = self.reverse
        self.reverse = None
        self.comm.wait_posted(posted)
        send_index, _ = self.comm.halo_indices(self.plan)
        grad_owned = grad_owned.clone()
        for q, buffer in buffers.items():
            grad_owned.index_add_(0, send_index[q], buffer)
        return grad_owned


class ExchangeStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned, pending: PendingExchange):
        ctx.pending = pending
        pending.post_forward(owned)
        return owned.view_as(owned)

    @staticmethod
    def backward(ctx, grad_owned: torch.Tensor):
        return ctx.pending.wait_backward(grad_owned), None


class ExchangeFinish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned, pending: PendingExchange):
        ctx.pending = pending
        ctx.owned_shape = owned.shape
        return pending.wait_forward()

    @staticmethod
    def backward(ctx, grad_halo: torch.Tensor):
        ctx.pending.post_backward(grad_halo)
        # The halo's gradient reaches the owned rows through the start's backward, on the peers.
        return grad_halo.new_zeros(ctx.owned_shape), None
