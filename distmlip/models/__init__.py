"""Model adapters: one per upstream family, plus the reference model used to test the engine."""

from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.reference import ReferenceMPNN

__all__ = ["DistributedModel", "GraphInputs", "ReferenceMPNN", "resolve_model"]


def resolve_model(model, **kwargs) -> DistributedModel:
    """A model object or name → an adapter.

    Accepts a :class:`DistributedModel`, or the name ``"reference"``.
    """
    if isinstance(model, DistributedModel):
        return model
    if isinstance(model, str) and model.lower() == "reference":
        return ReferenceMPNN(**kwargs)
    raise TypeError(
        f"cannot use {model!r} as a model: pass a distmlip DistributedModel or the name 'reference'"
    )
