"""eSEN and UMA (fairchem-core's ``eSCNMDBackbone``, ``eSCNMDMoeBackbone``) on a partitioned
graph.

fairchem's backbone forward is re-sequenced with one atom exchange per block; every module
and weight is upstream's (loaded by fairchem's own ``load_predict_unit``), nothing is copied.

Conventions (fairchem-core 2.24, ``fairchem/core/models/uma/escn_md.py``, read from its
source and checked by tests/test_fairchem.py):

* ``edge_index[0]`` is the source (sender) and ``edge_index[1]`` the target (receiver, the
  row messages are summed onto); ``edge_distance_vec`` = x[source] + shift − x[target], which
  is distmlip's edge vector.
* Node features are SO(3) coefficients, (N, (lmax+1)², C). The initial embedding and the edge
  degree embedding need only the species of both ends of an edge (every worker has them for
  its halo), so they run on owned rows. A block reads neighbours once, in its edge-wise
  convolution, from the output of ``norm_1`` (plus the system embedding): that is the one
  exchange per block. ``norm_1``, ``norm_2`` and the atom-wise feed-forward are per atom.
* The charge / spin / dataset embedding is one vector per structure, computed alike on every
  worker from ``atoms.info`` (read by the driver, see ``system_inputs``). UMA mixes its
  experts from it and the whole structure's composition (sent by the driver too) with
  upstream's ``set_MOLE_coefficients``; a dataset MoE head gets its one-hot expert.
* Energy: ``energy_block`` of each atom's L = 0 features, summed (``reduce="sum"``) or
  averaged; then fairchem's task normaliser (× rmsd + mean, the mean once per structure:
  ``mean / N`` per atom) and element references (per atom).
* Forces and stress are the gradient of that energy, as upstream's conservative models
  compute them, provided the forces and stress tasks share the energy's rmsd and have zero
  mean (checked here: otherwise upstream's forces are not the energy's gradient).
"""

from __future__ import annotations

import os
import types
import warnings

import numpy as np
import torch

from distmlip.exchange import Exchange, GraphTopology, RowDeclarer
from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.fairchem_checkpoint import (
    check_backbone,
    check_gradient_tasks,
    element_references,
    energy_head,
    find_energy_task,
    force_head,
    is_fairchem_checkpoint,
    is_predict_unit,
    load_fairchem_predict_unit,
    task_of,
)

__all__ = ["ESENAdapter", "is_fairchem_checkpoint", "load_fairchem_predict_unit"]


