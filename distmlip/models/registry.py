"""Which adapter serves a model: names and object types map to adapter factories.

Built in: ``"reference"``, ``"chgnet"`` (and ``"chgnet-0.3.0"``, ``"chgnet-0.2.0"``,
``"chgnet-r2scan"``), CHGNet and MACE objects, MACE model files, matgl TensorNet potentials
and their directories, fairchem predict units and checkpoint files (eSEN). Other packages add models
through the entry-point group ``distmlip.models``: each entry point is named after the model
and loads a callable that returns a :class:`~distmlip.models.base.DistributedModel` (an adapter
class, or a factory function), e.g. in the package's ``pyproject.toml``::

    [project.entry-points."distmlip.models"]
    mymodel = "mypackage.distributed:MyAdapter"

after which ``DistributedCalculator("mymodel")`` works (keyword arguments of
:func:`resolve_model` go to the callable).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # at run time imported where used: naming a model needs no torch
    from distmlip.models.base import DistributedModel

__all__ = ["ENTRY_POINT_GROUP", "model_names", "register", "resolve_model", "worker_modules"]

ENTRY_POINT_GROUP = "distmlip.models"
MODEL_FILE_SUFFIXES = (".model", ".pt", ".pth")


@dataclass(frozen=True)
class _ByType:
    """Objects for which ``accepts(obj)`` is true become ``factory(obj, **kwargs)``."""

    accepts: Callable[[object], bool]
    factory: Callable[..., DistributedModel]


_NAMES: dict[str, Callable[..., DistributedModel]] = {}
_TYPES: list[_ByType] = []


def register(
    name: str | None = None,
    factory: Callable[..., DistributedModel] | None = None,
    accepts: Callable[[object], bool] | None = None,
) -> None:
    """Add a model by ``name`` (``factory(**kwargs)``) or by type (``accepts(obj)`` →
    ``factory(obj, **kwargs)``). Names are case-insensitive."""
    if factory is None:
        raise ValueError("register needs a factory")
    if name is not None:
        _NAMES[name.lower()] = factory
    if accepts is not None:
        _TYPES.append(_ByType(accepts, factory))


def _plugins() -> dict[str, object]:
    return {entry.name.lower(): entry for entry in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> list[str]:
    """Every name :func:`resolve_model` accepts: built in, then from installed packages."""
    return list(_NAMES) + sorted(set(_plugins()) - set(_NAMES))


def worker_modules(model) -> tuple[str, ...]:
    """The upstream package a built-in model's workers import, known from its name alone
    (e.g. ``("chgnet.model",)`` for ``"chgnet-0.2.0"``), for a zygote to import ahead
    (:func:`distmlip.driver.zygote.prestart`); ``()`` for other models (their packages are found
    once the model is loaded)."""
    name = str(model).lower()
    return ("chgnet.model",) if name == "chgnet" or name.startswith("chgnet-") else ()


def _model_file(model) -> Path | None:
    """A str/PathLike that names a model file (a path, not a registered name)."""
    if isinstance(model, os.PathLike):
        return Path(model)
    if isinstance(model, str) and model.lower() not in _NAMES:
        if os.sep in model or "/" in model or model.lower().endswith(MODEL_FILE_SUFFIXES):
            return Path(model)
        if Path(model).exists():
            return Path(model)
    return None


def resolve_model(model, **kwargs) -> DistributedModel:
    """A model object, name or file → its adapter.

    Raises:
        FileNotFoundError: a model path that does not exist.
        ValueError: a file that is not a model distmlip can read; a bad variant name.
        TypeError: anything else that is not a model.
    """
    from distmlip.models.base import DistributedModel

    if isinstance(model, DistributedModel):
        return model
    if isinstance(model, str) and model.lower() in _NAMES:
        return _NAMES[model.lower()](**kwargs)
    path = _model_file(model)
    if path is not None:
        path = path.expanduser()
    if path is not None and not path.exists():
        raise FileNotFoundError(
            f"model file {str(path)!r} does not exist (give a model file or directory, or one "
            f"of the names: {', '.join(model_names())})"
        )
    if path is not None and path.is_dir():
        from distmlip.models.tensornet import TensorNetAdapter, load_matgl_model

        return TensorNetAdapter(load_matgl_model(path), **kwargs)
    if path is not None and path.is_file():
        from distmlip.models.fairchem import ESENAdapter, is_fairchem_checkpoint

        if is_fairchem_checkpoint(path):
            return ESENAdapter(path, **kwargs)
    if path is not None:
        from distmlip.models.mace import MACEAdapter, load_mace_model

        try:
            loaded = load_mace_model(path)
        except ValueError as error:
            raise ValueError(f"{error}; nor is it a fairchem checkpoint") from error
        return MACEAdapter(loaded, **kwargs)
    for by_type in _TYPES:
        if by_type.accepts(model):
            return by_type.factory(model, **kwargs)
    if isinstance(model, str):
        plugin = _plugins().get(model.lower())
        if plugin is not None:
            adapter = plugin.load()(**kwargs)
            if not isinstance(adapter, DistributedModel):
                raise TypeError(
                    f"entry point {model!r} of group {ENTRY_POINT_GROUP!r} returned a "
                    f"{type(adapter).__name__}, not a distmlip DistributedModel"
                )
            return adapter
        if model.lower().startswith("chgnet-"):
            return _NAMES["chgnet"](model_name=model[len("chgnet-") :], **kwargs)
    raise TypeError(
        f"cannot use {model!r} as a model: pass a distmlip DistributedModel, a "
        "chgnet.model.CHGNet, a mace.modules model (MACE, ScaleShiftMACE), a path to a MACE "
        "model file, a matgl TensorNet Potential or the directory of a saved one, a fairchem "
        "MLIPPredictUnit or checkpoint file (eSEN), or a name: "
        f"{', '.join(model_names())}"
    )


# Built-in models. Their packages are imported only when a model of theirs is asked for.


def _reference(**kwargs) -> DistributedModel:
    from distmlip.models.reference import ReferenceMPNN

    return ReferenceMPNN(**kwargs)


def _chgnet(model_name: str = "0.3.0") -> DistributedModel:
    from distmlip.models.chgnet import CHGNetAdapter, load_chgnet

    return CHGNetAdapter(load_chgnet(model_name))


def _is_chgnet(model) -> bool:
    if "chgnet" not in sys.modules:  # importing chgnet just to check costs seconds
        return False
    from chgnet.model import CHGNet

    return isinstance(model, CHGNet)


def _chgnet_object(model) -> DistributedModel:
    from distmlip.models.chgnet import CHGNetAdapter

    return CHGNetAdapter(model)


def _is_mace(model) -> bool:
    if "mace" not in sys.modules:
        return False
    from distmlip.models.mace import is_mace_model

    return is_mace_model(model)


def _is_tensornet(model) -> bool:
    from distmlip.models.tensornet import is_tensornet_potential

    return is_tensornet_potential(model)


def _tensornet_object(model, **kwargs) -> DistributedModel:
    from distmlip.models.tensornet import TensorNetAdapter

    return TensorNetAdapter(model, **kwargs)


def _mace_object(model, **kwargs) -> DistributedModel:
    from distmlip.models.mace import MACEAdapter

    return MACEAdapter(model, **kwargs)


register("reference", _reference)
register("chgnet", _chgnet)
for _version in ("0.3.0", "0.2.0", "r2scan"):
    register(f"chgnet-{_version}", lambda _v=_version: _chgnet(_v))
register(factory=_chgnet_object, accepts=_is_chgnet)
register(factory=_mace_object, accepts=_is_mace)
register(factory=_tensornet_object, accepts=_is_tensornet)


def _is_fairchem(model) -> bool:
    if "fairchem.core" not in sys.modules:
        return False
    from fairchem.core.units.mlip_unit.predict import MLIPPredictUnit

    return isinstance(model, MLIPPredictUnit)


def _fairchem_object(model, **kwargs) -> DistributedModel:
    from distmlip.models.fairchem import ESENAdapter

    return ESENAdapter(model, **kwargs)


register(factory=_fairchem_object, accepts=_is_fairchem)
