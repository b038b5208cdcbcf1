"""The decisions device="cuda" takes, tested on the CPU: the functions that take them are called
in this process with ``torch.cuda`` (and ``torch.distributed``) mocked. Nothing runs on a GPU
and no worker pool starts; tests/test_cuda.py and benchmarks/gpu_check.py run the real thing.

* which backend a CUDA worker joins with, and whether its halo transfers are staged through host
  memory (gloo: yes; NCCL: no), from the driver's options to the worker's communicator;
* which GPU a worker takes (worker r on GPU r mod the GPU count; LOCAL_RANK under a launcher);
* the resident step's fallback to the host neighbour search where vesin-torch refuses;
* GPU memory peaks (``torch.cuda.max_memory_allocated``) in the per-call stats, the
  out-of-memory report and message, and the GPU branch of ``estimate_memory``;
* recognising CUDA out-of-memory errors.
"""

from __future__ import annotations

import os
import subprocess
from multiprocessing.connection import Connection
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import relative_error, small_cell, trajectory
from test_estimate_limit import LinearMemoryCalc, copper

from distmlip import OutOfMemoryError, ReferenceMPNN, trace
from distmlip.capacity import GROWTH_MB, estimate_memory
from distmlip.cluster.launch import detect_launch
from distmlip.driver import pool as launch_module
from distmlip.driver.failures import reply_error
from distmlip.driver.pool import WorkerPool
from distmlip.driver.processes import Workers
from distmlip.exchange.comm import CommunicationError, Communicator
from distmlip.graphs.structure import Structure
from distmlip.messages import WorkerConfig
from distmlip.options import GraphOptions, WorkerOptions
from distmlip.worker.engine import call_exchange
from distmlip.worker.engine import evaluate as evaluate_graph
from distmlip.worker.main import _failure, _worker_device, graph_builder, run_worker
from distmlip.worker.memory import PeakMemory, out_of_memory_kind

MB = 2**20
CPU = torch.device("cpu")
CUDA_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 1 has a total capacity of 79.14 GiB "
    "of which 3.50 MiB is free."
)


class FakeGPUs:
    """What torch.cuda says in these tests: ``count`` GPUs, the devices chosen with
    ``set_device``, and a caching allocator's peak statistics (bytes), per device asked."""

    def __init__(self):
        self.count = 1
        self.selected: list[int] = []
        self.allocated = 0  # bytes allocated now
        self.peak = 0  # since the last reset
        self.asked: list[tuple[str, object]] = []
        self.total = 80 * 2**30

    def max_memory_allocated(self, device=None):
        self.asked.append(("max_memory_allocated", device))
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.asked.append(("reset_peak_memory_stats", device))
        self.peak = self.allocated

    def get_device_properties(self, device):
        self.asked.append(("get_device_properties", device))
        return SimpleNamespace(total_memory=self.total)

    def allocate(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)