class ESENAdapter(DistributedModel):
    """Distributed evaluation of an eSEN (conservative or direct-force) or UMA model from
    fairchem-core.

    Args:
        model: a fairchem ``MLIPPredictUnit`` (``load_predict_unit(path, ...)``) or the path
            of an inference checkpoint (``.pt``): an ``eSCNMDBackbone`` or
            ``eSCNMDMoeBackbone`` with one ``MLP_EFS_Head`` (bare or in a dataset wrapper).
        task_name: the dataset head, as for ``FAIRChemCalculator`` (e.g. ``"omat"``); may be
            left out when the checkpoint has one.
    """

    site_properties = ()

    def __init__(self, model, *, task_name: str | None = None):
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            model = load_fairchem_predict_unit(model)
        if not is_predict_unit(model):
            raise TypeError(
                "expected a fairchem MLIPPredictUnit or the path of a fairchem checkpoint, got "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        hydra = model.model.module
        backbone = hydra.backbone
        precision = getattr(
            getattr(model, "inference_settings", None), "base_precision_dtype", None
        )
        if precision not in (None, torch.float64, "float64"):
            warnings.warn(
                f"this predict unit was built with base_precision_dtype={precision}: its derived "
                "buffers (SO(3) grids, Wigner coefficients) are rounded to it, so float64 runs "
                "match float64 upstream only to that precision; pass the checkpoint path (loaded "
                "in float64) for exact float64",
                stacklevel=2,
            )
        self.mixture = check_backbone(backbone, model)
        self.task_name, energy_task = find_energy_task(model.tasks, task_name)
        self.direct_forces = bool(backbone.regress_config.direct_forces)
        if self.direct_forces:
            self.force_head = force_head(hydra)
            force_task = task_of(model.tasks, self.task_name, "forces")
            self.force_rmsd = float(force_task.normalizer.rmsd)
            self.force_mean = float(force_task.normalizer.mean)
        else:
            check_gradient_tasks(model.tasks, self.task_name, energy_task)
        if backbone.use_dataset_embedding and self.task_name not in backbone.dataset_mapping:
            raise ValueError(f"the backbone has no dataset embedding for {self.task_name!r}")
        self.wrapper, self.head, self.expert = energy_head(hydra, self.task_name)
        if self.head.reduce == "mean" and not self.direct_forces:
            raise NotImplementedError(
                "the energy head averages over atoms (reduce='mean') while upstream's forces "
                "are the gradient of the sum: they are not the gradient of its energy, which "
                "distmlip computes"
            )
        self.supports_single_atoms = bool(getattr(hydra, "supports_single_atoms", False))
        self._last_info: tuple | None = None

        self.backbone = backbone
        self.energy_rmsd = float(energy_task.normalizer.rmsd)
        self.energy_mean = float(energy_task.normalizer.mean)
        references = element_references(energy_task)
        if references is not None:
            self.register_buffer("element_energy", references, persistent=False)
        else:
            self.element_energy = None
        self.cutoff = float(backbone.cutoff)
        self.max_neighbors = int(backbone.max_neighbors)
        self.num_layers = len(backbone.blocks) + 1  # the edge degree embedding reads edges too
        self.supported_numbers = frozenset(range(1, int(backbone.max_num_elements)))

    def system_inputs(self, atoms) -> dict:
        """The structure's total charge and spin multiplicity (``atoms.info``, default 0),
        validated by fairchem's own check for this task; for UMA's mixture of experts also
        the composition ((Z, count) pairs), which selects the experts."""
        if len(atoms) == 1 and not atoms.pbc.any() and not self.supports_single_atoms:
            raise ValueError(
                "a single isolated atom: fairchem answers it from its table of isolated-atom "
                "energies, not from the model; use FAIRChemCalculator for it"
            )
        given = tuple(
            (key, repr(atoms.info[key])) for key in ("charge", "spin") if key in atoms.info
        )
        if self._last_info is None or self._last_info[0] != given:  # fairchem's check warns
            info = types.SimpleNamespace(info=dict(atoms.info))
            # fairchem's check sets its defaults on this copy and raises for bad values
            self.backbone.validate_atoms_data(info, self.task_name)
            charge, spin = int(info.info.get("charge", 0)), int(info.info.get("spin", 0))
            self._last_info = (given, {"charge": charge, "spin": spin})
        system = dict(self._last_info[1])
        if self.mixture:
            counts = np.bincount(atoms.get_atomic_numbers())
            present = np.flatnonzero(counts)
            system["composition"] = tuple(
                zip(present.tolist(), counts[present].tolist(), strict=True)
            )
        return system

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> int:
        return int(topology.n_atoms)

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        backbone, n_owned, numbers = self.backbone, inputs.n_owned, inputs.numbers
        vectors, senders, receivers = self._edges(inputs)
        system = inputs.system or {}
        long = dict(dtype=torch.long, device=vectors.device)
        system_embedding = backbone.csd_embedding(
            charge=torch.tensor([system.get("charge", 0)], **long),
            spin=torch.tensor([system.get("spin", 0)], **long),
            dataset=[self.task_name],
        )  # (1, C), the same on every worker
        edge_index = torch.stack([senders, receivers])
        distances = torch.linalg.norm(vectors, dim=-1)
        if self.mixture:
            self._select_experts(system["composition"], system_embedding, edge_index, inputs)

        wigner, wigner_inv = backbone._get_rotmat_and_wigner(vectors)
        coefficient_index = backbone.coefficient_index if backbone.mmax != backbone.lmax else None
        wigner, wigner_inv = backbone.backend.prepare_wigner(
            wigner, wigner_inv, backbone.mappingReduced, coefficient_index
        )
        features = vectors.new_zeros((n_owned, backbone.sph_feature_size, backbone.sphere_channels))
        features[:, 0, :] = backbone.sphere_embedding(numbers[:n_owned]) + system_embedding

        envelope = backbone.envelope(distances / backbone.cutoff).reshape(-1, 1)
        x_edge = torch.cat(
            (
                backbone.distance_expansion(distances),
                backbone.source_embedding(numbers[senders]),
                backbone.target_embedding(numbers[receivers]),
            ),
            dim=1,
        )
        if wigner_inv.ndim == 3:
            envelope = envelope.unsqueeze(-1)
        wigner_inv_envelope = wigner_inv * envelope
        features = backbone.edge_degree_embedding(features, x_edge, receivers, wigner_inv_envelope)
        x_edge_per_layer = backbone.backend.get_layer_radial_emb(x_edge, backbone)

        def run_block(block, features: torch.Tensor, x_edge_layer: torch.Tensor) -> torch.Tensor:
            # eSCNMD_Block.forward, with the exchange where its edge-wise part reads neighbours
            residual = features
            normed = block.norm_1(features)
            normed[:, 0, :] = normed[:, 0, :] + system_embedding
            messages = block.edge_wise.forward_chunk(
                exchange(normed),
                n_owned,
                x_edge_layer,
                edge_index,
                wigner,
                wigner_inv_envelope,
                receivers,
            )
            features = messages + residual
            return block.atom_wise(block.norm_2(features)) + features

        for block, x_edge_layer in zip(backbone.blocks, x_edge_per_layer, strict=True):
            features = exchange.checkpoint(run_block, block, features, x_edge_layer)
        features = backbone.norm(features)

        if self.expert is not None:  # the dataset's expert of a MoE head, one-hot as upstream
            head_experts = self.wrapper.global_mole_tensors
            head_experts.expert_mixing_coefficients = torch.zeros(
                (1, len(self.wrapper.dataset_name_to_exp)),
                dtype=vectors.dtype,
                device=vectors.device,
            )
            head_experts.expert_mixing_coefficients[0, self.expert] = 1.0
            head_experts.mole_sizes = torch.tensor([n_owned], dtype=torch.int)
            head_experts.natoms = n_owned
        atomic = self.head.energy_block(features[:, 0, :]).view(-1)
        if self.head.reduce == "mean":  # energy-only or direct-force heads (see __init__)
            atomic = atomic / inputs.prepared
        energies = self.energy_rmsd * atomic + self.energy_mean / inputs.prepared
        if self.element_energy is not None:
            energies = energies + self.element_energy[numbers[:n_owned]].to(energies.dtype)
        if not self.direct_forces:
            return energies
        # upstream's force head reads only the embedding (outside fairchem's own parallelism)
        forces = self.force_head({}, {"node_embedding": features})["forces"]
        return energies, {"forces": self.force_rmsd * forces + self.force_mean}

    def _select_experts(self, composition, system_embedding, edge_index, inputs) -> None:
        """UMA's expert mixing from the whole structure's composition (upstream's own
        ``set_MOLE_coefficients``), and every local edge as one system's (``set_MOLE_sizes``)."""
        numbers, counts = zip(*composition, strict=True)
        device = system_embedding.device
        numbers_full = torch.repeat_interleave(
            torch.tensor(numbers, device=device), torch.tensor(counts, device=device)
        )
        self.backbone.set_MOLE_coefficients(
            atomic_numbers_full=numbers_full,
            batch_full=torch.zeros_like(numbers_full),
            csd_mixed_emb=system_embedding,
        )
        batch_local = torch.zeros(inputs.n_local, dtype=torch.long, device=device)
        self.backbone.set_MOLE_sizes(nsystems=1, batch_full=batch_local, edge_index=edge_index)

    def _edges(self, inputs: GraphInputs):
        """(vectors, senders, receivers) of the edges fairchem's own graph would have.

        * At most ``max_neighbors`` per atom, as fairchem's ``get_max_neighbors_mask`` with
          ``enforce_max_neighbors_strictly=False``: an atom with more keeps the neighbours whose
          squared distance is at most that of its (max+1)-th nearest plus 0.01 Å².
        * A worker without edges gets upstream's fake one (a self-loop of length
          (cutoff + 1)·√3 on its first atom: outside the cutoff, its envelope is exactly 0, so
          it adds nothing), which fairchem adds when a structure has none: its layers cannot
          take zero edges.
        """
        vectors, senders, receivers = inputs.vectors, inputs.senders, inputs.receivers
        counts = torch.bincount(receivers, minlength=inputs.n_owned)
        if len(counts) and int(counts.max()) > self.max_neighbors:
            squared = (vectors.detach() ** 2).sum(dim=1)
            by_distance = torch.argsort(squared)
            order = by_distance[torch.argsort(receivers[by_distance], stable=True)]
            start = torch.cumsum(counts, 0) - counts
            crowded = counts > self.max_neighbors
            threshold = torch.full_like(counts, float("inf"), dtype=squared.dtype)
            threshold[crowded] = squared[order][start[crowded] + self.max_neighbors] + 0.01
            keep = squared <= threshold[receivers]
            vectors, senders, receivers = vectors[keep], senders[keep], receivers[keep]
        if len(receivers) == 0:
            fake = vectors.new_full((1, 3), self.cutoff + 1.0)
            zero = receivers.new_zeros(1)
            vectors, senders, receivers = torch.cat([fake, vectors]), zero, zero
        return vectors, senders, receivers
