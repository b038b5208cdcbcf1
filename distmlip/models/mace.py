"""MACE adapter: any ``mace.modules`` energy model, run on a partitioned graph through the
upstream model's own LAMMPS ML-IAP hook.

mace-torch already supports domain decomposition for LAMMPS: called with ``lammps_mliap=True``
its forward takes

* ``node_attrs`` (one-hot species) of owned rows *then* ghost rows,
* precomputed edge ``vectors`` and ``edge_index`` (row 0 sender, row 1 receiver; every
  receiver an owned row),
* ``natoms = (n_owned, n_ghost)`` and a ``lammps_class`` object with
  ``forward_exchange(feats, out, width)`` / ``reverse_exchange(grad, gout, width)``,

computes layer 0 on all local rows (its sender features depend only on species), keeps owned
rows only after each interaction, and in every later layer pads the owned output of
``linear_up`` with ghost rows and refreshes them through ``lammps_class`` (inside the autograd
wrapper ``mace.tools.utils.LAMMPS_MP``, whose backward calls ``reverse_exchange``). That is
exactly the zero-redundancy scheme of distmlip: our local graph has owned rows first, then the
1-hop halo, and only edges with owned receivers. So :class:`MACEAdapter` builds that input from
:class:`~distmlip.models.base.GraphInputs`, passes distmlip's exchange as ``lammps_class`` (it
offers that raw pair, see :mod:`distmlip.exchange`), and returns the model's own
``node_energy`` for the owned rows. No MACE code is copied; every weight is the upstream module's.

Conventions (checked against ``mace.calculators.MACECalculator`` in ``tests/test_mace.py``):

* MACE's edge vector is ``pos[receiver] − pos[sender] (+ shift)``; distmlip's is
  ``x_sender + shift·cell − x_receiver``, so the model gets ``−inputs.vectors``.
* ``node_energy`` is the full per-atom energy: E0 of the species, plus (ScaleShiftMACE) the
  scaled and shifted sum of the readouts and the ZBL pair term if the model has one. Its sum
  over all atoms is upstream's total energy; MACECalculator reports it as ``energies``.
* Forces and stress come from the engine's gradient with respect to the edge vectors, with
  MACE's sign (σ = +∂E/∂ε / V, ASE convention).

Not supported (clear errors): TorchScript-compiled models (the LAMMPS branch is disabled under
scripting; load the original ``.model`` file instead), models with ``embedding_specs`` (a joint
embedding over whole-system features such as total charge/spin), and non-energy models (dipole,
polarisability). cuEquivariance / OpenEquivariance models work where their package is
installed: the halo exchange moves whole feature rows, whatever their memory layout, and every
worker loads the same model. Without the package such a model cannot even be unpickled, and
:func:`load_mace_model` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

# ``mace`` must be imported before e3nn (it sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, without which
# e3nn 0.4.4 fails to import on recent torch). Workers unpickle the adapter, which imports this
# module (the class is named before its state in the pickle), hence mace, before any e3nn module.
import mace  # noqa: F401
import torch

from distmlip.exchange import Exchange, sum_into
from distmlip.models.base import DistributedModel, GraphInputs

__all__ = ["MACEAdapter", "is_mace_model", "load_mace_model"]


def is_mace_model(model) -> bool:
    """Whether ``model`` is an energy model from ``mace.modules`` (MACE, ScaleShiftMACE, ...)."""
    try:
        from mace.modules.models import MACE
    except ImportError:  # pragma: no cover - mace is imported at the top of this module
        return False
    return isinstance(model, MACE)


def _accelerator_hint(error: BaseException) -> str:
    text = str(error).lower()
    if "cuequivariance" in text:
        return (
            " The model was converted to cuEquivariance, which is not installed: install "
            "`cuequivariance-torch` (and `cuequivariance-ops-torch-cu12` for GPUs), or convert "
            "the model back to e3nn where it was made (`python -m mace.cli.convert_cueq_e3nn "
            "model.model`) and pass the converted file."
        )
    if "openequivariance" in text:
        return (
            " The model was converted to OpenEquivariance, which is not installed: install "
            "`openequivariance`, or convert the model back to e3nn where it was made "
            "(`python -m mace.cli.convert_oeq_e3nn model.model`)."
        )
    return ""


def load_mace_model(path: str | os.PathLike):
    """A MACE model file (as ``mace_run_train`` writes and foundation models ship) → model.

    Loads the pickled ``torch.nn.Module`` on the CPU the way ``MACECalculator`` does
    (``torch.load``; MACE files are full pickles, so ``weights_only=False``: load only files
    you trust).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a MACE energy model (or is a TorchScript export).
        ImportError: the model needs an acceleration package that is not installed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"MACE model file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"MACE model path {str(path)!r} is not a file")
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, ImportError) as error:
        raise ImportError(
            f"cannot load MACE model file {str(path)!r}: {error}.{_accelerator_hint(error)}"
        ) from error
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} is not a MACE model file that torch.load can read ({error})"
        ) from error
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"{str(path)!r} is a TorchScript-compiled MACE model; distmlip re-sequences the "
            "eager model, so pass the original (non-compiled) .model file"
        )
    if isinstance(model, dict):
        raise ValueError(
            f"{str(path)!r} holds a dict (a checkpoint or state_dict), not a MACE model; pass "
            "the .model file that mace_run_train writes (or build the model and load the "
            "state_dict yourself, then pass the model object)"
        )
    if not is_mace_model(model):
        raise ValueError(
            f"{str(path)!r} holds a {type(model).__module__}.{type(model).__name__}, not a "
            "MACE energy model from mace.modules (MACE, ScaleShiftMACE, ...)"
        )
    return model


