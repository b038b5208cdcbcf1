"""Per-atom energies (``energies``) of every model family.

For each family, on a periodic crystal, a surface and a non-periodic structure (float64):

* the per-atom energies sum to the energy (1e-12 relative);
* they are the same at P = 1 (the workers' builder and engine in this process) and P > 1
  (1e-11 relative): each atom's term is computed once, by its owner, and put in its place
  (P = 3 for the reference model and CHGNet; P = 2 for the families whose workers take
  10-20 s to start here);
* they are the same with ``halo="exchange"`` and ``halo="ghost"`` (same P; CHGNet has no
  ghost mode: its adapter declares no layer count);
* they equal upstream's own per-atom terms (1e-11 relative):

  - reference model: the brute-force evaluation of tests/dense_reference.py;
  - CHGNet: ``CHGNet.predict_structure(..., return_site_energies=True)`` (float64);
  - MACE: ``MACECalculator``'s ``results["energies"]`` (float64);
  - TensorNet: matgl's ``PESCalculator`` has no per-atom energies; its ``TensorNet.forward``
    computes them (``final_layer`` per atom, then a sum), read here with a forward hook, and
    ``Potential``'s scaling and element references applied per atom;
  - eSEN / UMA: ``FAIRChemCalculator`` has no per-atom energies; the head's ``energy_block``
    computes them (per node, then a sum), read here with a forward hook, with the task's
    normaliser and element references applied per atom.

  matgl's ``data_mean`` and fairchem's normaliser mean are added once per structure upstream;
  distmlip gives each atom ``mean / N`` (its convention, checked here; the sums are upstream's
  energy either way).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("MATGL_BACKEND", "PYG")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import relative_error  # noqa: E402
from test_skin_rules import Families, in_process  # noqa: E402

from distmlip import DistributedCalculator  # noqa: E402

RTOL = 1e-11
SUM_RTOL = 1e-12


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    return Families(tmp_path_factory.mktemp("per_atom"))


def structures(family: str) -> dict:
    """name → function making the structure (the family test files' own structures)."""
    if family == "reference":
        from conftest import cluster, surface_slab, triclinic

        return {"triclinic": triclinic, "slab": surface_slab, "cluster": cluster}
    if family == "chgnet":
        from test_chgnet import STRUCTURES
    elif family == "mace":
        from test_mace import STRUCTURES
    elif family == "tensornet":
        from test_tensornet import STRUCTURES
    else:
        from test_fairchem import STRUCTURES
    names = ("crystal", "slab", "cluster" if family == "chgnet" else "molecule")
    return {name: STRUCTURES[name] for name in names}


INFO = {"uma": {"charge": -1, "spin": 2}}
"""atoms.info of the UMA-shaped model's structures (its omol task)."""


def make(family: str, build):
    atoms = build()
    atoms.info.update(INFO.get(family, {}))
    return atoms


def upstream(family: str, families, builds: dict) -> dict:
    """name → (upstream energy, upstream per-atom energies)."""
    model, local = families.get(family)
    if family == "reference":
        from dense_reference import dense_evaluate

        results = {name: dense_evaluate(local, build()) for name, build in builds.items()}
    elif family == "chgnet":
        from test_chgnet import upstream_float64

        results = upstream_float64(model, names=tuple(builds))
    elif family == "mace":
        from test_mace import upstream as mace_upstream

        results = mace_upstream(model, "float64", names=tuple(builds))
    elif family == "tensornet":
        results = tensornet_upstream(model.potential, builds)
    else:
        results = fairchem_upstream(families.paths[family], model.task_name, builds, family)
    return {name: (float(r["energy"]), np.asarray(r["energies"])) for name, r in results.items()}


def tensornet_upstream(potential, builds: dict) -> dict:
    """matgl's PESCalculator (float64 graph, its PyG layers: as tests/test_tensornet.py) and
    the per-atom terms of its own TensorNet forward (``final_layer`` output, per atom)."""
    import matgl
    import matgl.ext.ase as matgl_ase
    from matgl.ext.ase import PESCalculator

    model = copy.deepcopy(potential).double()
    nodes = []
    hook = model.model.final_layer.register_forward_hook(
        lambda module, args, output: nodes.append(output.detach().reshape(-1).clone())
    )
    previous = matgl.float_th, matgl_ase._alchmtk_available
    matgl.float_th, matgl_ase._alchmtk_available = torch.float64, False
    types = {symbol: index for index, symbol in enumerate(model.model.element_types)}
    offsets = model.element_refs.property_offset.numpy()
    try:
        results = {}
        for name, build in builds.items():
            atoms = build()
            atoms.calc = PESCalculator(model, stress_unit="eV/A3")
            nodes.clear()
            energy = atoms.get_potential_energy()
            (node,) = nodes
            kinds = [types[symbol] for symbol in atoms.get_chemical_symbols()]
            energies = (
                float(model.data_std) * node.numpy()
                + float(model.data_mean) / len(atoms)
                + offsets[kinds]
            )
            results[name] = {"energy": energy, "energies": energies}
        return results
    finally:
        matgl.float_th, matgl_ase._alchmtk_available = previous
        hook.remove()


def fairchem_upstream(path, task_name: str, builds: dict, family: str) -> dict:
    """FAIRChemCalculator (float64) and the per-node output of its head's ``energy_block``,
    with the task's normaliser (× rmsd, + mean once per structure) and element references."""
    from fairchem.core import FAIRChemCalculator
    from fairchem_models import predict_unit

    unit = predict_unit(path, "float64")
    (head,) = unit.model.module.output_heads.values()
    head = getattr(head, "head", head)  # a dataset wrapper's MLP_EFS_Head
    (task,) = [
        task
        for task in unit.tasks.values()
        if task.property == "energy" and task_name in task.datasets
    ]
    rmsd, mean = float(task.normalizer.rmsd), float(task.normalizer.mean)
    references = task.element_references.element_references.double().numpy()
    nodes = []
    hook = head.energy_block.register_forward_hook(
        lambda module, args, output: nodes.append(output.detach().reshape(-1).clone())
    )
    try:
        results = {}
        for name, build in builds.items():
            atoms = make(family, build)
            atoms.calc = FAIRChemCalculator(unit, task_name=task_name)
            nodes.clear()
            energy = atoms.get_potential_energy()
            (node,) = nodes
            energies = rmsd * node.numpy() + mean / len(atoms) + references[atoms.numbers]
            results[name] = {"energy": energy, "energies": energies}
        return results
    finally:
        hook.remove()


def evaluate_all(calc, family: str, builds: dict) -> dict:
    results = {}
    for name, build in builds.items():
        atoms = make(family, build)
        got = calc.get_properties(["energy", "energies"], atoms)
        results[name] = (float(got["energy"]), np.array(got["energies"], copy=True))
    return results


FAMILIES = ("reference", "chgnet", "mace", "tensornet", "esen", "uma")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_per_atom_energies(family, families, one_thread):
    model, local = families.get(family)
    builds = structures(family)
    single = {}
    for name, build in builds.items():
        result = in_process(local, make(family, build))
        single[name] = (float(result["energy"]), result["energies"])
    expected = upstream(family, families, builds)
    runs = {"P=1": single, "upstream": expected}
    halos = ("exchange", "ghost") if local.num_layers is not None else ("exchange",)
    assert family != "chgnet" or halos == ("exchange",)  # CHGNet has no ghost mode
    nprocs = 3 if family in ("reference", "chgnet") else 2
    for halo in halos:
        with DistributedCalculator(
            model, nprocs=nprocs, partitioner="rcb", halo=halo, timeout=120
        ) as calc:
            runs[f"P={nprocs} {halo}"] = evaluate_all(calc, family, builds)
            assert all(stats["owned_atoms"] > 0 for stats in calc.last_stats)
    for name in builds:
        reference_energy, reference = expected[name]
        assert np.ptp(reference) > 1e-6, f"{name}: per-atom energies too alike to show order"
        for label, results in runs.items():
            energy, energies = results[name]
            assert energies.shape == reference.shape, (label, name)
            total = abs(energies.sum() - energy) / abs(energy)
            assert total <= SUM_RTOL, f"{family} {label} {name}: Σ energies − energy {total:.1e}"
            error = relative_error(energies, reference)
            assert error <= RTOL, f"{family} {label} {name}: energies {error:.2e} from upstream"
            error = relative_error(energy, reference_energy)
            assert error <= RTOL, f"{family} {label} {name}: energy {error:.2e} from upstream"
