"""Reading fairchem checkpoints and predict units for the eSEN/UMA adapter.

What a model is made of (backbone, heads, tasks with their normalisers and element
references) and what distmlip can run exactly; the adapter itself is in
:mod:`distmlip.models.fairchem`. fairchem is imported only when a model of its is used.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

__all__ = [
    "INSTALL_HINT",
    "is_fairchem_checkpoint",
    "load_fairchem_predict_unit",
    "is_predict_unit",
    "find_energy_task",
    "task_of",
    "check_gradient_tasks",
    "element_references",
    "check_backbone",
    "force_head",
    "energy_head",
]

INSTALL_HINT = "pip install 'distmlip[fairchem]'"


def is_fairchem_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a fairchem inference checkpoint (``MLIPInferenceCheckpoint``).

    Reads only the pickle's class names inside torch's zip archive: no fairchem import, no
    tensors loaded.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            return name is not None and b"MLIPInferenceCheckpoint" in archive.read(name)
    except (OSError, zipfile.BadZipFile):
        return False


def _import_fairchem(what: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a model hub offline
    try:
        from fairchem.core.units import mlip_unit
    except ImportError as error:
        raise ImportError(f"{what} needs fairchem-core: {INSTALL_HINT}") from error
    return mlip_unit


def load_fairchem_predict_unit(path: str | os.PathLike, dtype: str = "float64"):
    """fairchem's ``MLIPPredictUnit`` for the checkpoint at ``path``, on the CPU.

    Built by fairchem's ``load_predict_unit`` with ``base_precision_dtype`` = ``dtype``, so the
    model's derived buffers (SO(3) grids, Wigner coefficients) are computed in that precision
    (float64 serves both: workers cast to float32 when asked).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"fairchem checkpoint {str(path)!r} does not exist")
    mlip_unit = _import_fairchem(f"loading the fairchem checkpoint {str(path)!r}")
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    settings = InferenceSettings(
        base_precision_dtype=getattr(torch, dtype), activation_checkpointing=False, tf32=False
    )
    try:
        return mlip_unit.load_predict_unit(path, inference_settings=settings, device="cpu")
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} is not a fairchem checkpoint it can load ({error})"
        ) from error


def is_predict_unit(model) -> bool:
    return hasattr(model, "model") and hasattr(model, "tasks") and hasattr(model, "predict")


def find_energy_task(tasks: dict, task_name: str | None):
    """The energy task of ``task_name`` (or of the checkpoint's only dataset)."""
    energy = [task for task in tasks.values() if task.property == "energy"]
    datasets = sorted({dataset for task in energy for dataset in task.datasets})
    if task_name is None:
        if len(datasets) != 1:
            raise ValueError(
                f"this checkpoint has tasks {datasets}: choose one with "
                "DistributedCalculator(ESENAdapter(path, task_name=...), ...) "
                "(from distmlip.models.fairchem import ESENAdapter)"
            )
        task_name = datasets[0]
    if task_name not in datasets:
        raise ValueError(f"task_name={task_name!r} is not one of this checkpoint's {datasets}")
    return task_name, task_of(tasks, task_name, "energy")


def task_of(tasks: dict, task_name: str, prop: str):
    chosen = [t for t in tasks.values() if t.property == prop and task_name in t.datasets]
    if not chosen:
        raise ValueError(f"the checkpoint has no {prop} task for {task_name!r}")
    return chosen[0]


def check_gradient_tasks(tasks: dict, task_name: str, energy_task) -> None:
    """Upstream scales gradient forces and stress by their own normalisers: they are −∇E only
    when those share the energy's rmsd and have zero mean."""
    rmsd = float(energy_task.normalizer.rmsd)
    for task in tasks.values():
        if task.property in ("forces", "stress") and task_name in task.datasets:
            norm = task.normalizer
            if abs(float(norm.rmsd) - rmsd) > 1e-12 * abs(rmsd) or float(norm.mean) != 0.0:
                raise NotImplementedError(
                    f"task {task.name!r} is normalised with rmsd {float(norm.rmsd)}, mean "
                    f"{float(norm.mean)} but the energy with rmsd {rmsd}: its forces are not "
                    "the energy's gradient, which distmlip computes"
                )


