"""Model adapters: one per upstream family, plus the reference model used to test the engine.
:func:`resolve_model` finds the adapter of a model object, name or file (see
:mod:`distmlip.models.registry`)."""

from distmlip.models.registry import ENTRY_POINT_GROUP, model_names, register, resolve_model

_LAZY = {
    "DistributedModel": "distmlip.models.base",
    "GraphInputs": "distmlip.models.base",
    "ReferenceMPNN": "distmlip.models.reference",
}
"""Names that import torch: loaded when first used, so that naming a model (the command
line's argument check, :func:`model_names`) does not cost torch's import."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DistributedModel",
    "ENTRY_POINT_GROUP",
    "GraphInputs",
    "ReferenceMPNN",
    "model_names",
    "register",
    "resolve_model",
]
