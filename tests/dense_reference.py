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
    """Per axis, the image shifts that can hold a neighbour within ``cutoff``."""
    ranges = []
    for axis in range(3):
        if not pbc[axis]:
            ranges.append(range(0, 1))
            continue
        others = [cell[(axis + 1) % 3], cell[(axis + 2) % 3]]
        normal = np.cross(*others)
        # Distance between lattice planes spanned by the other two vectors.
        spacing = abs(cell[axis] @ normal) / np.linalg.norm(normal)
        reach = int(np.ceil(cutoff / spacing)) + 1
        ranges.append(range(-reach, reach + 1))
    return ranges


def dense_evaluate(model, atoms: Atoms) -> dict:
    """Energy (eV), per-atom energies, forces (eV/Å) and, for a cell with volume, stress
    (eV/Å³, Voigt) of ``model`` (float64) on ``atoms``, by brute force."""
    cell = atoms.cell.array.astype(np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    n = len(atoms)
    shifts = np.array(list(itertools.product(*_image_range(cell, pbc, model.cutoff))))
    # Select the pairs in numpy (float64); the gradients flow through torch below.
    offsets = shifts @ cell  # (S, 3)
    vectors = (
        atoms.positions[None, :, None, :]
        + offsets[None, None, :, :]
        - atoms.positions[:, None, None, :]
    )  # (receiver, sender, shift, 3)
    inside = np.einsum("ijsk,ijsk->ijs", vectors, vectors) < model.cutoff**2
    zero_shift = np.flatnonzero((shifts == 0).all(axis=1))[0]
    inside[np.arange(n), np.arange(n), zero_shift] = False
    receivers, senders, images = np.nonzero(inside)

    positions = torch.tensor(atoms.positions, dtype=torch.float64, requires_grad=True)
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
        n_owned=n,
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
