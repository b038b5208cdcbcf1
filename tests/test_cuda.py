"""GPU paths (NCCL, and gloo with several workers per GPU): skipped cleanly on machines
without enough CUDA devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SYSTEMS, evaluate, relative_error

from distmlip import DistributedCalculator


@pytest.mark.parametrize("nprocs", [1, 2])
def test_cuda_equals_cpu(nprocs, reference_model, request):
    if torch.cuda.device_count() < nprocs:
        pytest.skip(f"needs {nprocs} CUDA device(s), found {torch.cuda.device_count()}")
    single_process_results = request.getfixturevalue("single_process_results")
    with DistributedCalculator(reference_model, nprocs=nprocs, device="cuda") as calc:
        for name in ("bulk", "small_cell", "slab"):
            got = evaluate(calc, SYSTEMS[name]())
            expected = single_process_results[name]
            assert got["energy"] == pytest.approx(expected["energy"], rel=1e-10)
            assert np.abs(got["forces"] - expected["forces"]).max() < 1e-9


SHARED_GPU_SYSTEMS = ("bulk", "small_cell", "slab")


@pytest.fixture(scope="module")
def shared_gpu_references(reference_model):
    """float64 results of P=1 on the GPU and P=2 on the CPU, the truths of the shared mode."""
    if torch.cuda.device_count() < 1:
        pytest.skip(f"needs a CUDA device, found {torch.cuda.device_count()}")
    references = {}
    for label, nprocs, device in (("P=1 on the GPU", 1, "cuda"), ("P=2 on the CPU", 2, "cpu")):
        with DistributedCalculator(reference_model, nprocs=nprocs, device=device) as calc:
            references[label] = {
                name: evaluate(calc, SYSTEMS[name]()) for name in SHARED_GPU_SYSTEMS
            }
    return references


@pytest.mark.parametrize("nprocs", [2, 3])
def test_workers_sharing_gpus_over_gloo(nprocs, reference_model, shared_gpu_references):
    """backend="gloo": P workers on however many GPUs there are (worker r on GPU r mod #GPUs),
    halo transfers staged through host memory; the same numbers as P=1 and as the CPU."""
    with DistributedCalculator(
        reference_model, nprocs=nprocs, device="cuda", backend="gloo", timeout=300
    ) as calc:
        for name in SHARED_GPU_SYSTEMS:
            got = evaluate(calc, SYSTEMS[name]())
            for label, references in shared_gpu_references.items():
                for key, expected in references[name].items():
                    error = relative_error(got[key], expected)
                    assert error <= 1e-10, f"P={nprocs} vs {label}, {name}: {key} {error:.2e}"
        assert all(stats["peak_gpu_mb"] > 0 for stats in calc.last_stats)


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="torch sees no GPU; use device='cpu'"):
        DistributedCalculator("reference", nprocs=1, device="cuda")


def test_uma_on_cuda_equals_cpu(tmp_path):
    """The UMA-shaped model on the GPU (its expert tensors must follow the model's device)."""
    if torch.cuda.device_count() < 1:
        pytest.skip(f"needs a CUDA device, found {torch.cuda.device_count()}")
    from fairchem_models import uma_config, uma_tasks_config, write_esen_checkpoint
    from test_fairchem import crystal

    from distmlip.models.fairchem import ESENAdapter

    path = write_esen_checkpoint(tmp_path / "uma.pt", config=uma_config(), tasks=uma_tasks_config())
    results = {}
    for device in ("cpu", "cuda"):
        adapter = ESENAdapter(path, task_name="omat")
        with DistributedCalculator(adapter, nprocs=1, device=device, timeout=300) as calc:
            results[device] = calc.get_properties(["energy", "forces"], crystal())
    assert results["cuda"]["energy"] == pytest.approx(results["cpu"]["energy"], rel=1e-10)
    assert np.abs(results["cuda"]["forces"] - results["cpu"]["forces"]).max() < 1e-9
