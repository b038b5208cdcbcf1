"""Model adapters: one per upstream family, plus the reference model used to test the engine."""

from distmlip.models.base import DistributedModel, GraphInputs
from distmlip.models.reference import ReferenceMPNN

__all__ = ["DistributedModel", "GraphInputs", "ReferenceMPNN", "resolve_model"]


def _is_chgnet(model) -> bool:
    try:
        from chgnet.model import CHGNet
    except ImportError:
        return False
    return isinstance(model, CHGNet)


def resolve_model(model, **kwargs) -> DistributedModel:
    """A model object or name → an adapter.

    Accepts a :class:`DistributedModel`; a ``chgnet.model.CHGNet`` instance; or a name:
    ``"reference"`` (kwargs go to :class:`ReferenceMPNN`), ``"chgnet"`` (the pretrained CHGNet
    shipped in the ``chgnet`` package; ``model_name="0.3.0"`` (default), ``"0.2.0"`` or
    ``"r2scan"``, also spelled ``"chgnet-0.2.0"``).
    """
    if isinstance(model, DistributedModel):
        return model
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
        "chgnet.model.CHGNet, or a name: 'reference', 'chgnet', 'chgnet-0.2.0', 'chgnet-r2scan'"
    )
