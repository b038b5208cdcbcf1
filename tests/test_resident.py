"""The resident step (distmlip.worker.resident) on CPU tensors equals the numpy path; positions-only
requests (distmlip.driver.sender) never use a stale structure.

The resident path is what device="cuda" runs by default; here it runs the same torch code on
the CPU, compared with resident=False at the same P (float64, to round-off), over MD-like
walks with a Verlet skin that both reuse and rebuild graphs, periodic and not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SYSTEMS, cluster, evaluate, small_cell, surface_slab, trajectory

from distmlip import DistributedCalculator
from distmlip.driver.sender import StructureSender
from distmlip.exchange.comm import Communicator
from distmlip.graphs.halo import build_local_graph
from distmlip.graphs.neighbors import neighbor_list
from distmlip.graphs.partition import partition
from distmlip.graphs.structure import Structure
from distmlip.messages import EvaluationRequest, Moved, StaleBase
from distmlip.options import GraphOptions
from distmlip.worker.engine import call_exchange
from distmlip.worker.engine import evaluate as evaluate_graph
from distmlip.worker.main import graph_builder
from distmlip.worker.resident import device_pairs
from distmlip.worker.store import StructureStore

RTOL = 1e-12
CPU = torch.device("cpu")


def _edge_set(edges) -> np.ndarray:
    """The edges as sorted rows (receiver, sender, shift): an order-free comparison."""
    rows = np.column_stack([edges.receivers, edges.senders, edges.shifts])
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_vesin_torch_neighbor_list_equals_vesin(name):
    structure = Structure.from_ase(SYSTEMS[name]())
    n = structure.n_atoms
    positions = torch.tensor(structure.positions)
    for cutoff in (3.0, 5.5):
        pairs = device_pairs(positions, structure.cell, structure.pbc, np.arange(n), cutoff)
        assert pairs is not None
        host = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
        device = neighbor_list(
            structure.positions, structure.cell, structure.pbc, cutoff, pairs=pairs
        )
        assert len(host) > 0
        np.testing.assert_array_equal(_edge_set(device), _edge_set(host))
        # The local graphs built from either search: the same edges, rows and halo.
        owner = partition(structure, 3, "rcb", cutoff)
        search = lambda atoms, c: device_pairs(positions, structure.cell, structure.pbc, atoms, c)  # noqa: E731
        for rank in range(3):
            expected = build_local_graph(structure, owner, rank, 3, cutoff)
            got = build_local_graph(structure, owner, rank, 3, cutoff, pair_search=search)
            np.testing.assert_array_equal(got.global_index, expected.global_index)
            np.testing.assert_array_equal(_edge_set(got.edges), _edge_set(expected.edges))


@pytest.mark.parametrize("value", ["yes", 1, 0, 1.0, "cuda"])
def test_bad_resident_values_are_refused(value):
    with pytest.raises(ValueError, match="resident must be True, False or None"):
        GraphOptions(resident=value)
    with pytest.raises(ValueError, match="resident must be True, False or None"):
        DistributedCalculator("reference", nprocs=1, resident=value)


def test_resident_needs_exchange_and_vesin_torch(monkeypatch):
    with pytest.raises(ValueError, match="resident=True needs halo='exchange'"):
        GraphOptions(halo="ghost", resident=True)
    assert GraphOptions(halo="ghost").resident_on("cuda") is False
    assert GraphOptions().resident_on("cpu") is False
    assert GraphOptions().resident_on("cuda") is True
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs vesin-torch"):
        GraphOptions().resident_on("cuda")
    assert GraphOptions(resident=False).resident_on("cuda") is False


def _walks(builders: dict, steps: int, step: float) -> dict:
    return {name: trajectory(build(), steps, step, seed=7) for name, build in builders.items()}


def _in_process(model, frames, skin: float, resident: bool) -> list:
    """One rank (P=1), in this process: the worker's builder and engine, per frame."""
    graphs = graph_builder(
        model, GraphOptions("rcb", skin=skin, resident=resident), CPU, torch.float64
    )
    calls = []
    for atoms in frames:
        structure = Structure.from_ase(atoms)
        comm = Communicator(0, 1, CPU)
        call = graphs.get(structure, comm)
        result = evaluate_graph(model, call, call_exchange(call, comm), comm, True)
        calls.append((result, call))
    return calls


def _assert_close(got, expected, label):
    for key, value in expected.items():
        error = np.abs(np.asarray(got[key]) - value).max() / max(np.abs(value).max(), 1e-300)
        assert error <= RTOL, f"{label}: {key} {error:.1e}"


@pytest.fixture(scope="module")
def chgnet():
    from distmlip.models import resolve_model

    return resolve_model("chgnet")


@pytest.fixture(scope="module")
def chgnet64(chgnet):
    model = copy.deepcopy(chgnet).double().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.mark.parametrize("which", ["reference", "chgnet"])