def _uses_accelerator(model, name: str) -> bool:
    config = getattr(model, f"{name}_config", None)
    return bool(config is not None and getattr(config, "enabled", False))


def _check_accelerators(model) -> None:
    """Raise ``ImportError`` if the model's layers need a package this process lacks."""
    for name, package in (("cueq", "cuequivariance_torch"), ("oeq", "openequivariance")):
        if _uses_accelerator(model, name):
            try:
                __import__(package)
            except ImportError as error:
                raise ImportError(
                    f"this MACE model uses {name} layers but {package!r} is not installed."
                    f"{_accelerator_hint(ImportError(package.split('_')[0]))}"
                ) from error


EDGE_LINEAR_INTERACTIONS = ("RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock")
"""Interaction blocks (mace-torch 0.3.x; pyproject pins < 0.4) whose forward is re-sequenced
in edge chunks: their message is ``linear`` (no bias) of the scattered sum over edges, then
``skip_tp`` (bilinear) for the plain block; the residual block's ``sc`` reads only nodes. The
exactness tests (tests/test_mace.py, several chunks) guard the re-sequencing."""


def _edge_chunks(exchange: Exchange, node_attrs: torch.Tensor, n_owned: int):
    """``replace`` for ``exchange.checkpoint_modules``: the forward of an edge-linear
    interaction block, re-sequenced with upstream's modules so that the edge tensor products
    are computed in chunks (``exchange.chunks``), each a checkpoint region, and summed into the
    owned atoms: the backward holds one chunk's edge activations at a time.

    The halo refresh moves before ``linear_up`` (a per-row linear map: the same halo rows),
    done by distmlip's exchange instead of MACE's LAMMPS hook.
    """

    def replace(module, forward):
        if type(module).__name__ not in EDGE_LINEAR_INTERACTIONS or hasattr(module, "conv_fusion"):
            return None
        residual = type(module).__name__ == "RealAgnosticResidualInteractionBlock"

        def edge_messages(up, edge_attrs, edge_feats, cutoff, senders):
            weights = module.conv_tp_weights(edge_feats)
            if cutoff is not None:
                weights = weights * cutoff
            return module.conv_tp(up[senders], edge_attrs, weights)

        def run(*, node_feats, edge_attrs, edge_feats, edge_index, cutoff=None, **kwargs):
            first_layer = bool(kwargs.get("first_layer", False))
            local = node_feats if first_layer else exchange(node_feats[:n_owned])
            attrs = node_attrs[:n_owned]
            sc = exchange.checkpoint(module.skip_tp, local[:n_owned], attrs) if residual else None
            up = exchange.checkpoint(module.linear_up, local)
            message = None
            for start, stop in exchange.chunks(edge_index.shape[1]):
                part = slice(start, stop)
                mji = exchange.checkpoint(
                    edge_messages,
                    up,
                    edge_attrs[part],
                    edge_feats[part],
                    None if cutoff is None else cutoff[part],
                    edge_index[0, part],
                )
                if message is None:
                    message = mji.new_zeros((n_owned, mji.shape[1]))
                message = sum_into(message, edge_index[1, part], mji)  # keeps no chunk
            return exchange.checkpoint(finish, message, attrs), sc

        def finish(message, attrs):
            message = module.linear(message) / module.avg_num_neighbors
            if not residual:
                message = module.skip_tp(message, attrs)
            return module.reshape(message)

        return run

    return replace