def element_references(task) -> torch.Tensor | None:
    references = task.element_references
    if references is None:
        return None
    table = getattr(references, "element_references", None)
    if not isinstance(table, torch.Tensor):
        raise NotImplementedError(
            f"element references of type {type(references).__name__} are not supported"
        )
    return table.detach().clone().double()


def check_backbone(backbone, unit) -> bool:
    """Refuse what distmlip cannot run exactly; True for UMA's mixture-of-experts backbone."""
    from fairchem.core.models.uma.escn_md import eSCNMDBackbone
    from fairchem.core.models.uma.escn_moe import eSCNMDMoeBackbone

    if type(backbone) not in (eSCNMDBackbone, eSCNMDMoeBackbone):
        raise NotImplementedError(
            f"the backbone is a {type(backbone).__name__}; distmlip runs eSEN and UMA "
            "(eSCNMDBackbone, eSCNMDMoeBackbone) models"
        )
    if backbone.charge_channel_end > backbone.charge_channel_start or (
        backbone.spin_channel_end > backbone.spin_channel_start
    ):
        raise NotImplementedError(
            "charge/spin-balanced channels sum over the whole structure in every block; "
            "not supported yet"
        )
    from fairchem.core.models.uma.nn.execution_backends import ExecutionBackend

    if type(backbone.backend) is not ExecutionBackend:
        raise NotImplementedError(
            f"the backbone runs fairchem's {type(backbone.backend).__name__} (a fast execution "
            "mode with merged experts and precomputed radials); load the checkpoint with "
            "InferenceSettings(execution_mode='general') or pass its path"
        )
    settings = getattr(unit, "inference_settings", None)
    if getattr(settings, "merge_mole", False) and getattr(unit, "lazy_model_intialized", False):
        raise ValueError(
            "this predict unit merged its experts for the structure it last saw; load it with "
            "InferenceSettings(merge_mole=False) (or pass the checkpoint path)"
        )
    return isinstance(backbone, eSCNMDMoeBackbone) and backbone.num_experts > 0


def force_head(hydra):
    """A direct-force model's ``Linear_Force_Head`` (forces from the L = 1 features)."""
    from fairchem.core.models.uma.escn_md import Linear_Force_Head

    heads = [head for head in hydra.output_heads.values() if isinstance(head, Linear_Force_Head)]
    if len(heads) != 1:
        raise NotImplementedError(
            "a direct-force model needs one Linear_Force_Head, found heads "
            f"{[type(head).__name__ for head in hydra.output_heads.values()]}"
        )
    return heads[0]


def energy_head(hydra, task_name: str):
    """(wrapper or None, the ``MLP_EFS_Head``, expert index for an unmerged dataset MoE head
    or None)."""
    from fairchem.core.models.uma.escn_md import Linear_Force_Head, MLP_EFS_Head
    from fairchem.core.models.uma.escn_moe import (
        DatasetSpecificMoEWrapper,
        DatasetSpecificSingleHeadWrapper,
    )

    heads = [h for h in hydra.output_heads.values() if not isinstance(h, Linear_Force_Head)]
    if len(heads) == 1 and isinstance(heads[0], MLP_EFS_Head):
        return None, heads[0], None
    wrappers = (DatasetSpecificMoEWrapper, DatasetSpecificSingleHeadWrapper)
    if (
        len(heads) == 1
        and isinstance(heads[0], wrappers)
        and isinstance(heads[0].head, MLP_EFS_Head)
    ):
        wrapper = heads[0]
        if task_name not in wrapper.dataset_names:
            raise ValueError(f"the head has no output for {task_name!r}: {wrapper.dataset_names}")
        if wrapper.merged_on_dataset not in (None, task_name):
            raise ValueError(
                f"the head was merged for {wrapper.merged_on_dataset!r}, not {task_name!r}"
            )
        expert = None
        if isinstance(wrapper, DatasetSpecificMoEWrapper) and wrapper.merged_on_dataset is None:
            expert = wrapper.dataset_name_to_exp[task_name]
        return wrapper, wrapper.head, expert
    raise NotImplementedError(
        f"expected one MLP_EFS_Head (or a dataset wrapper of one), found heads "
        f"{[type(head).__name__ for head in heads]}"
    )