def test_in_process_resident_equals_host_path(which, reference_model, request, one_thread):
    """P=1: the workers' builder and engine in this process (the calculators below add P=2
    and 3); CHGNet's prepared bond tensors go to the device once per build."""
    if which == "chgnet":
        model = request.getfixturevalue("chgnet64")
    else:
        model = copy.deepcopy(reference_model).double()
    systems = {"small_cell": small_cell, "cluster": cluster}
    if which == "reference":
        systems["slab"] = surface_slab  # pbc (True, True, False)
    for name, frames in _walks(systems, 4 if which == "chgnet" else 5, 0.12).items():
        host = _in_process(model, frames, 0.4, resident=False)
        device = _in_process(model, frames, 0.4, resident=True)
        built = [call.built for _, call in host]
        assert [call.built for _, call in device] == built, name
        assert built[0] and any(built[1:]) and not all(built), (name, built)
        for step, ((a, _), (b, call)) in enumerate(zip(host, device, strict=True)):
            assert call.on_device and call.inputs.vectors.device == CPU
            plans = [call.graph.plan, *call.prepared.row_plans.values()]  # uploaded per build
            assert all(isinstance(rows, torch.Tensor) for p in plans for rows in p.send_index)
            expected = {"energy": a.energy, "forces": a.forces, "virial": a.virial}
            expected.update(a.site_properties)
            got = {"energy": b.energy, "forces": b.forces, "virial": b.virial}
            got.update(b.site_properties)
            _assert_close(got, expected, f"{which} {name} step {step}")
        if which == "reference":  # without a skin: every call builds, every edge is used
            for (a, _), (b, call) in zip(
                _in_process(model, frames[:2], 0.0, resident=False),
                _in_process(model, frames[:2], 0.0, resident=True),
                strict=True,
            ):
                assert call.built and call.inputs.kept_edges is None
                got = {"energy": b.energy, "forces": b.forces, "virial": b.virial}
                expected = {"energy": a.energy, "forces": a.forces, "virial": a.virial}
                _assert_close(got, expected, f"{name} skin 0")
        if which == "chgnet":  # BondGraph.on: one upload per build, reused by every call
            tensors = [call.prepared.value.on(CPU) for _, call in device]
            for step in range(1, len(device)):
                same_build = not device[step][1].built
                assert (tensors[step] is tensors[step - 1]) == same_build, (name, step)


def _run(model, nprocs: int, walks: dict, resident: bool, skin: float = 0.4):
    with DistributedCalculator(
        model, nprocs=nprocs, partitioner="rcb", skin=skin, resident=resident, timeout=120
    ) as calc:
        assert calc.resident is resident
        results = {
            name: [evaluate(calc, atoms) for atoms in frames] for name, frames in walks.items()
        }
        return results, (calc.graph_builds, calc.graph_reuses)


@pytest.mark.parametrize("nprocs", [2, 3])
@pytest.mark.slow
def test_resident_equals_host_path_reference(reference_model, nprocs):
    walks = _walks({"small_cell": small_cell, "cluster": cluster}, 5, 0.12)
    expected, counts = _run(reference_model, nprocs, walks, resident=False)
    with DistributedCalculator(
        reference_model, nprocs=nprocs, partitioner="rcb", skin=0.4, resident=True, timeout=120
    ) as calc:
        for name, frames in walks.items():
            for step, atoms in enumerate(frames):
                _assert_close(evaluate(calc, atoms), expected[name][step], f"{name} {step}")
                sent = {stats["positions_only"] for stats in calc.last_stats}
                assert sent == {int(step > 0)}, (name, step)  # new species: complete
        assert (calc.graph_builds, calc.graph_reuses) == counts
        builds, reuses = counts
        assert builds > len(walks) and reuses >= len(walks), counts
        if nprocs == 2:
            _check_stale_base_is_resent(calc, walks["cluster"][-1], expected["cluster"][-1])


def _check_stale_base_is_resent(calc, atoms, expected):
    """A worker asked to amend a structure it does not hold refuses; the driver restarts the
    workers and sends the complete structure (the driver is made to name a wrong base)."""
    sender = calc.pool._sender
    workers, request_id, rest = sender._base
    sender._base = (workers, request_id - 1, rest)
    pids = calc.pool.pids
    again = evaluate(calc, atoms)
    assert calc.pool.pids != pids, "the workers were not restarted"
    assert {stats["positions_only"] for stats in calc.last_stats} == {0}
    _assert_close(again, expected, "after a stale base")


@pytest.mark.parametrize("nprocs, system", [(2, "cluster"), (3, "small_cell")])
@pytest.mark.slow
def test_resident_equals_host_path_chgnet(chgnet, nprocs, system):
    """P=2 without periodicity, P=3 in a cell smaller than twice the cutoff (P=1: in process,
    above; one system per P keeps the four CHGNet pools' start-up within the time budget)."""
    walks = _walks({system: SYSTEMS[system]}, 5, 0.12)
    expected, counts = _run(chgnet, nprocs, walks, resident=False)
    got, resident_counts = _run(chgnet, nprocs, walks, resident=True)
    assert resident_counts == counts
    assert counts[0] > 1 and counts[1] >= 1, counts
    for name, frames in expected.items():
        for step, reference in enumerate(frames):
            _assert_close(got[name][step], reference, f"chgnet {name} {step}")