def _select_head(model, head: str | None) -> tuple[str, int]:
    """The head MACECalculator would use: the given one, the only one, or 'default'."""
    heads = list(getattr(model, "heads", None) or ["Default"])
    if head is not None:
        if head not in heads:
            raise ValueError(f"MACE model has no head {head!r}; its heads are {heads}")
        return head, heads.index(head)
    if len(heads) == 1:
        return heads[0], 0
    for index, name in enumerate(heads):
        if name.lower() == "default":
            return name, index
    raise ValueError(
        f"this MACE model has several heads {heads} and none is 'default'; pass head=..."
    )


class MACEAdapter(DistributedModel):
    """Distributed evaluation of a ``mace.modules`` energy model (MACE, ScaleShiftMACE, ...).

    Args:
        model: the upstream model object, or a path to a MACE model file (see
            :func:`load_mace_model`). Its modules and weights are used as they are; the worker
            casts them to the calculator's dtype, as ``MACECalculator(default_dtype=...)`` does.
        head: output head of a multi-head model (default: as ``MACECalculator``: the only
            head, else the one named 'default').

    Per-atom energies are MACE's ``node_energy`` (E0 + interaction energy, the same numbers
    ``MACECalculator`` reports as ``energies``).
    """

    def __init__(self, model, head: str | None = None):
        super().__init__()
        if isinstance(model, (str, os.PathLike)):
            model = load_mace_model(model)
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                "TorchScript-compiled MACE models cannot be re-sequenced (MACE disables its "
                "LAMMPS hook under scripting); pass the eager model or its .model file"
            )
        if not is_mace_model(model):
            raise TypeError(
                f"expected a MACE energy model from mace.modules (MACE, ScaleShiftMACE, ...), "
                f"got {type(model).__module__}.{type(model).__name__}"
            )
        if hasattr(model, "joint_embedding") or getattr(model, "embedding_specs", None):
            raise NotImplementedError(
                "MACE models with embedding_specs (joint embedding of system-level features "
                "such as total charge or spin) are not supported by the distributed path"
            )
        _check_accelerators(model)
        self.model = model
        self.head, self.head_index = _select_head(model, head)
        numbers = [int(z) for z in model.atomic_numbers.tolist()]
        self.cutoff = float(model.r_max)
        self.num_layers = int(model.num_interactions)
        self.supported_numbers = frozenset(numbers)
        # Atomic number → one-hot column (the order of model.atomic_numbers, as MACE's z_table).
        lookup = torch.full((max(numbers) + 1,), -1, dtype=torch.int64)
        lookup[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("species_index", lookup, persistent=False)
        self.num_species = len(numbers)

    def forward(self, inputs: GraphInputs, exchange: Exchange) -> torch.Tensor:
        n_owned = inputs.n_owned
        n_halo = inputs.n_local - n_owned
        vectors = inputs.vectors
        dtype, device = vectors.dtype, vectors.device
        species = self.species_index[inputs.numbers]
        data = {
            # MACE: vector = pos[receiver] − pos[sender]; distmlip: x_sender − x_receiver.
            "vectors": -vectors,
            "node_attrs": torch.nn.functional.one_hot(species, self.num_species).to(dtype),
            "edge_index": torch.stack([inputs.senders, inputs.receivers]),
            "batch": torch.zeros(n_owned, dtype=torch.int64, device=device),
            "head": torch.tensor([self.head_index], dtype=torch.int64, device=device),
            # MACE's LAMMPS ML-IAP hook calls exchange.forward_exchange / reverse_exchange.
            "lammps_class": exchange,
            "natoms": (n_owned, n_halo),
        }
        # With checkpointing: interactions in edge chunks where that is exact (see
        # _edge_chunks), every other interaction and product block one checkpoint region.
        blocks = [*self.model.interactions, *self.model.products]
        chunked = _edge_chunks(exchange, data["node_attrs"], n_owned)
        with exchange.checkpoint_modules(blocks, chunked):
            out = self.model(
                data,
                training=False,
                compute_force=False,
                compute_virials=False,
                compute_stress=False,
                compute_displacement=False,
                lammps_mliap=True,
            )
        energies = out["node_energy"]
        if energies is None or energies.shape != (n_owned,):
            raise RuntimeError(
                f"{type(self.model).__name__} returned node energies of shape "
                f"{None if energies is None else tuple(energies.shape)}, expected ({n_owned},)"
            )
        return energies
