"""Seeded random-weight eSEN checkpoints, built offline from fairchem-core's own classes.

The same configuration shape as fairchem's checkpoints: a ``HydraModel`` with an
``eSCNMDBackbone`` and an ``MLP_EFS_Head`` (conservative: forces and stress by autograd), the
weights also stored as the EMA state that ``load_predict_unit`` reads, and energy / forces /
stress tasks with a normaliser and element references. Shared by the tests and benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASK = "omat"
PROPERTIES = {"energy": ("system", [1]), "forces": ("atom", [3]), "stress": ("system", [1, 9])}


def esen_config(
    cutoff: float = 5.0,
    num_layers: int = 2,
    lmax: int = 2,
    mmax: int = 2,
    channels: int = 16,
    max_neighbors: int = 300,
    **backbone,
) -> dict:
    """A small eSEN (``eSCNMDBackbone``) in fairchem's HydraModel config format."""
    return {
        "_target_": "fairchem.core.models.base.HydraModel",
        "pass_through_head_outputs": True,
        "otf_graph": True,
        "model_id": "distmlip-test-esen-0.1",
        "backbone": {
            "model": "fairchem.core.models.uma.escn_md.eSCNMDBackbone",
            "max_num_elements": 100,
            "sphere_channels": channels,
            "hidden_channels": channels,
            "edge_channels": channels,
            "num_distance_basis": channels,
            "num_layers": num_layers,
            "lmax": lmax,
            "mmax": mmax,
            "cutoff": cutoff,
            "max_neighbors": max_neighbors,
            "otf_graph": True,
            "regress_forces": True,
            "regress_stress": True,
            "direct_forces": False,
            "direct_stress": False,
            "act_type": "gate",
            "ff_type": "grid",
            "norm_type": "rms_norm_sh",
            "chg_spin_emb_type": "rand_emb",
            "dataset_mapping": {TASK: TASK},
            "use_dataset_embedding": True,
            **backbone,
        },
        "heads": {"efs": {"module": "fairchem.core.models.uma.escn_md.MLP_EFS_Head"}},
    }


def tasks_config(
    rmsd: float = 3.0, mean: float = 0.4, references=True, force_rmsd: float | None = None
) -> list[dict]:
    """Energy, forces and stress tasks for ``TASK``: energy × rmsd + mean, element references
    −0.01·Z − 1 eV per atom (forces and stress share the energy's rmsd unless told)."""
    tasks = []
    for name, (level, dim) in PROPERTIES.items():
        scale = rmsd if name != "forces" or force_rmsd is None else force_rmsd
        task = {
            "_target_": "fairchem.core.units.mlip_unit.mlip_unit.Task",
            "name": name,
            "level": level,
            "property": name,
            "out_spec": {
                "_target_": "fairchem.core.units.mlip_unit.mlip_unit.OutputSpec",
                "dim": dim,
                "dtype": "float32",
            },
            "normalizer": {
                "_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
                "mean": mean if name == "energy" else 0.0,
                "rmsd": scale,
            },
            "datasets": [TASK],
        }
        if name == "energy" and references:
            task["element_references"] = {
                "_target_": "fairchem.core.modules.normalization.element_references."
                "ElementReferences",
                "element_references": {
                    "_target_": "torch.tensor",
                    "_convert_": "all",
                    "data": [0.0] + [-1.0 - 0.01 * z for z in range(1, 100)],
                },
            }
        tasks.append(task)
    return tasks


def write_esen_checkpoint(
    path: Path, seed: int = 0, config: dict | None = None, tasks: list[dict] | None = None
) -> Path:
    """A random-weight eSEN inference checkpoint at ``path`` (what ``load_predict_unit``
    reads)."""
    import hydra
    import torch
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    config = esen_config() if config is None else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hydra.utils.instantiate(config)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    checkpoint = MLIPInferenceCheckpoint(
        model_config=config,
        model_state_dict=model.state_dict(),
        ema_state_dict=averaged.state_dict(),
        tasks_config=tasks_config() if tasks is None else tasks,
    )
    torch.save(checkpoint, path)
    return Path(path)


def predict_unit(path: Path, dtype: str = "float64"):
    """fairchem's own single-process predictor for the checkpoint (the reference)."""
    import torch
    from fairchem.core.units.mlip_unit import load_predict_unit
    from fairchem.core.units.mlip_unit.api.inference import InferenceSettings

    settings = InferenceSettings(
        base_precision_dtype=getattr(torch, dtype), activation_checkpointing=False, tf32=False
    )
    return load_predict_unit(path, inference_settings=settings, device="cpu")


UMA_TASKS = ("omat", "omol")


def uma_config(num_experts: int = 4, **backbone) -> dict:
    """A small UMA-shaped model: the mixture-of-linear-experts backbone
    (``eSCNMDMoeBackbone``, experts mixed from the composition and the charge/spin/dataset
    embedding) and a dataset-specific MoE head, for two datasets."""
    config = esen_config(
        num_experts=num_experts,
        use_composition_embedding=True,
        moe_layer_type="pytorch",
        dataset_mapping={task: task for task in UMA_TASKS},
        **backbone,
    )
    config["model_id"] = "distmlip-test-uma-0.1"
    config["backbone"]["model"] = "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone"
    config["heads"] = {
        "energyandforcehead": {
            "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificMoEWrapper",
            "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
            "dataset_names": list(UMA_TASKS),
            "head_kwargs": {"wrap_property": False},  # the wrapper wraps
        }
    }
    return config


def uma_tasks_config() -> list[dict]:
    """Energy, forces and stress tasks per dataset, named ``<dataset>_<property>`` as UMA's."""
    tasks = []
    for index, dataset in enumerate(UMA_TASKS):
        for task in tasks_config(rmsd=2.0 + index, mean=0.1 * index):
            task = dict(task, name=f"{dataset}_{task['name']}", datasets=[dataset])
            tasks.append(task)
    return tasks


def direct_config(**backbone) -> dict:
    """A direct-force eSEN: an energy head and a force head on the L = 1 features (forces are
    not the energy's gradient; no stress), as fairchem's direct eSEN checkpoints."""
    config = esen_config(direct_forces=True, regress_stress=False, **backbone)
    config["pass_through_head_outputs"] = False  # outputs keyed by head name: energy, forces
    config["heads"] = {
        "energy": {"module": "fairchem.core.models.uma.escn_md.MLP_Energy_Head"},
        "forces": {"module": "fairchem.core.models.uma.escn_md.Linear_Force_Head"},
    }
    return config


def direct_tasks_config() -> list[dict]:
    """Energy and forces tasks, the forces with their own normaliser (rmsd 0.5)."""
    tasks = [task for task in tasks_config(force_rmsd=0.5) if task["name"] != "stress"]
    return tasks