def test_positions_only_requests_are_never_stale():
    """The driver sends Moved only to the workers that hold the base, with the same rest
    (compared by value: in-place changes count); a worker holding another base refuses."""
    structure = Structure.from_ase(small_cell())
    sender, store, workers = StructureSender(), StructureStore(), object()
    sent, rest = sender.message(structure, workers)
    assert sent is structure and rest is not None
    assert store.resolve(5, EvaluationRequest(sent)).structure is structure
    sender.delivered(workers, 5, rest)
    moved = Structure(
        structure.positions + 0.1, structure.numbers, structure.cell * 1.01, structure.pbc
    )
    sent, rest = sender.message(moved, workers)
    assert isinstance(sent, Moved) and sent.base == 5 and rest is None
    complete = store.resolve(6, EvaluationRequest(sent)).structure
    for field in ("positions", "numbers", "cell", "pbc"):
        np.testing.assert_array_equal(getattr(complete, field), getattr(moved, field))
    assert complete.system == moved.system
    sender.delivered(workers, 6, rest)  # a Moved does not change the base
    assert sender.message(moved, workers)[0].base == 5
    # Another set of workers (a restart), in-place changed species, new system inputs: full.
    assert sender.message(moved, object())[0] is moved
    moved.numbers[0] = 29 if moved.numbers[0] != 29 else 28
    assert sender.message(moved, workers)[0] is moved
    charged = Structure(
        structure.positions, structure.numbers, structure.cell, structure.pbc, {"charge": 1}
    )
    assert sender.message(charged, workers)[0] is charged
    # A worker that holds another base, or none, refuses before computing.
    with pytest.raises(StaleBase, match="request 4"):
        store.resolve(7, EvaluationRequest(Moved(4, structure.positions, structure.cell)))
    with pytest.raises(StaleBase, match="holds none"):
        StructureStore().resolve(7, EvaluationRequest(Moved(5, moved.positions, moved.cell)))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_vesin_torch_on_cuda_equals_vesin(name):
    """The CUDA search: the same edges as vesin on the host (in its own order), or None where
    it refuses the system (then the host search is used)."""
    structure = Structure.from_ase(SYSTEMS[name]())
    positions = torch.tensor(structure.positions, device="cuda")
    atoms = np.arange(structure.n_atoms)
    for cutoff in (3.0, 5.5):
        pairs = device_pairs(positions, structure.cell, structure.pbc, atoms, cutoff)
        if pairs is None:
            continue
        host = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
        device = neighbor_list(
            structure.positions, structure.cell, structure.pbc, cutoff, pairs=pairs
        )
        np.testing.assert_array_equal(_edge_set(device), _edge_set(host))


@needs_cuda
def test_resident_on_cuda_equals_host_path_on_cpu(reference_model):
    walks = _walks({"small_cell": small_cell, "cluster": cluster, "slab": surface_slab}, 5, 0.12)
    expected, counts = _run(reference_model, 1, walks, resident=False)
    with DistributedCalculator(
        reference_model, nprocs=1, device="cuda", skin=0.4, timeout=120
    ) as calc:
        assert calc.resident  # the default on CUDA
        for name, frames in walks.items():
            for step, atoms in enumerate(frames):
                got = evaluate(calc, atoms)
                for key, value in expected[name][step].items():
                    error = np.abs(got[key] - value).max() / max(np.abs(value).max(), 1e-300)
                    assert error <= 1e-10, (name, step, key, error)  # GPU edge order
        assert (calc.graph_builds, calc.graph_reuses) == counts


def test_resident_inputs_are_in_the_workers_dtype(reference_model):
    """The resident builder works in float64 and hands the model float32 inputs when the
    worker runs in float32, after a build and on a reuse, as the host builder does."""
    model = copy.deepcopy(reference_model).float()
    frames = trajectory(small_cell().repeat((2, 1, 1)), 2, 0.02, seed=3)
    results = {}
    for resident in (False, True):
        options = GraphOptions("rcb", skin=0.5, resident=resident)
        graphs = graph_builder(model, options, CPU, torch.float32)
        results[resident] = []
        for atoms in frames:
            comm = Communicator(0, 1, CPU)
            call = graphs.get(Structure.from_ase(atoms), comm)
            assert call.on_device == resident
            assert call.inputs.vectors.dtype == torch.float32
            result = evaluate_graph(model, call, call_exchange(call, comm), comm, True)
            results[resident].append((call.built, result.energy, result.forces))
    assert [built for built, *_ in results[True]] == [True, False]
    for (_, energy, forces), (_, host_energy, host_forces) in zip(
        results[True], results[False], strict=True
    ):
        assert abs(energy - host_energy) <= 1e-5 * abs(host_energy)
        assert np.abs(forces - host_forces).max() <= 1e-4 * np.abs(host_forces).max()
