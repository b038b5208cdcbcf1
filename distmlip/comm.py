"""Differentiable halo exchange over torch.distributed (gloo on CPU, NCCL on CUDA).

Only point-to-point messages between ranks that share a border are sent. Every wait has a
timeout: a dead or stuck peer raises :class:`CommunicationError` instead of hanging.

The exchange is an autograd ``Function``:

* forward: ``(n_owned, ...)`` owned rows → ``(n_owned + n_halo, ...)`` local rows, the halo rows
  fresh from their owners;
* backward: the gradient of the halo rows travels back to the owners and is summed into their
  owned rows (the adjoint of a copy is a sum).
"""

from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist

from distmlip.halo import LocalGraph

__all__ = ["CommunicationError", "HaloExchanger", "exchange_requests"]

# Tags keep messages of different exchanges apart on gloo (NCCL orders point-to-point messages
# per pair of ranks and ignores tags; every rank issues exchanges in the same order).
_REQUEST_TAG = 1 << 30


class CommunicationError(RuntimeError):
    """A halo exchange failed or timed out (a peer died, hung, or the network broke)."""


def _wait_all(works, timeout: float, what: str) -> None:
    for work in works:
        try:
            completed = work.wait(datetime.timedelta(seconds=timeout))
        except Exception as error:  # gloo raises on timeout and on closed connections
            raise CommunicationError(
                f"{what} failed: {error}. A peer worker probably died or is stuck; "
                "increase `timeout` if the system is just slow"
            ) from error
        if completed is False:
            raise CommunicationError(f"{what} timed out after {timeout:.0f} s")


def _point_to_point(sends, receives, tag: int, timeout: float, what: str) -> None:
    """Post all sends and receives ``[(peer, tensor)]`` at once, then wait for all of them."""
    operations = [dist.P2POp(dist.isend, tensor, peer, tag=tag) for peer, tensor in sends]
    operations += [dist.P2POp(dist.irecv, tensor, peer, tag=tag) for peer, tensor in receives]
    if operations:
        _wait_all(dist.batch_isend_irecv(operations), timeout, what)


def exchange_requests(graph: LocalGraph, device: torch.device, timeout: float) -> list[np.ndarray]:
    """Tell every peer which of its atoms this rank needs; return what each peer needs from us.

    One all-gather of the (P, P) request-count matrix, then point-to-point index lists.
    """
    world, rank = graph.world_size, graph.rank
    requests = graph.requests()
    counts = torch.tensor([len(r) for r in requests], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(counts) for _ in range(world)]
    try:
        dist.all_gather(gathered, counts, async_op=True).wait(datetime.timedelta(seconds=timeout))
    except Exception as error:
        raise CommunicationError(f"gathering halo request counts failed: {error}") from error
    incoming = [int(gathered[q][rank]) for q in range(world)]
    sends = [
        (q, torch.as_tensor(requests[q], device=device))
        for q in range(world)
        if q != rank and len(requests[q])
    ]
    buffers = [torch.empty(n, dtype=torch.int64, device=device) for n in incoming]
    receives = [(q, buffers[q]) for q in range(world) if q != rank and incoming[q]]
    _point_to_point(sends, receives, _REQUEST_TAG, timeout, "exchanging halo requests")
    return [buffer.cpu().numpy() for buffer in buffers]


class HaloExchanger:
    """Moves halo rows for one resolved :class:`LocalGraph`.

    Call it (``exchanger(owned_rows)``) inside a model's forward; the engine calls
    :meth:`reverse_sum` for per-atom quantities computed on local rows (forces).

    Attributes:
        outputs: every differentiable exchange output of the current evaluation; the engine
            ties them into the loss so each rank runs every exchange's backward (a rank whose
            energy does not depend on some halo row must still answer its peers).
    """

    def __init__(self, graph: LocalGraph, device: torch.device, timeout: float = 600.0):
        assert graph.send_index is not None, "resolve the halo plan first"
        self.graph = graph
        self.device = device
        self.timeout = float(timeout)
        self.distributed = graph.world_size > 1
        self.send_index = [torch.as_tensor(index, device=device) for index in graph.send_index]
        offsets = graph.n_owned + np.concatenate([[0], np.cumsum(graph.recv_counts)])
        self.recv_slices = [slice(int(offsets[q]), int(offsets[q + 1])) for q in range(graph.world_size)]
        self.halo_index = torch.arange(graph.n_owned, graph.n_local, device=device)
        self.calls = 0
        self.bytes_sent = 0
        self.outputs: list[torch.Tensor] = []

    def reset(self) -> None:
        self.calls = 0
        self.bytes_sent = 0
        self.outputs = []

    def _peers(self, counts) -> list[int]:
        return [q for q in range(self.graph.world_size) if q != self.graph.rank and counts[q]]

    def forward_rows(self, owned: torch.Tensor, tag: int) -> torch.Tensor:
        """(n_owned, ...) → (n_local, ...): append the halo rows received from their owners."""
        graph = self.graph
        if owned.shape[0] != graph.n_owned:
            raise ValueError(f"expected {graph.n_owned} owned rows, got {owned.shape[0]}")
        local = owned.new_empty((graph.n_local, *owned.shape[1:]))
        local[: graph.n_owned] = owned
        if not self.distributed:
            return local
        sends = [(q, owned[self.send_index[q]].contiguous()) for q in self._peers(graph.send_counts)]
        receives = [(q, local[self.recv_slices[q]]) for q in self._peers(graph.recv_counts)]
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in sends)
        _point_to_point(sends, receives, tag, self.timeout, "halo exchange")
        return local

    def reverse_sum(self, local: torch.Tensor, tag: int | None = None) -> torch.Tensor:
        """(n_local, ...) → (n_owned, ...): owned rows plus the halo rows peers hold for them."""
        graph = self.graph
        owned = local[: graph.n_owned].clone()
        if not self.distributed:
            return owned
        if tag is None:
            tag = self._next_tag()
        sends = [(q, local[self.recv_slices[q]].contiguous()) for q in self._peers(graph.recv_counts)]
        peers = self._peers(graph.send_counts)
        buffers = {q: local.new_empty((len(self.send_index[q]), *local.shape[1:])) for q in peers}
        _point_to_point(sends, list(buffers.items()), tag, self.timeout, "reverse halo exchange")
        for q, buffer in buffers.items():
            owned.index_add_(0, self.send_index[q], buffer)
        return owned

    def _next_tag(self) -> int:
        self.calls += 1
        return 2 * self.calls

    def __call__(self, owned: torch.Tensor) -> torch.Tensor:
        tag = self._next_tag()
        local = _HaloExchange.apply(owned, self, tag)
        if local.requires_grad:
            self.outputs.append(local)
        return local


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned: torch.Tensor, exchanger: HaloExchanger, tag: int) -> torch.Tensor:
        ctx.exchanger = exchanger
        ctx.tag = tag
        return exchanger.forward_rows(owned, tag)

    @staticmethod
    def backward(ctx, grad_local: torch.Tensor):
        # The backward of forward exchange `tag` uses tag + 1: unique, and equal on every rank.
        return ctx.exchanger.reverse_sum(grad_local.contiguous(), ctx.tag + 1), None, None
