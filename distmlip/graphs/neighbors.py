"""Atom graphs from vesin neighbour lists.

Convention used everywhere in distmlip: a directed edge ``j -> i`` has *receiver* ``i`` (the
atom its message is summed onto), *sender* ``j`` and integer image ``shift`` S, and its vector is

    v = x_j + S @ cell - x_i            (Å)

which is vesin's ``r_ij``. Cells smaller than twice the cutoff give several edges between the same
pair of atoms (different shifts) and self-image edges ``i -> i`` with ``S != 0``.
"""

from __future__ import annotations

import numpy as np
import vesin

from distmlip import trace
from distmlip.graphs.structure import EdgeList

__all__ = ["neighbor_list", "neighborhood_mask", "binning_frame", "search_box"]


def neighbor_list(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    receiver_mask: np.ndarray | None = None,
    senders_in_mask_first: bool = False,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> EdgeList:
    """All directed edges with |v| < cutoff (full list, both directions), via vesin.

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) Å.
        pbc: (3,) bool.
        cutoff: Å.
        receiver_mask: optional (n,) bool; keep only the edges whose receiver it selects
            (the same edges as filtering the full list afterwards, but only the kept ones are
            copied and converted).
        senders_in_mask_first: with ``receiver_mask``, list the kept edges whose sender the
            mask also selects first, then the others (each group in search order).
        pairs: vesin's half list ``(i, j, S)`` of these positions computed elsewhere (with
            vesin-torch on the worker's device: :func:`distmlip.worker.resident.device_pairs`),
            used instead of searching here; the same edges result.
    """
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return EdgeList(empty, empty, np.zeros((0, 3), dtype=np.int64))
    # vesin's half list holds each pair once, (i, j, S); the other direction is (j, i, −S).
    # Searching each pair once and mirroring it is cheaper than vesin's full list.
    if pairs is not None:
        i, j, shifts = pairs
    else:
        calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=False)
        # copy=False: views into the calculator's buffers (valid while ``calculator`` lives);
        # the int64 results below are the only copies, of the kept edges only.
        with trace.span("vesin"):
            i, j, shifts = calculator.compute(
                np.ascontiguousarray(positions, dtype=np.float64),
                np.ascontiguousarray(search_box(cell, pbc), dtype=np.float64),
                [bool(p) for p in pbc],
                quantities="ijS",
                copy=False,
            )
    # Groups of (pair indices, mirrored?), concatenated in order.
    if receiver_mask is None:
        every = np.arange(len(i))
        groups = [(every, False), (every, True)]
    else:
        receiver_mask = np.asarray(receiver_mask, dtype=bool)
        forward = np.flatnonzero(receiver_mask[i])  # edge j -> i
        backward = np.flatnonzero(receiver_mask[j])  # edge i -> j
        if senders_in_mask_first:
            forward_in = receiver_mask[j.take(forward)]
            backward_in = receiver_mask[i.take(backward)]
            groups = [
                (forward[forward_in], False),
                (backward[backward_in], True),
                (forward[~forward_in], False),
                (backward[~backward_in], True),
            ]
        else:
            groups = [(forward, False), (backward, True)]
    receivers = np.concatenate([_take_int64(j if m else i, index) for index, m in groups])
    senders = np.concatenate([_take_int64(i if m else j, index) for index, m in groups])
    edge_shifts = np.empty((len(receivers), 3), dtype=np.int64)
    start = 0
    for index, mirrored in groups:
        part = edge_shifts[start : start + len(index)]
        part[:] = shifts.take(index, axis=0)
        if mirrored:
            np.negative(part, out=part)
        start += len(index)
    return EdgeList(receivers=receivers, senders=senders, shifts=edge_shifts)


