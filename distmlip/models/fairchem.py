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
import zipfile
from pathlib import Path

import numpy as np
import torch

from distmlip.exchange import Exchange, GraphTopology, RowDeclarer
from distmlip.models.base import DistributedModel, GraphInputs

__all__ = ["ESENAdapter", "is_fairchem_checkpoint", "load_fairchem_predict_unit"]

INSTALL_HINT = "pip install 'distmlip[fairchem]'"


def is_fairchem_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fairchem inference checkpoint (``MLIPInferenceCheckpoint``).

    Reads only the pickle's class names inside torch's zip archive: no fairchem import, no
    tensors loaded.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and b"MLIPInferenceCheckpoint" in archive.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


def _import_fairchem(what: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a model hub offline
    try:
        from fairchem.core.units import mlip_unit
    except ImportError as error:
        raise ImportError(f"{what} needs fairchem-core: {INSTALL_HINT}") from error
    return mlip_unit


def load_fairchem_predict_unit(path: str | os.PathLike, dtype: str = "float64"):
    """fairchem's ``MLIPPredictUnit`` for the checkpoint at ``path``, on the CPU.

    Built by fairchem's ``load_predict_unit`` with ``base_precision_dtype`` = ``dtype``, so the
    model's derived buffers (SO(3) grids, Wigner coefficients) are computed in that precision
    (float64 serves both: workers cast to float32 when asked).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"fairchem checkpoint {str(path)!r} does not exist")
    mlip_unit = _import_fairchem(f"loading the fairchem checkpoint {str(path)!r}")
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    settings = InferenceSettings(
        base_precision_dtype=getattr(torch, dtype), activation_checkpointing=False, tf32=False
    )
    try:
        return mlip_unit.load_predict_unit(path, inference_settings=settings, device="cpu")
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} is not a fairchem checkpoint it can load ({error})"
        ) from error


def _is_predict_unit(model) -> bool:
    return hasattr(model, "model") and hasattr(model, "tasks") and hasattr(model, "predict")


def _energy_task(tasks: dict, task_name: str | None):
    """The energy task of ``task_name`` (or of the checkpoint's only dataset)."""
    energy = [task for task in tasks.values() if task.property == "energy"]
    datasets = sorted({dataset for task in energy for dataset in task.datasets})
    if task_name is None:
        if len(datasets) != 1:
            raise ValueError(f"this checkpoint has tasks {datasets}: pass task_name=...")
        task_name = datasets[0]
    chosen = [task for task in energy if task_name in task.datasets]
    if not chosen:
        raise ValueError(f"task_name={task_name!r} is not one of this checkpoint's {datasets}")
    return task_name, chosen[0]


def _task(tasks: dict, task_name: str, prop: str):
    chosen = [t for t in tasks.values() if t.property == prop and task_name in t.datasets]
    if not chosen:
        raise ValueError(f"the checkpoint has no {prop} task for {task_name!r}")
    return chosen[0]


def _check_gradient_tasks(tasks: dict, task_name: str, energy_task) -> None:
    """Upstream scales gradient forces and stress by their own normalisers: they are −∇E only
    when those share the energy's rmsd and have zero mean."""
    rmsd = float(energy_task.normalizer.rmsd)
    for task in tasks.values():
        if task.property in ("forces", "stress") and task_name in task.datasets:
            norm = task.normalizer
            if abs(float(norm.rmsd) - rmsd) > 1e-12 * abs(rmsd) or float(norm.mean) != 0.0:
                raise NotImplementedError(
                    f"task {task.name!r} is normalised with rmsd {float(norm.rmsd)}, mean "
                    f"{float(norm.mean)} but the energy with rmsd {rmsd}: its forces are not "
                    "the energy's gradient, which distmlip computes"
                )


def _element_references(task) -> torch.Tensor | None:
    references = task.element_references
    if references is None:
        return None
    table = getattr(references, "element_references", None)
    if not isinstance(table, torch.Tensor):
        raise NotImplementedError(
            f"element references of type {type(references).__name__} are not supported"
        )
    return table.detach().clone().double()


def _check_backbone(backbone, unit) -> bool:
    """Refuse what distmlip cannot run exactly; True for UMA's mixture-of-experts backbone."""
    from fairchem.core.models.uma.escn_md import eSCNMDBackbone
    from fairchem.core.models.uma.escn_moe import eSCNMDMoeBackbone

    if type(backbone) not in (eSCNMDBackbone, eSCNMDMoeBackbone):
        raise NotImplementedError(
            f"the backbone is a {type(backbone).__name__}; distmlip runs eSEN and UMA "
            "(eSCNMDBackbone, eSCNMDMoeBackbone) models"
        )
    if backbone.charge_channel_end > backbone.charge_channel_start or (
        backbone.spin_channel_end > backbone.spin_channel_start
    ):
        raise NotImplementedError(
            "charge/spin-balanced channels sum over the whole structure in every block; "
            "not supported yet"
        )
    settings = getattr(unit, "inference_settings", None)
    if getattr(settings, "merge_mole", False) and getattr(unit, "lazy_model_intialized", False):
        raise ValueError(
            "this predict unit merged its experts for the structure it last saw; load it with "
            "InferenceSettings(merge_mole=False) (or pass the checkpoint path)"
        )
    return isinstance(backbone, eSCNMDMoeBackbone) and backbone.num_experts > 0


def _force_head(hydra):
    """A direct-force model's ``Linear_Force_Head`` (forces from the L = 1 features)."""
    from fairchem.core.models.uma.escn_md import Linear_Force_Head

    heads = [head for head in hydra.output_heads.values() if isinstance(head, Linear_Force_Head)]
    if len(heads) != 1:
        raise NotImplementedError(
            "a direct-force model needs one Linear_Force_Head, found heads "
            f"{[type(head).__name__ for head in hydra.output_heads.values()]}"
        )
    return heads[0]


def _energy_head(hydra, task_name: str):
    """(wrapper or None, the ``MLP_EFS_Head``, expert index for an unmerged dataset MoE head
    or None)."""
    from fairchem.core.models.uma.escn_md import Linear_Force_Head, MLP_EFS_Head
    from fairchem.core.models.uma.escn_moe import (
        DatasetSpecificMoEWrapper,
        DatasetSpecificSingleHeadWrapper,
    )

    heads = [h for h in hydra.output_heads.values() if not isinstance(h, Linear_Force_Head)]
    if len(heads) == 1 and isinstance(heads[0], MLP_EFS_Head):
        return None, heads[0], None
    wrappers = (DatasetSpecificMoEWrapper, DatasetSpecificSingleHeadWrapper)
    if (
        len(heads) == 1
        and isinstance(heads[0], wrappers)
        and isinstance(heads[0].head, MLP_EFS_Head)
    ):
        wrapper = heads[0]
        if task_name not in wrapper.dataset_names:
            raise ValueError(f"the head has no output for {task_name!r}: {wrapper.dataset_names}")
        if wrapper.merged_on_dataset not in (None, task_name):
            raise ValueError(
                f"the head was merged for {wrapper.merged_on_dataset!r}, not {task_name!r}"
            )
        expert = None
        if isinstance(wrapper, DatasetSpecificMoEWrapper) and wrapper.merged_on_dataset is None:
            expert = wrapper.dataset_name_to_exp[task_name]
        return wrapper, wrapper.head, expert
    raise NotImplementedError(
        f"expected one MLP_EFS_Head (or a dataset wrapper of one), found heads "
        f"{[type(head).__name__ for head in heads]}"
    )


class ESENAdapter(DistributedModel):
    """Distributed evaluation of a conservative eSEN or UMA model from fairchem-core.

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
        if not _is_predict_unit(model):
            raise TypeError(
                "expected a fairchem MLIPPredictUnit or the path of a fairchem checkpoint, got "
                f"{type(model).__module__}.{type(model).__name__}"
            )
        hydra = model.model.module
        backbone = hydra.backbone
        self.mixture = _check_backbone(backbone, model)
        self.task_name, energy_task = _energy_task(model.tasks, task_name)
        self.direct_forces = bool(backbone.regress_config.direct_forces)
        if self.direct_forces:
            self.force_head = _force_head(hydra)
            force_task = _task(model.tasks, self.task_name, "forces")
            self.force_rmsd = float(force_task.normalizer.rmsd)
            self.force_mean = float(force_task.normalizer.mean)
        else:
            _check_gradient_tasks(model.tasks, self.task_name, energy_task)
        if backbone.use_dataset_embedding and self.task_name not in backbone.dataset_mapping:
            raise ValueError(f"the backbone has no dataset embedding for {self.task_name!r}")
        self.wrapper, self.head, self.expert = _energy_head(hydra, self.task_name)

        self.backbone = backbone
        self.energy_rmsd = float(energy_task.normalizer.rmsd)
        self.energy_mean = float(energy_task.normalizer.mean)
        references = _element_references(energy_task)
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
        info = types.SimpleNamespace(info=dict(atoms.info))
        # fairchem's check sets its defaults on this copy and raises for bad values
        self.backbone.validate_atoms_data(info, self.task_name)
        system = {"charge": int(info.info.get("charge", 0)), "spin": int(info.info.get("spin", 0))}
        if self.mixture:
            numbers, counts = np.unique(atoms.get_atomic_numbers(), return_counts=True)
            system["composition"] = tuple(zip(numbers.tolist(), counts.tolist(), strict=True))
        return system

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> int:
        return int(topology.n_atoms)

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        backbone, n_owned = self.backbone, inputs.n_owned
        numbers, vectors = inputs.numbers, inputs.vectors
        self._check_neighbours(inputs.receivers, n_owned, exchange)
        system = inputs.system or {}
        long = dict(dtype=torch.long, device=vectors.device)
        system_embedding = backbone.csd_embedding(
            charge=torch.tensor([system.get("charge", 0)], **long),
            spin=torch.tensor([system.get("spin", 0)], **long),
            dataset=[self.task_name],
        )  # (1, C), the same on every worker
        edge_index = torch.stack([inputs.senders, inputs.receivers])
        distances = torch.linalg.norm(vectors, dim=-1)
        if self.mixture:
            self._select_experts(system["composition"], system_embedding, edge_index)

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
                backbone.source_embedding(numbers[inputs.senders]),
                backbone.target_embedding(numbers[inputs.receivers]),
            ),
            dim=1,
        )
        if wigner_inv.ndim == 3:
            envelope = envelope.unsqueeze(-1)
        wigner_inv_envelope = wigner_inv * envelope
        features = backbone.edge_degree_embedding(
            features, x_edge, inputs.receivers, wigner_inv_envelope
        )
        x_edge_per_layer = backbone.backend.get_layer_radial_emb(x_edge, backbone)
        for block, x_edge_layer in zip(backbone.blocks, x_edge_per_layer, strict=True):
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
                inputs.receivers,
            )
            features = messages + residual
            features = block.atom_wise(block.norm_2(features)) + features
        features = backbone.norm(features)

        if self.expert is not None:  # the dataset's expert of a MoE head, one-hot as upstream
            head_experts = self.wrapper.global_mole_tensors
            head_experts.expert_mixing_coefficients = torch.zeros(
                (1, len(self.wrapper.dataset_name_to_exp)), dtype=vectors.dtype
            )
            head_experts.expert_mixing_coefficients[0, self.expert] = 1.0
            head_experts.mole_sizes = torch.tensor([n_owned], dtype=torch.int)
            head_experts.natoms = n_owned
        atomic = self.head.energy_block(features[:, 0, :]).view(-1)
        if self.head.reduce == "mean":
            atomic = atomic / inputs.prepared
        energies = self.energy_rmsd * atomic + self.energy_mean / inputs.prepared
        if self.element_energy is not None:
            energies = energies + self.element_energy[numbers[:n_owned]].to(energies.dtype)
        if not self.direct_forces:
            return energies
        # upstream's force head reads only the embedding (outside fairchem's own parallelism)
        forces = self.force_head({}, {"node_embedding": features})["forces"]
        return energies, {"forces": self.force_rmsd * forces + self.force_mean}

    def _select_experts(self, composition, system_embedding, edge_index) -> None:
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
        batch_local = torch.zeros(
            int(edge_index.max()) + 1 if edge_index.numel() else 1, dtype=torch.long, device=device
        )
        self.backbone.set_MOLE_sizes(nsystems=1, batch_full=batch_local, edge_index=edge_index)

    def _check_neighbours(self, receivers: torch.Tensor, n_owned: int, exchange) -> None:
        """fairchem keeps at most ``max_neighbors`` neighbours per atom (the nearest): a
        denser structure would mean a different graph, so every worker refuses it together."""
        counts = torch.bincount(receivers, minlength=n_owned)
        crowded = int(counts.max()) if len(counts) else 0
        over = int(crowded > self.max_neighbors)
        try:
            over = exchange.sum_over_ranks(over)
        except NotImplementedError:  # the ghost baseline: no collectives, a worker may raise alone
            pass
        if over:
            raise ValueError(
                f"an atom has more than max_neighbors={self.max_neighbors} neighbours within "
                f"{self.cutoff} Å, where fairchem drops the farthest; distmlip keeps every "
                "edge, so it refuses this structure (is it compressed or overlapping?)"
            )
