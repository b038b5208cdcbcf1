"""An independent single-process evaluation of a distmlip adapter: no neighbour list, no
partition, no halo, no engine.

Every pair (i, j, image shift) is tried by brute force (O(N² × images)); forces are the
gradient with respect to positions and stress the gradient with respect to a homogeneous strain
of positions and cell, not the engine's edge-vector route (∂E/∂v_e summed to atoms, virial
Σ g_e ⊗ v_e). The engine's results must equal these to round-off.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from ase import Atoms
from ase.stress import full_3x3_to_voigt_6_stress

from distmlip.models.base import GraphInputs


def _image_range(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> list[range]:
    """Per axis, the image shifts that can hold a neighbour within ``cutoff`` of an atom, for
    atoms whose fractional coordinates lie in [0, 1) on the periodic axes."""
    ranges = []
    for axis in range(3):
        if not pbc[axis]:
            ranges.append(range(0, 1))
            continue
        others = [cell[(axis + 1) % 3], cell[(axis + 2) % 3]]
        normal = np.cross(*others)
        # Distance between lattice planes spanned by the other two vectors.
        spacing = abs(cell[axis] @ normal) / np.linalg.norm(normal)
        reach = int(np.ceil(cutoff / spacing))
        ranges.append(range(-reach, reach + 1))
    return ranges


def _wrapped(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``positions`` moved by lattice vectors into [0, 1) fractional on the periodic axes (a
    constant offset per atom: gradients with respect to them are those of the originals)."""
    if not pbc.any():
        return positions.copy()
    full = cell.copy()
    for axis in np.flatnonzero(np.linalg.norm(full, axis=1) < 1e-9):
        full[axis] = np.cross(full[(axis + 1) % 3], full[(axis + 2) % 3])  # an open axis
    fractional = np.linalg.solve(full.T, positions.T).T
    whole = np.zeros_like(fractional)
    whole[:, pbc] = np.floor(fractional[:, pbc])
    return positions - whole @ full


def _all_pairs(positions, shifts, offsets, cutoff, chunk_bytes=64 << 20):
    """Every (receiver, sender, shift index) closer than ``cutoff``, tried one by one
    (in chunks of receivers so a few thousand atoms fit in memory)."""
    n = len(positions)
    chunk = max(1, chunk_bytes // (24 * n * len(shifts)))
    found = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        vectors = (
            positions[None, :, None, :]
            + offsets[None, None, :, :]
            - positions[start:stop, None, None, :]
        )  # (receiver, sender, shift, 3)
        inside = np.einsum("ijsk,ijsk->ijs", vectors, vectors) < cutoff**2
        receivers, senders, images = np.nonzero(inside)
        found.append((receivers + start, senders, images))
    receivers, senders, images = (np.concatenate(parts) for parts in zip(*found, strict=True))
    zero_shift = np.flatnonzero((shifts == 0).all(axis=1))[0]
    itself = (receivers == senders) & (images == zero_shift)
    return receivers[~itself], senders[~itself], images[~itself]


def dense_evaluate(model, atoms: Atoms) -> dict:
    """Energy (eV), per-atom energies, forces (eV/Å) and, for a cell with volume, stress
    (eV/Å³, Voigt) of ``model`` (float64) on ``atoms``, by brute force."""
    cell = atoms.cell.array.astype(np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    shifts = np.array(list(itertools.product(*_image_range(cell, pbc, model.cutoff))))
    # Select the pairs in numpy (float64); the gradients flow through torch below.
    wrapped = _wrapped(atoms.positions, cell, pbc)
    receivers, senders, images = _all_pairs(wrapped, shifts, shifts @ cell, model.cutoff)

    positions = torch.tensor(wrapped, dtype=torch.float64, requires_grad=True)
    strain = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    deformation = torch.eye(3, dtype=torch.float64) + strain
    strained_positions = positions @ deformation
    strained_cell = torch.tensor(cell) @ deformation
    shift_vectors = torch.tensor(shifts[images], dtype=torch.float64) @ strained_cell
    edge_vectors = (
        strained_positions[torch.as_tensor(senders)]
        + shift_vectors
        - strained_positions[torch.as_tensor(receivers)]
    )
    inputs = GraphInputs(
        numbers=torch.as_tensor(atoms.numbers, dtype=torch.int64),
        vectors=edge_vectors,
        receivers=torch.as_tensor(receivers, dtype=torch.int64),
        senders=torch.as_tensor(senders, dtype=torch.int64),
        n_owned=len(atoms),
    )
    output = model(inputs, _NoHalo())
    energies = output[0] if isinstance(output, tuple) else output
    energy = energies.sum()
    position_gradient, strain_gradient = torch.autograd.grad(energy, [positions, strain])
    result = {
        "energy": float(energy.detach()),
        "energies": energies.detach().numpy().copy(),
        "forces": -position_gradient.numpy(),
    }
    volume = abs(np.linalg.det(cell))
    if volume > 0:
        virial = strain_gradient.numpy()
        result["stress"] = full_3x3_to_voigt_6_stress(0.5 * (virial + virial.T) / volume)
    return result


class _NoHalo:
    """One process owns every row: the exchange is the identity, nothing is checkpointed."""

    def __call__(self, owned):
        return owned

    def checkpoint(self, function, *args, **kwargs):
        return function(*args, **kwargs)

    def chunks(self, n_edges):
        return [(0, n_edges)]