def search_box(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The box vesin is given: the cell, or zeros when nothing is periodic (vesin's own cell
    check rejects degenerate periodic boxes, which callers validate earlier, more clearly)."""
    return cell if np.any(pbc) else np.zeros((3, 3))


def _take_int64(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` as int64, gathered straight into the result (vesin's size_t < 2**63)."""
    if values.dtype.itemsize != 8 or values.dtype.kind not in "iu":
        return values.take(index).astype(np.int64)
    result = np.empty(len(index), dtype=np.int64)
    # mode="clip" never triggers (indices come from flatnonzero) but avoids numpy buffering `out`.
    values.take(index, out=result.view(values.dtype), mode="clip")
    return result


def binning_frame(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """A full-rank (3, 3) frame whose periodic rows are the cell's periodic lattice vectors.

    Non-periodic rows that are zero or linearly dependent are replaced by unit vectors orthogonal
    to the periodic ones, so fractional coordinates exist for any pbc. Fully non-periodic systems
    get the Cartesian frame.
    """
    frame = np.array(cell, dtype=np.float64, copy=True)
    periodic = np.asarray(pbc, dtype=bool)
    if not periodic.any():
        return np.eye(3)
    scale = max(np.linalg.norm(frame[periodic], axis=1).max(), 1.0)
    if abs(np.linalg.det(frame)) > 1e-8 * scale**3:
        return frame
    basis = list(frame[periodic])
    for axis in np.flatnonzero(~periodic):
        # Project Cartesian axes off the span of the rows kept so far; take the first that
        # survives (the rows need not be orthogonal, hence the QR).
        orthonormal, _ = np.linalg.qr(np.array(basis).T)
        for seed in np.eye(3):
            vector = seed - orthonormal @ (orthonormal.T @ seed)
            if np.linalg.norm(vector) > 1e-6:
                frame[axis] = vector / np.linalg.norm(vector)
                basis.append(frame[axis])
                break
    return frame


def neighborhood_mask(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    selected: np.ndarray,
    cutoff: float,
    max_bins_per_axis: int = 256,
    max_bins: int = 1 << 22,
) -> np.ndarray:
    """Atoms that may lie within ``cutoff`` of a selected atom (a superset; selected included).

    A cell list in the fractional coordinates of :func:`binning_frame`: bins at least ``cutoff``
    wide (measured perpendicular to the lattice planes), the bins holding selected atoms dilated by
    one bin in every direction (periodic wrap-around is conservative on non-periodic axes).
    Cost O(N) time and O(N + bins) memory; lets each worker run the neighbour search on its own
    region plus a shell instead of on the whole system.

    Args:
        positions: (N, 3) Å.
        cell: (3, 3) Å, rows are lattice vectors.
        pbc: (3,) bool.
        selected: (N,) bool, the atoms whose neighbourhood is wanted.
        cutoff: Å.
    Returns:
        (N,) bool mask.
    """
    if selected.all() or not selected.any():
        return selected.copy()
    frame = binning_frame(cell, pbc)
    reciprocal = np.linalg.inv(frame)  # columns are reciprocal vectors b*_a, |b*_a| = 1/spacing
    fractional = positions @ reciprocal
    spacing = 1.0 / np.linalg.norm(reciprocal, axis=0)
    bins = np.empty(positions.shape, dtype=np.int64)
    counts = []
    for axis in range(3):
        s = fractional[:, axis]
        width = cutoff / spacing[axis]  # the largest |Δs| between two atoms within cutoff
        if pbc[axis]:
            s = s - np.floor(s)
            n = int(min(max(np.floor(1.0 / width), 1), max_bins_per_axis))
            bins[:, axis] = np.minimum((s * n).astype(np.int64), n - 1)
        else:
            low, span = s.min(), s.max() - s.min()
            width = max(width, span / (max_bins_per_axis - 1))
            n = int(np.floor(span / width)) + 1
            bins[:, axis] = np.minimum(((s - low) / width).astype(np.int64), n - 1)
        counts.append(n)
    while np.prod(counts, dtype=np.float64) > max_bins:
        # Coarser bins stay correct (still at least one cutoff wide); halve the finest axis.
        axis = int(np.argmax(counts))
        bins[:, axis] //= 2
        counts[axis] = (counts[axis] + 1) // 2
    grid = np.zeros(counts, dtype=bool)
    grid[bins[selected, 0], bins[selected, 1], bins[selected, 2]] = True
    dilated = grid.copy()
    for axis in range(3):
        if counts[axis] == 1:
            continue
        # Separable dilation: ±1 along each axis in turn covers all 27 neighbouring bins.
        dilated = dilated | np.roll(dilated, 1, axis=axis) | np.roll(dilated, -1, axis=axis)
    return dilated[bins[:, 0], bins[:, 1], bins[:, 2]] | selected
