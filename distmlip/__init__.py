"""distmlip: run pretrained machine-learning interatomic potentials on systems too large or too
slow for one device, by partitioning the atom graph across workers with zero redundancy."""

from distmlip.calculator import DistributedCalculator
from distmlip.graph import Structure
from distmlip.launch import WorkerError
from distmlip.models import DistributedModel, ReferenceMPNN

__all__ = ["DistributedCalculator", "DistributedModel", "ReferenceMPNN", "Structure", "WorkerError"]
__version__ = "0.1.0"
