"""The ``backend`` option, the workers' environment, and transfers staged through host memory
(gloo on GPUs). Runs on the CPU: the GPU count is mocked, no worker starts on a GPU here."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import SYSTEMS, evaluate, relative_error

from distmlip import DistributedCalculator
from distmlip.driver.pool import (
    CUDA_ALLOCATOR_ENVIRONMENT,
    KEEP_MEMORY_ENVIRONMENT,
    worker_environment,
)
from distmlip.exchange.comm import Communicator
from distmlip.exchange.transport import _stage
from distmlip.exchange.transport import unstage as _unstage
from distmlip.options import WorkerOptions, resolve_backend


@pytest.fixture
def one_gpu(monkeypatch):
    """torch sees one GPU (options only: nothing may run on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def refusal(**options) -> str:
    """The one-line ValueError of DistributedCalculator("chgnet", **options), raised before the
    model loads (CHGNet would take seconds)."""
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        DistributedCalculator("chgnet", **options)
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("backend", ["auto", "nccl"])
def test_more_nccl_workers_than_gpus_is_refused_saying_what_to_change(one_gpu, backend):
    message = refusal(nprocs=2, device="cuda", backend=backend)
    assert message == (
        "nprocs=2 NCCL workers need one GPU each, but torch sees 1; use nprocs <= 1, or "
        "backend='gloo' to let several workers share a GPU (slower: transfers go through "
        "host memory)"
    )


def test_gloo_lets_workers_share_a_gpu(one_gpu):
    for nprocs in (1, 2, 3):
        options = WorkerOptions(nprocs=nprocs, device="cuda", backend="gloo")
        assert resolve_backend(options.device, options.backend) == "gloo"
    assert WorkerOptions(nprocs=1, device="cuda", backend="nccl").backend == "nccl"


def test_auto_is_nccl_on_gpus_and_gloo_on_the_cpu():
    assert resolve_backend("cuda", "auto") == "nccl"
    assert resolve_backend("cpu", "auto") == "gloo"
    assert resolve_backend("cuda", "gloo") == "gloo"
    assert WorkerOptions(nprocs=1).backend == "auto"


@pytest.mark.parametrize("backend", ["mpi", "NCCL", "", None, ["gloo"]])
def test_unknown_backend_is_refused(backend):
    message = refusal(nprocs=1, backend=backend)
    assert message == f"backend must be one of ('auto', 'nccl', 'gloo'), got {backend!r}"


def test_nccl_on_the_cpu_is_refused():
    message = refusal(nprocs=2, device="cpu", backend="nccl")
    assert message == "backend='nccl' needs device='cuda'; use backend='gloo' on the CPU"


def test_cuda_workers_get_expandable_segments_unless_the_user_sets_the_allocator(one_gpu):
    cuda = WorkerOptions(nprocs=2, device="cuda", backend="gloo", threads_per_worker=3)
    environment = worker_environment(cuda, base={"PATH": "/bin"})
    assert environment["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert environment == {
        **KEEP_MEMORY_ENVIRONMENT,
        **CUDA_ALLOCATOR_ENVIRONMENT,
        "PATH": "/bin",
        "OMP_NUM_THREADS": "3",
    }
    mine = worker_environment(cuda, base={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"})
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"


def test_cpu_workers_environment_has_no_cuda_setting():
    cpu = WorkerOptions(nprocs=2, threads_per_worker=1)
    assert worker_environment(cpu, base={}) == {**KEEP_MEMORY_ENVIRONMENT, "OMP_NUM_THREADS": "1"}
    system = WorkerOptions(nprocs=2, threads_per_worker=1, allocator="system")
    assert worker_environment(system, base={"MALLOC_MMAP_MAX_": "7"}) == {
        "MALLOC_MMAP_MAX_": "7",
        "OMP_NUM_THREADS": "1",
    }


def test_staging_round_trips_through_host_buffers():
    """Sends are host copies; receives land in separate host buffers, then in their rows."""
    local = torch.zeros(10, 3, dtype=torch.float64)
    receives = [(1, local[4:6]), (2, local[6:10])]
    sends = [(1, torch.arange(6.0).reshape(2, 3)), (2, torch.ones(1, 3, dtype=torch.float32))]
    staged_sends, buffers, copies = _stage(sends, receives)
    for (peer, tensor), (staged_peer, staged) in zip(sends, staged_sends, strict=True):
        assert staged_peer == peer and staged.device.type == "cpu"
        assert staged.dtype == tensor.dtype and torch.equal(staged, tensor)
    assert [peer for peer, _ in buffers] == [1, 2]
    received = {1: torch.full((2, 3), 5.0, dtype=torch.float64), 2: torch.rand(4, 3).double()}
    for peer, buffer in buffers:
        assert buffer.device.type == "cpu" and buffer.dtype == torch.float64
        assert buffer.untyped_storage().data_ptr() != local.untyped_storage().data_ptr()
        buffer.copy_(received[peer])  # what the transfer writes
    assert not local.any()  # nothing reaches the targets before the copy back
    _unstage(copies)
    assert torch.equal(local[4:6], received[1]) and torch.equal(local[6:], received[2])
    assert not local[:4].any()


def test_communicators_stage_only_when_needed(monkeypatch):
    monkeypatch.delenv("DISTMLIP_STAGE_TRANSFERS", raising=False)
    assert not Communicator(0, 1, torch.device("cpu")).staged
    assert Communicator(0, 1, torch.device("cpu"), staged=True).staged
    monkeypatch.setenv("DISTMLIP_STAGE_TRANSFERS", "1")
    assert Communicator(0, 1, torch.device("cpu")).staged


@pytest.mark.slow
def test_staged_transfers_give_the_same_results(pools, monkeypatch):
    """P=2 on the CPU with every point-to-point transfer staged as on GPUs shared over gloo
    (overlapped and blocking exchanges, the reverse sum of the forces, the plan handshake)."""
    names = ("bulk", "small_cell")
    monkeypatch.delenv("DISTMLIP_STAGE_TRANSFERS", raising=False)
    single = pools.get(1)
    expected = {name: evaluate(single, SYSTEMS[name]()) for name in names}
    monkeypatch.setenv("DISTMLIP_STAGE_TRANSFERS", "1")  # inherited by the workers
    with DistributedCalculator(pools.model, nprocs=2, partitioner="rcb", timeout=120) as calc:
        for name in names:
            got = evaluate(calc, SYSTEMS[name]())
            for key, value in expected[name].items():
                error = relative_error(got[key], value)
                assert error <= 1e-10, f"{name}: {key} {error:.2e}"
    assert np.abs(got["forces"]).max() > 1e-3
