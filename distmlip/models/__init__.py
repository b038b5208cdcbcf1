"""Model adapters: one per upstream family, plus the reference model used to test the engine."""

import os
import sys
from pathlib import Path

from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.reference import ReferenceMPNN

__all__ = ["DistributedModel", "GraphInputs", "MODEL_NAMES", "ReferenceMPNN", "resolve_model"]


MODEL_NAMES = ("reference", "chgnet", "chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan")
"""Names :func:`resolve_model` accepts (case-insensitive); anything else must be a model object
or a model file."""
_MACE_SUFFIXES = (".model", ".pt", ".pth")


def _is_chgnet(model) -> bool:
    try:
        from chgnet.model import CHGNet
    except ImportError:
        return False
    return isinstance(model, CHGNet)


def _is_mace(model) -> bool:
    # Only look if mace is already imported: importing it just to check costs seconds.
    if "mace" not in sys.modules:
        return False
    from distmlip.models.mace import is_mace_model

    return is_mace_model(model)


def _mace_file(model) -> Path | None:
    """A str/PathLike that names a MACE model file (a path, not a registered model name)."""
    if isinstance(model, os.PathLike):
        return Path(model)
    if isinstance(model, str):
        name = model.lower()
        if name in MODEL_NAMES or name.startswith("chgnet-"):
            return None
        if "/" in model or os.sep in model or name.endswith(_MACE_SUFFIXES) or Path(model).exists():
            return Path(model)
    return None


def resolve_model(model, **kwargs) -> DistributedModel:
    """A model object or name → an adapter.

    Accepts a :class:`DistributedModel`; a ``chgnet.model.CHGNet`` instance; or a name:
    ``"reference"`` (kwargs go to :class:`ReferenceMPNN`), ``"chgnet"`` (the pretrained CHGNet
    shipped in the ``chgnet`` package; ``model_name="0.3.0"`` (default), ``"0.2.0"`` or
    ``"r2scan"``, also spelled ``"chgnet-0.2.0"``); a ``mace.modules`` model instance (MACE,
    ScaleShiftMACE, ...) or a path (str or ``os.PathLike``) to a MACE model file (kwargs, e.g.
    ``head``, go to :class:`~distmlip.models.mace.MACEAdapter`).

    Raises:
        FileNotFoundError: a model path that does not exist.
        ValueError: a file that is not a MACE model.
        TypeError: anything else that is not a model.
    """
    if isinstance(model, DistributedModel):
        return model
    path = _mace_file(model)
    if path is not None:
        from distmlip.models.mace import MACEAdapter, load_mace_model

        return MACEAdapter(load_mace_model(path), **kwargs)
    if _is_mace(model):
        from distmlip.models.mace import MACEAdapter

        return MACEAdapter(model, **kwargs)
    if _is_chgnet(model):
        from distmlip.models.chgnet import CHGNetAdapter

        return CHGNetAdapter(model)
    if isinstance(model, str):
        name = model.lower()
        if name == "reference":
            return ReferenceMPNN(**kwargs)
        if name == "chgnet" or name.startswith("chgnet-"):
            from distmlip.models.chgnet import CHGNetAdapter, load_chgnet

            if name != "chgnet":
                kwargs.setdefault("model_name", model[len("chgnet-") :])
            return CHGNetAdapter(load_chgnet(**kwargs))
    raise TypeError(
        f"cannot use {model!r} as a model: pass a distmlip DistributedModel, a "
        "chgnet.model.CHGNet, a mace.modules model (MACE, ScaleShiftMACE), a path to a MACE "
        "model file, or a name: 'reference', 'chgnet', 'chgnet-0.2.0', 'chgnet-r2scan'"
    )
