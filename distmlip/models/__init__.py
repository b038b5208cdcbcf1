"""Model adapters: one per upstream family, plus the reference model used to test the engine.
:func:`resolve_model` finds the adapter of a model object, name or file (see
:mod:`distmlip.models.registry`)."""

from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.reference import ReferenceMPNN
from distmlip.models.registry import ENTRY_POINT_GROUP, model_names, register, resolve_model

__all__ = [
    "DistributedModel",
    "ENTRY_POINT_GROUP",
    "GraphInputs",
    "ReferenceMPNN",
    "model_names",
    "register",
    "resolve_model",
]
