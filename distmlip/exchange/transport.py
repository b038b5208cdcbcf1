"""Point-to-point transfers with a timeout on every wait, staged through host memory where
the backend cannot move device tensors (gloo with CUDA tensors)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from distmlip.errors import first_line

__all__ = [
    "CommunicationError",
    "collective",
    "post",
    "wait_all",
    "point_to_point",
    "unstage",
    "stages_transfers",
]


class CommunicationError(RuntimeError):
    """A halo exchange failed or timed out (a peer died, hung, or the network broke)."""


def collective(start, timeout: float, what: str) -> None:
    """Run a collective: ``start()`` posts it (``async_op=True``) and returns its work, which
    is waited for at most ``timeout`` s; a failure or timeout is a :class:`CommunicationError`
    naming ``what``."""
    try:
        work = start()
    except Exception as error:
        raise CommunicationError(f"{what} failed ({first_line(error)})") from error
    wait_all([work], timeout, what)


def wait_all(works, timeout: float, what: str) -> None:
    for work in works:
        try:
            completed = work.wait(datetime.timedelta(seconds=timeout))
        except Exception as error:  # gloo raises on timeout and on closed connections
            reason = first_line(error)
            raise CommunicationError(
                f"{what} failed ({reason}): a peer worker may have died or be stuck; "
                "increase `timeout` if the system is just slow"
            ) from error
        if completed is False:
            raise CommunicationError(
                f"{what} timed out after {timeout:.0f} s: a peer worker may be stuck (stopped "
                "or deadlocked) or dead; increase `timeout` if the system is just slow"
            )


_STAGE_ENVIRONMENT = "DISTMLIP_STAGE_TRANSFERS"
"""``=1``: stage point-to-point transfers through host memory on any device (tests that path
on the CPU)."""


def stages_transfers(device: torch.device) -> bool:
    """Whether point-to-point transfers of ``device`` tensors must go through host memory.

    gloo cannot send or receive CUDA tensors point-to-point (``batch_isend_irecv`` fails with
    "writev: Bad address"; its collectives do take them), so workers that share GPUs over
    gloo copy every message to the host and back. NCCL and CPU tensors need no copies.
    """
    if os.environ.get(_STAGE_ENVIRONMENT) == "1":
        return True
    return device.type == "cuda" and dist.is_initialized() and dist.get_backend() == "gloo"


def _stage(sends, receives) -> tuple[list, list, list]:
    """Host copies of ``sends``, host buffers for ``receives`` (both ``[(peer, tensor)]``),
    and the ``(receive, buffer)`` pairs :func:`unstage` copies after the transfer."""
    buffers = [(peer, torch.empty(t.shape, dtype=t.dtype, device="cpu")) for peer, t in receives]
    copies = [(t, buffer) for (_, t), (_, buffer) in zip(receives, buffers, strict=True)]
    # A copy even of a host tensor, so the CPU test of this path sends what the GPU path sends.
    return [(peer, t.to("cpu", copy=True)) for peer, t in sends], buffers, copies


def unstage(copies) -> None:
    """Copy each received host buffer into its tensor (on the device)."""
    for tensor, buffer in copies:
        tensor.copy_(buffer)


def post(sends, receives, tag: int, staged: bool = False) -> tuple[list, list]:
    """Post all sends and receives ``[(peer, tensor)]`` at once. Returns the works to wait for
    and, if ``staged`` (see :func:`stages_transfers`), the copies to :func:`unstage` after."""
    copies = []
    if staged:
        sends, receives, copies = _stage(sends, receives)
    operations = [dist.P2POp(dist.isend, tensor, peer, tag=tag) for peer, tensor in sends]
    operations += [dist.P2POp(dist.irecv, tensor, peer, tag=tag) for peer, tensor in receives]
    return (dist.batch_isend_irecv(operations) if operations else []), copies


def point_to_point(
    sends, receives, tag: int, timeout: float, what: str, staged: bool = False
) -> None:
    """Post all sends and receives ``[(peer, tensor)]`` at once, then wait for all of them."""
    works, copies = post(sends, receives, tag, staged)
    wait_all(works, timeout, what)
    unstage(copies)
