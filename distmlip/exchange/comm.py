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

import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from distmlip import trace
from distmlip.exchange.overlap import ExchangeStart, PendingExchange
from distmlip.exchange.transport import (
    CommunicationError,
    collective,
    point_to_point,
    post,
    stages_transfers,
    unstage,
    wait_all,
)
from distmlip.graphs.halo import HaloPlan

__all__ = ["CommunicationError", "Communicator", "PendingExchange"]

# Tags keep messages of different exchanges apart on gloo (NCCL orders point-to-point messages
# per pair of ranks and ignores tags; every rank issues exchanges in the same order).
_REQUEST_TAG = 1 << 30


class Communicator:
    """Halo exchanges of one evaluation on one rank, for any number of :class:`HaloPlan` s.

    ``exchange(owned, plan)`` is differentiable; ``reverse_sum(local, plan)`` is its adjoint
    (used directly for forces). All exchanges share one tag counter, so every message of an
    evaluation has a unique tag that is the same on every rank.

    Attributes:
        outputs: every differentiable exchange output of the current evaluation; the engine ties
            them into the loss so each rank runs every exchange's backward (a rank whose energy
            does not depend on some halo row must still answer its peers).
        calls, bytes_sent: counters for statistics.
        staged: transfers go through host memory (default: :func:`stages_transfers`).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout: float = 600.0,
        staged: bool | None = None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout = float(timeout)
        self.staged = stages_transfers(device) if staged is None else staged
        self._index_cache: dict[int, tuple] = {}
        self.replay = None  # a checkpoint.Replay while a checkpointed region runs
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.bytes_sent = 0
        self.seconds = 0.0
        self.outputs: list[torch.Tensor] = []
        self._index_cache = {}

    @contextmanager
    def bound(self, replay):
        """Record (first run) or replay (recomputation) this communicator's results through
        ``replay`` within the block: see :mod:`distmlip.exchange.checkpoint`."""
        previous, self.replay = self.replay, replay
        try:
            yield
        finally:
            self.replay = previous

    def replayed(self, compute):
        """``compute()``; recorded, or replayed without communicating, in a checkpointed region."""
        replay = self.replay
        if replay is None:
            return compute()
        if replay.replaying:
            return replay.next()
        return replay.record(compute())

    def next_tag(self) -> int:
        """A fresh message tag (even; its backward uses tag + 1), equal on every rank."""
        self.calls += 1
        return 2 * self.calls

    def _transfer(self, sends, receives, tag: int, what: str) -> None:
        """Point-to-point rows, timed and counted."""
        self.wait_posted(self.post(sends, receives, tag, what))

    def post(self, sends, receives, tag: int, what: str) -> tuple:
        """Start a transfer; :meth:`wait_posted` completes it (the time between is overlap).

        When a trace is recorded, each transfer is an ``"exchange"`` event with ``what``,
        ``tag``, ``bytes_sent``, ``seconds`` (spent posting and waiting) and ``done_at``.
        """
        start = time.perf_counter()
        works, copies = post(sends, receives, tag, self.staged)
        sent = sum(t.numel() * t.element_size() for _, t in sends)
        entry = trace.event("exchange", what=what, tag=tag, bytes_sent=sent, seconds=0.0)
        if entry is not None:
            entry["_posted"] = time.perf_counter()
        self.bytes_sent += sent
        return works, copies, what, entry, time.perf_counter() - start

    def wait_posted(self, posted: tuple) -> None:
        works, copies, what, entry, post_seconds = posted
        start = time.perf_counter()
        wait_all(works, self.timeout, what)
        unstage(copies)
        elapsed = post_seconds + time.perf_counter() - start
        self.seconds += elapsed
        if entry is not None:
            entry["seconds"] = elapsed
            entry["done_at"] = entry["at"] + (time.perf_counter() - entry.pop("_posted"))

    def peers_of(self, counts) -> list[int]:
        return [q for q in range(self.world_size) if q != self.rank and counts[q]]

    def halo_indices(self, plan: HaloPlan) -> tuple[list[torch.Tensor], list[slice]]:
        cached = self._index_cache.get(id(plan))
        if cached is None or cached[0] is not plan:
            send = [torch.as_tensor(index, device=self.device) for index in plan.send_index]
            offsets = plan.n_owned + np.concatenate([[0], np.cumsum(plan.recv_counts)])
            slices = [slice(int(offsets[q]), int(offsets[q + 1])) for q in range(self.world_size)]
            cached = (plan, send, slices)
            self._index_cache[id(plan)] = cached
        return cached[1], cached[2]

    def forward_rows(self, owned: torch.Tensor, plan: HaloPlan, tag: int) -> torch.Tensor:
        """(n_owned, ...) → (n_local, ...): append the halo rows received from their owners."""
        if owned.shape[0] != plan.n_owned:
            raise ValueError(f"expected {plan.n_owned} owned rows, got {owned.shape[0]}")
        local = owned.new_empty((plan.n_local, *owned.shape[1:]))
        local[: plan.n_owned] = owned
        if self.world_size == 1:
            return local
        send_index, recv_slices = self.halo_indices(plan)
        sends = [(q, owned[send_index[q]].contiguous()) for q in self.peers_of(plan.send_counts)]
        receives = [(q, local[recv_slices[q]]) for q in self.peers_of(plan.recv_counts)]
        self._transfer(sends, receives, tag, "halo exchange")
        return local

    def reverse_sum(self, local: torch.Tensor, plan: HaloPlan, tag: int | None = None):
        """(n_local, ...) → (n_owned, ...): owned rows plus the halo rows peers hold for them."""
        owned = local[: plan.n_owned].clone()
        if self.world_size == 1:
            return owned
        if tag is None:
            tag = self.next_tag()
        send_index, recv_slices = self.halo_indices(plan)
        sends = [(q, local[recv_slices[q]].contiguous()) for q in self.peers_of(plan.recv_counts)]
        buffers = {
            q: local.new_empty((len(send_index[q]), *local.shape[1:]))
            for q in self.peers_of(plan.send_counts)
        }
        self._transfer(sends, list(buffers.items()), tag, "reverse halo exchange")
        for q, buffer in buffers.items():
            owned.index_add_(0, send_index[q], buffer)
        return owned

    def start_exchange(
        self, owned: torch.Tensor, plan: HaloPlan
    ) -> tuple[torch.Tensor, PendingExchange]:
        """Start a differentiable halo refresh and return at once, to overlap it with work.

        Returns ``(owned, pending)``: the same owned rows routed through the exchange (compute
        with these, so that the backward's reverse transfer overlaps the same work), and the
        transfer in flight; ``pending.finish()`` waits and gives the (n_halo, ...) halo rows.
        ``cat([owned, pending.finish()])`` equals ``exchange(owned, plan)``.
        """
        return self.replayed(lambda: self._start_exchange(owned, plan))

    def _start_exchange(self, owned, plan):
        if owned.shape[0] != plan.n_owned:
            raise ValueError(f"expected {plan.n_owned} owned rows, got {owned.shape[0]}")
        pending = PendingExchange(self, plan, self.next_tag())
        routed = ExchangeStart.apply(owned, pending)
        pending._started = routed
        return routed, pending

    def exchange(self, owned: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
        """Differentiable (n_owned, ...) → (n_local, ...) halo refresh."""
        return self.replayed(lambda: self._exchange(owned, plan))

    def _exchange(self, owned, plan):
        tag = self.next_tag()
        local = _HaloExchange.apply(owned, self, plan, tag)
        if local.requires_grad:
            self.outputs.append(local)
        return local

    def reduce(self, local: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
        """Differentiable (n_local, ...) → (n_owned, ...): owned rows plus the partial sums
        that peers hold in their halo rows for them (the adjoint of :meth:`exchange`).

        Used when several workers each compute part of a sum onto one row (CHGNet's bond
        updates collect angle messages from both ends of a bond).
        """
        return self.replayed(lambda: self._reduce(local, plan))

    def _reduce(self, local, plan):
        tag = self.next_tag()
        owned = _HaloReduce.apply(local, self, plan, tag)
        if owned.requires_grad:
            self.outputs.append(owned)
        return owned

    def allreduce_int(self, value: int, op: str = "sum") -> int:
        """``op`` ("sum" or "max") of an integer over all ranks (blocking, with the timeout)."""
        return self.replayed(lambda: self._allreduce_int(value, op))

    def _allreduce_int(self, value: int, op: str) -> int:
        if op not in ("sum", "max"):
            raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
        if self.world_size == 1:
            return int(value)
        total = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        start = partial(dist.all_reduce, total, op=reduce_op, async_op=True)
        collective(start, self.timeout, "all-reduce of an integer")
        return int(total.item())

    def broadcast_int64(self, values: np.ndarray | None, length: int, root: int = 0) -> np.ndarray:
        """(length,) int64 ``values`` of rank ``root`` on every rank (others pass None)."""
        if self.world_size == 1:
            return np.asarray(values, dtype=np.int64)
        if self.rank == root:
            buffer = torch.as_tensor(np.asarray(values, dtype=np.int64)).to(self.device)
        else:
            buffer = torch.empty(length, dtype=torch.int64, device=self.device)
        start = partial(dist.broadcast, buffer, src=root, async_op=True)
        collective(start, self.timeout, f"broadcast from rank {root}")
        return buffer.cpu().numpy()

    def exchange_requests(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        """Send each peer q the keys this rank needs from it (``requests[q]``, int64 1-D);
        return the keys each peer needs from this rank.

        One all-gather of request counts, then point-to-point key lists.
        """
        world, rank = self.world_size, self.rank
        if world == 1:
            return [np.zeros(0, dtype=np.int64)]
        counts = torch.tensor([len(r) for r in requests], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        start = partial(dist.all_gather, gathered, counts, async_op=True)
        collective(start, self.timeout, "gathering halo request counts")
        incoming = [int(gathered[q][rank]) for q in range(world)]
        sends = [
            (q, torch.as_tensor(np.asarray(requests[q], dtype=np.int64), device=self.device))
            for q in self.peers_of([len(r) for r in requests])
        ]
        buffers = [torch.empty(n, dtype=torch.int64, device=self.device) for n in incoming]
        receives = [(q, buffers[q]) for q in self.peers_of(incoming)]
        what = "exchanging halo requests"
        point_to_point(sends, receives, _REQUEST_TAG, self.timeout, what, self.staged)
        return [buffer.cpu().numpy() for buffer in buffers]


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned, communicator: Communicator, plan: HaloPlan, tag: int):
        ctx.communicator = communicator
        ctx.plan = plan
        ctx.tag = tag
        return communicator.forward_rows(owned, plan, tag)

    @staticmethod
    def backward(ctx, grad_local: torch.Tensor):
        # The backward of forward exchange `tag` uses tag + 1: unique, and equal on every rank.
        grad = ctx.communicator.reverse_sum(grad_local.contiguous(), ctx.plan, ctx.tag + 1)
        return grad, None, None, None


class _HaloReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, communicator: Communicator, plan: HaloPlan, tag: int):
        ctx.communicator = communicator
        ctx.plan = plan
        ctx.tag = tag
        return communicator.reverse_sum(local, plan, tag)

    @staticmethod
    def backward(ctx, grad_owned: torch.Tensor):
        # The adjoint of a sum into owners is a copy back to the halo rows (tag + 1, as above).
        grad = ctx.communicator.forward_rows(grad_owned.contiguous(), ctx.plan, ctx.tag + 1)
        return grad, None, None, None
