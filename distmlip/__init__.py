"""distmlip: run pretrained machine-learning interatomic potentials on systems too large or too
slow for one device, by partitioning the atom graph across workers with zero redundancy."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "DistributedCalculator",
    "DistributedModel",
    "OutOfMemoryError",
    "ReferenceMPNN",
    "Structure",
    "WorkerError",
]
__version__ = "0.1.0"

# Imported on first use, so `distmlip --help` and the worker processes start without torch.
_LAZY = {
    "DistributedCalculator": "distmlip.calculator",
    "Structure": "distmlip.graphs.structure",
    "WorkerError": "distmlip.errors",
    "OutOfMemoryError": "distmlip.errors",
    "DistributedModel": "distmlip.models",
    "ReferenceMPNN": "distmlip.models",
}

if TYPE_CHECKING:
    from distmlip.calculator import DistributedCalculator
    from distmlip.errors import OutOfMemoryError, WorkerError
    from distmlip.graphs.structure import Structure
    from distmlip.models import DistributedModel, ReferenceMPNN


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distmlip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