@pytest.fixture
def gpus(monkeypatch):
    fake = FakeGPUs()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "set_device", fake.selected.append)
    for name in ("max_memory_allocated", "reset_peak_memory_stats", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def config(rank: int = 0, world_size: int = 2, device: str = "cuda", **fields) -> WorkerConfig:
    """A worker's configuration (``local_workers=1``: as on a node of a launched job, so
    seven workers need not fit the fake GPUs)."""
    options = WorkerOptions(world_size, device, "float64", timeout=10.0, local_workers=1)
    return WorkerConfig(
        rank=rank,
        world_size=world_size,
        init_method="file:///nonexistent/store",
        parent_pid=os.getpid(),
        options=options,
        graph=GraphOptions(),
        threads=torch.get_num_threads(),
        **fields,
    )


# --- the backend and the staging of transfers, driver to worker ------------------------------


class HostModel(torch.nn.Module):
    """A model that stays on the host whatever device it is sent to (records which)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.sent_to = []

    def to(self, *args, **kwargs):
        self.sent_to.append(kwargs.get("device", args[0] if args else None))
        return self


class Sent(list):
    def send(self, message):
        self.append(message)


@pytest.mark.parametrize(
    ("backend", "nprocs", "joins", "staged"),
    [("gloo", 3, "gloo", True), ("auto", 2, "nccl", False), ("nccl", 2, "nccl", False)],
)
def test_cuda_workers_join_with_the_resolved_backend_and_stage_only_over_gloo(
    gpus, monkeypatch, backend, nprocs, joins, staged
):
    """The driver's options → the worker's configuration → the process group it joins → whether
    its communicator stages transfers: gloo with CUDA tensors cannot send point to point, so
    every transfer goes through host memory; NCCL moves device tensors."""
    gpus.count = 2
    options = WorkerOptions(nprocs=nprocs, device="cuda", backend=backend)
    pool = WorkerPool(ReferenceMPNN(), options)  # starts nothing
    assert pool.resident  # the default on CUDA
    rank = nprocs - 1
    worker = pool._config(rank, {"init_method": "file:///nonexistent/store"}, ())
    assert worker.options == options and worker.graph.resident is True

    joined = {}

    def init_process_group(**arguments):
        joined.update(arguments)
        raise RuntimeError("no group in this test")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    model, sent = HostModel(), Sent()
    assert run_worker(sent, worker, lambda: model) == "failed"
    assert sent[0][0] == "error" and "no group in this test" in sent[0][2][0]
    assert joined["backend"] == joins
    assert (joined["rank"], joined["world_size"]) == (rank, nprocs)
    device = torch.device("cuda", rank % 2)
    assert model.sent_to == [device] and gpus.selected == [rank % 2]

    # The communicator of that worker's calls, once its group exists.
    monkeypatch.delenv("DISTMLIP_STAGE_TRANSFERS", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: joined["backend"])
    assert Communicator(rank, nprocs, device).staged is staged
    assert not Communicator(rank, nprocs, CPU).staged  # CPU tensors: gloo sends them
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # P=1: no group, no transfer
    assert not Communicator(0, 1, device).staged


def test_nccl_needs_a_gpu_per_worker_except_for_a_launched_jobs_ranks(gpus):
    """One GPU: three workers may share it over gloo, not over NCCL; a torchrun/SLURM job's
    ranks may each see only their own GPU, so their count is not checked against it."""
    assert WorkerOptions(nprocs=3, device="cuda", backend="gloo").nprocs == 3
    with pytest.raises(ValueError, match="NCCL workers need one GPU each, but torch sees 1"):
        WorkerOptions(nprocs=3, device="cuda")
    assert WorkerOptions(nprocs=4, local_workers=2, device="cuda", backend="nccl").nprocs == 4
    gpus.count = 0
    with pytest.raises(ValueError, match="torch sees no GPU"):
        WorkerOptions(nprocs=1, device="cuda", backend="gloo")


# --- which GPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
def test_worker_r_runs_on_gpu_r_mod_the_gpu_count(gpus, count):
    gpus.count = count
    devices = [_worker_device(config(rank, world_size=7)) for rank in range(7)]
    assert devices == [torch.device("cuda", rank % count) for rank in range(7)]
    assert gpus.selected == [rank % count for rank in range(7)]  # also the current device
    assert _worker_device(config(0, device="cpu")) == CPU and len(gpus.selected) == 7


def test_a_launched_rank_takes_the_gpu_of_its_local_rank(gpus, monkeypatch):
    """Under a launcher, rank 0 (the driver) starts worker 0 on the share of its machine that
    LOCAL_RANK names (here 3, as a launcher may place it): the worker's configuration carries
    local rank 3, which picks its GPU (3 mod the GPUs it sees), and the launcher's variables,
    LOCAL_RANK included, are not inherited by the worker process. Without a launcher the local
    rank is the rank."""
    environ = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    launch = detect_launch(environ)
    assert launch.local_rank == 3
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    started, sent = [], []

    class Popen:
        pid = 12345

        def __init__(self, command, **arguments):
            started.append(arguments["env"])

    class Recorder(Connection):
        def send(self, message):
            sent.append(message)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setattr(launch_module, "Connection", Recorder)
    gpus.count = 2
    options = WorkerOptions(nprocs=8, local_workers=4, device="cuda", backend="nccl")
    pool = WorkerPool(ReferenceMPNN(), options)
    workers = Workers()
    try:
        pool._start_local(workers, 0, launch.local_rank, {"init_method": "file:///x"})
        pool._start_local(workers, 2, 2, {"init_method": "file:///x"})  # local rank = rank
    finally:
        for connection in workers.connections:
            connection.close()
    (first, _), (second, _) = sent
    assert (first.rank, first.local_rank) == (0, 3) and second.local_rank is None
    assert _worker_device(first) == torch.device("cuda", 1)  # 3 mod 2
    assert _worker_device(second) == torch.device("cuda", 0)  # 2 mod 2
    gpus.count = 1  # a task that sees only its own GPU
    assert _worker_device(first) == torch.device("cuda", 0)
    for environment in started:
        assert not {"RANK", "LOCAL_RANK", "MASTER_PORT"} & set(environment)
        assert environment["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


# --- the resident step's neighbour search ------------------------------------------------------


def _walk(model, frames, resident: bool) -> list:
    """P=1 in this process (the worker's builder and engine), a trace recorded per call."""
    graphs = graph_builder(
        model, GraphOptions("rcb", skin=0.4, resident=resident), CPU, torch.float64
    )
    calls = []
    for atoms in frames:
        structure = Structure.from_ase(atoms)
        comm = Communicator(0, 1, CPU)
        with trace.recording() as record:
            call = graphs.get(structure, comm)
            result = evaluate_graph(model, call, call_exchange(call, comm), comm, True)
        calls.append((result, call, record))
    return calls


def test_resident_step_falls_back_to_the_host_search_where_vesin_torch_refuses(monkeypatch):
    """vesin-torch refusing the system (as its CUDA search does for periodic cells thinner than
    twice the cutoff): each rebuild searches on the host instead, says so once in the trace
    (event ``host_search`` with the reason's first line), and the results equal the host path."""
    import vesin_torch

    model = ReferenceMPNN(cutoff=5.0, num_layers=3, hidden=32, seed=0).double()
    frames = trajectory(small_cell(), 5, 0.12, seed=7)
    host = _walk(model, frames, resident=False)
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise RuntimeError("the cell is too small for this cutoff\n(more detail)")

    monkeypatch.setattr(vesin_torch.NeighborList, "compute", refuse)
    device = _walk(model, frames, resident=True)
    built = [call.built for _, call, _ in host]
    assert [call.built for _, call, _ in device] == built
    assert built[0] and not all(built)
    assert len(attempts) == sum(built)  # tried once per rebuild, never per reused step
    for step, ((a, expected, _), (b, call, record)) in enumerate(zip(host, device, strict=True)):
        events = record.named("host_search")
        assert [e["reason"] for e in events] == (
            ["the cell is too small for this cutoff"] if call.built else []
        ), step
        assert call.on_device  # still the resident path
        for field in ("receivers", "senders"):  # the host's neighbour list, in its order
            got = getattr(call.inputs, field).numpy()
            assert np.array_equal(got, getattr(expected.graph.edges, field)), (step, field)
        for key in ("energy", "forces", "virial"):
            error = relative_error(getattr(b, key), getattr(a, key))
            assert error <= 1e-12, (step, key, error)
    # Without the refusal the device search runs and nothing is said.
    monkeypatch.undo()
    assert not any(r.named("host_search") for *_, r in _walk(model, frames[:2], resident=True))


# --- GPU memory: per-call peaks, the out-of-memory report, estimates -------------------------


def test_per_call_gpu_peaks_come_from_the_workers_gpu(gpus):
    """``call_peak_gpu_mb``: torch's peak allocated memory since the call began (reset before
    it), on the worker's own GPU; ``peak_gpu_mb``: the largest since the worker started."""
    device = torch.device("cuda", 1)
    peaks = PeakMemory(device)
    gpus.allocate(500 * MB)  # the model, loaded before the first call
    peaks.start()
    gpus.allocate(1500 * MB)  # call 1: 1.5 GB of activations on top, then freed
    gpus.allocated -= 1500 * MB
    first = peaks.stats()
    assert first["call_peak_gpu_mb"] == 2000 and first["peak_gpu_mb"] == 2000
    peaks.start()
    gpus.allocate(300 * MB)  # call 2: smaller
    second = peaks.stats()
    assert second["call_peak_gpu_mb"] == 800 and second["peak_gpu_mb"] == 2000
    assert {asked for _, asked in gpus.asked} == {device}
    before = len(gpus.asked)
    cpu = PeakMemory(CPU)
    cpu.start()
    assert "call_peak_gpu_mb" not in cpu.stats() and len(gpus.asked) == before


def _out_of_memory(error: BaseException, device) -> tuple:
    sizes = dict(n_atoms=4000, owned_atoms=2000, halo_atoms=986, computed_atoms=2000, edges=84000)
    try:
        raise error
    except BaseException as raised:
        return _failure(raised, config(1, device="cuda"), device, "evaluating", sizes)


def test_cuda_out_of_memory_is_reported_with_the_gpus_memory(gpus):
    """A worker's torch.OutOfMemoryError → its error reply → the driver's OutOfMemoryError: the
    failed allocation, the atoms it held, the GPU's total and the call's peak allocated
    memory (of the worker's own GPU), and remedies, with no memory_limit (CPU only)."""
    device = torch.device("cuda", 1)
    gpus.peak = int(78.5 * 2**30)
    reply = _out_of_memory(torch.OutOfMemoryError(CUDA_MESSAGE), device)
    summary, worker_traceback, report = reply
    assert summary.startswith("OutOfMemoryError: CUDA out of memory") and worker_traceback
    assert report["kind"] == "cuda" and report["requested_bytes"] == 20 * MB
    assert report["gpu_total_mb"] == 80 * 1024 and report["gpu_peak_mb"] == 78.5 * 1024
    assert ("get_device_properties", device) in gpus.asked
    assert ("max_memory_allocated", device) in gpus.asked
    error = reply_error("evaluating", 1, reply, 2, "(not used for out-of-memory replies)")
    assert isinstance(error, OutOfMemoryError) and error.report == report
    message = str(error)
    assert "\n" not in message
    assert message.startswith(
        "evaluating: worker 1 ran out of GPU memory (could not allocate 20 MB) with 2,000 "
        "owned + 986 halo atoms and 84,000 edges of a 4,000-atom structure; GPU peak allocated "
        "78.5 GB of 80.0 GB, peak RSS"
    )
    assert "nprocs > 2" in message and "checkpoint=True" in message
    assert "memory_limit" not in message


def test_a_broken_cuda_context_still_gives_the_out_of_memory_error(gpus, monkeypatch):
    def broken(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    reply = _out_of_memory(torch.OutOfMemoryError(CUDA_MESSAGE), torch.device("cuda", 0))
    report = reply[2]
    assert report["kind"] == "cuda" and "gpu_total_mb" not in report
    message = str(reply_error("evaluating", 1, reply, 2, ""))
    assert "ran out of GPU memory (could not allocate 20 MB)" in message
    assert "GPU peak" not in message and "\n" not in message


def test_cuda_out_of_memory_errors_are_recognised():
    """torch's allocator (torch.OutOfMemoryError, also as the cause of another error, or as a
    RuntimeError of older torch) and the CUDA runtime's own (cudaErrorMemoryAllocation, from a
    cudaMalloc outside torch's allocator, e.g. in an extension: "CUDA error: out of memory")."""
    assert out_of_memory_kind(torch.cuda.OutOfMemoryError(CUDA_MESSAGE)) == "cuda"
    runtime = "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"
    assert out_of_memory_kind(torch.AcceleratorError(runtime)) == "cuda"
    assert out_of_memory_kind(RuntimeError(runtime)) == "cuda"
    try:  # an exchange that failed because the allocation for its buffers did
        try:
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        except RuntimeError as error:
            raise CommunicationError("halo exchange failed") from error
    except CommunicationError as wrapped:
        assert out_of_memory_kind(wrapped) == "cuda"
    for other in (
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error",
    ):
        assert out_of_memory_kind(torch.AcceleratorError(other)) is None, other


class GPUMemoryCalc(LinearMemoryCalc):
    """The stand-in calculator on "cuda": each call's peak RSS as in LinearMemoryCalc, and its
    GPU peak 100 MB + 0.05 MB per edge (steeper: the GPU holds the activations)."""

    def __init__(self, out_of_memory: bool = False):
        super().__init__(memory_limit=None)
        self.pool.options = SimpleNamespace(device="cuda", memory_limit=None, checkpoint=False)
        self.out_of_memory = out_of_memory

    def compute(self, structure, forces=True):
        if self.out_of_memory:
            raise OutOfMemoryError("evaluating: worker 0 ran out of GPU memory")
        super().compute(structure, forces)
        self.last_stats = [
            {**stats, "call_peak_gpu_mb": 100.0 + 0.05 * stats["edges"]}
            for stats in self.last_stats
        ]


def test_estimate_on_cuda_fits_the_gpu_peak_and_calibrates_on_its_growth():
    atoms = copper(10)  # 4,000 atoms: calibration pieces of 128 ... 2,000 atoms
    calc = GPUMemoryCalc()
    estimate = estimate_memory(calc, atoms)
    edges = np.asarray(estimate.edges)
    assert estimate.gpu_per_worker_mb == pytest.approx(100.0 + 0.05 * edges)
    assert estimate.per_worker_mb == pytest.approx(200.0 + 0.01 * edges)
    assert estimate.peak_gpu_mb == max(estimate.gpu_per_worker_mb)
    gpu = [max(r["gpu_peak_mb"]) for r in estimate.calibration]
    assert gpu[-1] - gpu[0] >= GROWTH_MB > gpu[-2] - gpu[0]  # stopped by the GPU's growth
    rss = [max(r["peak_mb"]) for r in estimate.calibration]
    assert rss[-1] - rss[0] < GROWTH_MB  # which the host's alone would not have done
    assert estimate.to_dict()["peak_gpu_mb"] == estimate.peak_gpu_mb


def test_estimate_on_cuda_that_never_fits_says_what_to_change():
    """Every calibration piece runs out of GPU memory: the one-line error names the GPU's
    memory and remedies that exist on CUDA (memory_limit is refused there)."""
    with pytest.raises(OutOfMemoryError) as caught:
        estimate_memory(GPUMemoryCalc(out_of_memory=True), copper(10))
    message = str(caught.value)
    assert message.startswith("estimating memory: a ") and "\n" not in message
    assert "ran out of memory under the GPU's memory" in message
    assert "does not fit either: use more workers" in message
    assert "memory_limit" not in message
