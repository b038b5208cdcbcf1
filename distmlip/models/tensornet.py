"""TensorNet (matgl, PyG backend) on a partitioned graph.

matgl's ``TensorNet.forward_features`` is re-sequenced with one atom exchange before every
interaction layer; upstream's modules and weights are used as they are (``Potential`` wraps
the model with its data scaling and elemental references).

Conventions (matgl 4.x, read from its source):

* ``edge_index[0]`` is the aggregation target (the receiver; distmlip's receivers are owned)
  and ``edge_index[1]`` the sender; bond vectors are x[edge_index[1]] + shift − x[edge_index[0]],
  distmlip's edge vectors.
* The embedding needs only the species of both ends (every worker has them for its halo), so
  it runs on all local rows; its halo rows are then wrong (their edges are not local) and are
  refreshed by the exchange before the first interaction. Each interaction transforms every
  row and aggregates sender rows onto receivers: owned rows come out exact, halo rows are
  refreshed again before the next layer.
* Node features are per-channel 3×3 tensors, (N, 3, 3, units): exchanged as they are.
* The total energy is ``data_std · Σ_i e_i + data_mean + Σ_i ref(Z_i)``: per atom,
  ``data_std · e_i + ref(Z_i) + data_mean / N`` (``data_mean`` is per structure).
"""

from __future__ import annotations

import os

import torch

from distmlip.exchange import Exchange, GraphTopology, RowDeclarer
from distmlip.models.base import DistributedModel, GraphInputs

__all__ = ["TensorNetAdapter", "is_tensornet_potential", "load_matgl_model", "missing_matgl_files"]

SAVED_MATGL_FILES = ("model.pt", "state.pt", "model.json")
"""What ``potential.save(path)`` writes; with any missing, matgl would look on its model hub."""


def missing_matgl_files(path) -> list[str]:
    """The files of a saved matgl model that directory ``path`` lacks."""
    from pathlib import Path

    return [name for name in SAVED_MATGL_FILES if not (Path(path) / name).is_file()]


def load_matgl_model(path: str | os.PathLike):
    """The matgl model saved in directory ``path`` (``potential.save(path)``), loaded locally."""
    from pathlib import Path

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"matgl model directory {str(path)!r} does not exist")
    os.environ.setdefault("MATGL_BACKEND", "PYG")
    try:
        import matgl
    except ImportError as error:
        raise ImportError(
            f"loading the matgl model in {str(path)!r} needs matgl: "
            "pip install 'distmlip[tensornet]'"
        ) from error
    missing = missing_matgl_files(path)
    if missing:  # else matgl would look for the directory's name on its model hub
        raise ValueError(
            f"{str(path)!r} is not a saved matgl model (no {', '.join(missing)}; save one "
            "with potential.save(path))"
        )
    try:
        return matgl.load_model(path)
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a saved matgl model ({error})") from error


def is_tensornet_potential(model) -> bool:
    """A ``matgl.apps.pes.Potential`` whose model is a TensorNet."""
    import sys

    if "matgl" not in sys.modules:
        return False
    from matgl.apps.pes import Potential
    from matgl.models import TensorNet

    return isinstance(model, Potential) and isinstance(model.model, TensorNet)


def _with_pyg_layers(potential):
    """A copy of ``potential`` whose TensorNet uses matgl's PyG layers, with the same weights.

    matgl picks its warp kernels whenever nvalchemi-toolkit-ops is importable (fairchem-core
    installs it); their layers take a CSR index of the whole graph. The PyG layers are the
    same model and the ones this adapter re-sequences.
    """
    import copy

    from matgl.models import TensorNet

    arguments = dict(potential.model._init_args)
    arguments["use_warp"] = False
    pyg = TensorNet(**arguments)
    state = dict(potential.model.state_dict())
    for kind in ("weight", "bias"):  # the warp embedding fuses proj1..3 (cat along dim 0)
        fused = state.pop(f"tensor_embedding.distance_proj.{kind}", None)
        if fused is not None:
            for i, part in enumerate(fused.chunk(3, dim=0), start=1):
                state[f"tensor_embedding.distance_proj{i}.{kind}"] = part
    pyg.load_state_dict(state, strict=True)
    converted = copy.copy(potential)  # shares the scaling and references, not the model
    converted._modules = dict(potential._modules)
    converted._modules["model"] = pyg.to(next(potential.model.parameters()).dtype)
    return converted


class TensorNetAdapter(DistributedModel):
    """Distributed evaluation of a matgl ``Potential`` wrapping a ``TensorNet``.

    Args:
        potential: the ``Potential`` object, or the directory of a saved one
            (``matgl.load_model(path)``).
    """

    def __init__(self, potential):
        super().__init__()
        if isinstance(potential, (str, os.PathLike)):
            potential = load_matgl_model(potential)
        if not is_tensornet_potential(potential):
            raise TypeError(
                "expected a matgl.apps.pes.Potential wrapping a TensorNet, got "
                f"{type(potential).__module__}.{type(potential).__name__}"
            )
        if getattr(potential.model, "_use_warp", False):
            potential = _with_pyg_layers(potential)
        model = potential.model
        if model.is_intensive:
            raise NotImplementedError(
                "an intensive TensorNet pools atoms before its readout, so its energy is not "
                "a sum of per-atom terms; only is_intensive=False models can be distributed"
            )
        for flag in ("calc_repuls", "calc_charge", "calc_magmom"):
            if getattr(potential, flag, False):
                raise NotImplementedError(f"Potential({flag}=True) is not supported yet")
        if getattr(model, "include_state", False):
            raise NotImplementedError("TensorNet with state features is not supported")
        from ase.data import atomic_numbers

        self.potential = potential
        self.cutoff = float(model.cutoff)
        self.num_layers = len(model.layers) + 1  # the embedding aggregates over edges too
        numbers = [atomic_numbers[symbol] for symbol in model.element_types]
        self.supported_numbers = frozenset(numbers)
        lookup = torch.full((max(numbers) + 1,), -1, dtype=torch.int64)
        lookup[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("type_index", lookup, persistent=False)

    def prepare(self, topology: GraphTopology, rows: RowDeclarer) -> int:
        return int(topology.n_atoms)  # data_mean is shared out per atom

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        from matgl.utils.maths import decompose_tensor, tensor_norm

        potential, model = self.potential, self.potential.model
        n_owned = inputs.n_owned
        node_type = self.type_index[inputs.numbers]
        edge_index = torch.stack([inputs.receivers, inputs.senders])
        bond_vec = inputs.vectors
        bond_dist = torch.linalg.norm(bond_vec, dim=1)
        edge_attr = model.bond_expansion(bond_dist)
        features, _ = model.tensor_embedding(
            node_type, edge_index, edge_attr, bond_dist, bond_vec, None
        )

        def interact(layer, owned: torch.Tensor) -> torch.Tensor:
            return layer(edge_index, bond_dist, edge_attr, exchange(owned))

        for layer in model.layers:
            features = exchange.checkpoint(interact, layer, features[:n_owned])
        owned = features[:n_owned]
        scalars, skew, traceless = decompose_tensor(owned)
        x = torch.cat((tensor_norm(scalars), tensor_norm(skew), tensor_norm(traceless)), dim=-1)
        atomic = model.final_layer(model.linear(model.out_norm(x))).view(-1)
        energies = potential.data_std * atomic + potential.data_mean / inputs.prepared
        if potential.element_refs is not None:
            offsets = potential.element_refs.property_offset
            energies = energies + offsets[node_type[:n_owned]].to(energies.dtype)
        return energies
