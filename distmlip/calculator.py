"""ASE calculator that evaluates a model across P worker processes."""

from __future__ import annotations

import difflib
import inspect
import threading

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from distmlip.driver.pool import WorkerPool
from distmlip.graphs.structure import Structure
from distmlip.graphs.validate import validate_structure
from distmlip.models import resolve_model
from distmlip.options import GraphOptions, WorkerOptions

__all__ = ["DistributedCalculator", "assemble"]

_ASE_ARGUMENTS = {"restart", "ignore_bad_restart_file", "label", "atoms", "directory"}


def assemble(results: list, n_atoms: int, volume: float) -> dict:
    """Combine per-worker results into ASE-style properties (eV, eV/Å, eV/Å³ Voigt)."""
    energies = np.zeros(n_atoms)
    forces = np.zeros((n_atoms, 3))
    for result in results:
        energies[result.global_index] = result.energies
        if result.forces is not None:
            np.add.at(forces, result.force_index, result.forces)
    energy = float(sum(result.energy for result in results))
    properties = {"energy": energy, "free_energy": energy, "energies": energies}
    for name, first in results[0].site_properties.items():
        values = np.zeros((n_atoms, *first.shape[1:]))
        for result in results:
            values[result.global_index] = result.site_properties[name]
        properties[name] = values
    if results[0].forces is not None:
        properties["forces"] = forces
    if results[0].virial is not None:  # None for direct-force models: no stress
        virial = sum(result.virial for result in results)
        if volume > 0:
            stress = 0.5 * (virial + virial.T) / volume
            properties["stress"] = full_3x3_to_voigt_6_stress(stress)
    return properties


class DistributedCalculator(Calculator):
    """Evaluate ``model`` with its atom graph partitioned over ``nprocs`` workers.

    Args:
        model: a :class:`~distmlip.models.base.DistributedModel` or a model name
            (``"reference"``).
        nprocs: number of worker processes P (1 runs the same code without communication;
            default 2). In a job started by torchrun or srun every rank is one worker, so
            ``nprocs`` is the job's world size (leave it out): rank 0 drives, and on every
            other rank this constructor serves rank 0 until it closes, then exits the process
            (docs/multinode.md). ``DISTMLIP_LAUNCH=local`` ignores the launcher.
        partitioner: ``"slab"``, ``"rcb"`` or ``"metis"``.
        device: ``"cpu"`` or ``"cuda"`` (one GPU per worker with NCCL).
        backend: ``"auto"`` (default: NCCL on ``"cuda"``, gloo on ``"cpu"``), ``"nccl"``, or
            ``"gloo"``: on ``"cuda"`` several workers may share a GPU (worker r on GPU
            r mod #GPUs), their halo transfers staged through host memory (slower than NCCL;
            for testing P >= 2 on one GPU, or several workers per GPU).
        dtype: ``"float64"`` (exact comparisons) or ``"float32"``.
        timeout: seconds before a stuck or dead worker raises instead of hanging.
        threads_per_worker: torch threads per worker (default: cores // nprocs).
        halo: ``"exchange"`` (default): zero redundancy, halo features exchanged after every
            layer; ``"ghost"``: the conventional spatial-decomposition baseline, each worker
            recomputes ``num_layers`` hops of ghost atoms and exchanges nothing (for
            benchmarks; results are identical).
        skin: Å (default 0: a new graph every call). With ``skin > 0`` workers build their
            graphs with ``cutoff + skin`` and reuse them, re-selecting the edges shorter than
            the cutoff, for as long as no atom has moved more than ``skin / 2`` and the cell,
            pbc and species are unchanged (a Verlet list): MD steps then skip the neighbour
            search, the partition and the halo-plan handshake. Results are the same as without
            it. ``graph_builds`` and ``graph_reuses`` count what happened. Each worker makes the
            decision from the replicated structure, by the same rule. Exchange mode only.
        resident: the per-call graph work (skin check, edge vectors, selection of the edges
            shorter than the cutoff, model inputs) in torch on the worker's device, and the
            neighbour search there with vesin-torch, so an MD step with a reused graph sends
            only positions to the device; ``None`` (default): on for ``device="cuda"``, off on
            the CPU. The same numbers as off, to round-off (docs/performance.md).
        allocator: ``"keep"`` (default): workers keep freed memory mapped, so repeated calls
            (MD) do not pay page faults again (faster steps, up to ~40 % higher peak memory for
            cheap models); ``"system"``: the C library's defaults (lowest peak memory).
        checkpoint: activation checkpointing (default False). Each message-passing layer keeps
            only its inputs for the backward and is recomputed there, its edge messages summed
            in chunks of ``checkpoint`` edges (``True``: 32,768) so the backward holds one
            chunk at a time; halo exchanges are replayed from memory rather than sent again.
            Several times less memory per atom for some more time, the same numbers to
            round-off (docs/performance.md).
        memory_limit: GB (2^30 bytes) each CPU worker may use (default None: no bound). A call
            that needs more raises :class:`~distmlip.OutOfMemoryError`, which names the worker,
            its atoms, its memory and what to change, instead of the kernel killing the worker;
            the next call (e.g. on a smaller structure) starts new workers.
            :meth:`estimate_memory` predicts what a structure needs.
        trace: workers record a :class:`~distmlip.trace.Trace` of every call (spans of each
            phase, one event per exchange), kept in ``last_traces``; for benchmarks.

    Properties: ``energy``, ``free_energy``, ``energies`` (eV), ``forces`` (eV/Å) and ``stress``
    (eV/Å³, Voigt xx yy zz yz xz xy; needs a cell of nonzero volume). A call computes what it
    is asked for (energy alone: no backward pass); :meth:`get_properties` gets several from
    one evaluation. Options after ``model`` are keyword-only; the settings are read-only. After
    each call ``last_timings`` (seconds per phase; ``communication`` is the part of forward,
    backward and forces spent waiting on exchanges) and ``last_stats`` (sizes, bytes, peak RSS)
    hold per-worker records, ``last_owners`` the rank that owned each atom (N,), and
    ``last_traces`` per-worker traces when ``trace=True``. Owners are re-assigned at every graph
    build (an MD run rebalances whenever its atoms have moved skin/2), so slab and rcb keep the
    owned atoms per worker within one of each other.

    Use as a context manager or call :meth:`close`; workers also stop when the calculator is
    dropped and at interpreter exit. Calls from several threads are serialised. A call that is
    abandoned (Ctrl-C, an exception from a signal handler) kills its workers; the next call
    starts new ones, so no result of an abandoned call is ever returned.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model="reference",
        *,
        nprocs: int | None = None,
        partitioner: str = "slab",
        device: str = "cpu",
        backend: str = "auto",
        dtype: str = "float64",
        timeout: float = 600.0,
        threads_per_worker: int | None = None,
        halo: str = "exchange",
        skin: float = 0.0,
        resident: bool | None = None,
        allocator: str = "keep",
        checkpoint: bool | int = False,
        memory_limit: float | None = None,
        trace: bool = False,
        **kwargs,
    ):
        from distmlip.cluster.launch import detect_launch
        from distmlip.cluster.rendezvous import launched

        launch = detect_launch()
        # Under torchrun/srun: rank 0's store up early, ranks >= 1 silent on stdout, and a
        # failure here told to the other ranks, so they stop waiting (distmlip.cluster.rendezvous).
        with launched(launch):
            local_workers = None
            if launch is None:
                nprocs = 2 if nprocs is None else nprocs
            elif nprocs is not None and nprocs != launch.world_size:
                raise ValueError(
                    f"nprocs={nprocs}, but this {launch.source} job has {launch.world_size} ranks "
                    "and each rank is one worker: leave nprocs out (or set DISTMLIP_LAUNCH=local "
                    "for workers of this process only)"
                )
            else:
                nprocs, local_workers = launch.world_size, launch.local_world_size
            # Every option is checked before the model loads or a worker starts.
            options = WorkerOptions(
                nprocs=nprocs,
                local_workers=local_workers,
                device=device,
                backend=backend,
                dtype=dtype,
                timeout=timeout,
                threads_per_worker=threads_per_worker,
                allocator=allocator,
                checkpoint=checkpoint,
                memory_limit=memory_limit,
            )
            graph_options = GraphOptions(
                partitioner=partitioner, halo=halo, skin=skin, resident=resident
            )
            if not isinstance(trace, bool):
                raise ValueError(f"trace must be True or False, got {trace!r}")
            unknown = sorted(set(kwargs) - _ASE_ARGUMENTS)
            if unknown:
                own = [
                    parameter.name
                    for parameter in inspect.signature(type(self).__init__).parameters.values()
                    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                ]
                close = difflib.get_close_matches(unknown[0], own + sorted(_ASE_ARGUMENTS))
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"unexpected keyword argument {unknown[0]!r}{hint}")
            super().__init__(**kwargs)
            # ASE serves one call at a time per calculator: calls from several threads queue here.
            self._lock = threading.RLock()
            self._model = resolve_model(model)
            graph_options.check_model(self._model)
            self._trace = trace
            self._system: dict = {}  # the system inputs of the cached results
            self.graph_builds = 0
            self.graph_reuses = 0
            # Models may add per-atom outputs (CHGNet: "magmoms"); ASE only serves listed names.
            self.implemented_properties = list(type(self).implemented_properties) + [
                name
                for name in getattr(self.model, "site_properties", ())
                if name not in type(self).implemented_properties
            ]
            if launch is not None and launch.rank > 0:
                from distmlip.cluster.serve import serve

                serve(self.model, launch, options, graph_options)  # exits the process
            self.pool = WorkerPool(self.model, options, graph_options, launch=launch)
            self.last_timings: list[dict[str, float]] = []
            self.last_stats: list[dict[str, int]] = []
            self.last_traces: list = []
            self.last_owners: np.ndarray | None = None
            self.pool.start()

    # Read-only: the workers were started for these; changing one would need new workers.

    @property
    def model(self):
        return self._model

    @property
    def nprocs(self) -> int:
        return self.pool.nprocs

    @property
    def partitioner(self) -> str:
        return self.pool.graph_options.partitioner

    @property
    def halo(self) -> str:
        return self.pool.graph_options.halo

    @property
    def skin(self) -> float:
        return self.pool.graph_options.skin

    @property
    def checkpoint(self) -> bool | int:
        return self.pool.options.checkpoint

    @property
    def memory_limit(self) -> float | None:
        return self.pool.options.memory_limit

    @property
    def backend(self) -> str:
        return self.pool.options.backend

    @property
    def resident(self) -> bool:
        """Whether the workers take the resident path (``resident=None`` resolved)."""
        return self.pool.resident

    def compute(self, structure: Structure, forces: bool = True) -> dict:
        """Evaluate a :class:`~distmlip.graphs.structure.Structure`; returns the properties
        dictionary."""
        with self._lock:
            return self._compute(structure, forces)

    def _compute(self, structure: Structure, forces: bool) -> dict:
        # A failed or interrupted call must not leave the previous structure's records.
        self.last_timings, self.last_stats, self.last_traces = [], [], []
        self.last_owners = None
        validate_structure(structure, self.nprocs, self.model)
        results = self.pool.evaluate(structure, compute_forces=forces, trace=self._trace)
        if results[0].stats["graph_reused"]:
            self.graph_reuses += 1
        else:
            self.graph_builds += 1
        self.last_timings = [r.timings for r in results]
        self.last_stats = [r.stats for r in results]
        self.last_traces = [r.trace for r in results] if self._trace else []
        owners = np.empty(structure.n_atoms, dtype=np.int64)
        for rank, result in enumerate(results):
            owners[result.global_index] = rank
        self.last_owners = owners
        return assemble(results, structure.n_atoms, structure.volume)

    def estimate_memory(self, atoms, nprocs: int | None = None, **options):
        """Predicted peak memory per worker for ``atoms`` on ``nprocs`` workers (default:
        this calculator's), from a short calibration on smaller structures cut from it.

        Returns a :class:`~distmlip.capacity.MemoryEstimate`; see :mod:`distmlip.capacity`
        for the method and ``options``. Uses (and keeps) this calculator's workers.
        """
        from distmlip.capacity import estimate_memory

        with self._lock:
            return estimate_memory(self, atoms, nprocs, **options)

    def get_property(self, name, atoms=None, allow_calculation=True):
        # ASE's check_state → reset → calculate → read self.results must not interleave with
        # another thread's call on this calculator.
        with self._lock:
            return super().get_property(name, atoms, allow_calculation)

    def get_properties(self, properties, atoms=None) -> dict:
        """Several properties from one evaluation (cached like ASE's ``get_property``).

        ``calc.get_properties(["energy", "forces", "stress"], atoms)`` costs one call, where
        ``get_potential_energy()`` then ``get_forces()`` would evaluate twice (energy alone
        runs no backward pass).
        """
        with self._lock:
            if atoms is None:
                atoms = self.atoms
            elif self.check_state(atoms):
                self.reset()
            missing = [name for name in properties if name not in self.results]
            if missing:
                self.calculate(atoms, list(properties), all_changes)
            return {name: self.get_property(name, atoms) for name in properties}

    def calculate_properties(self, atoms, properties):
        with self._lock:
            return super().calculate_properties(atoms, properties)

    def check_state(self, atoms, tol=1e-15):
        changes = super().check_state(atoms, tol)
        # ASE compares positions, numbers, cell and pbc only: a new total charge or spin in
        # atoms.info must not return the cached results of the old one.
        if not changes and self.atoms is not None and self.results:
            if self.model.system_inputs(atoms) != self._system:
                changes = ["info"]
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with self._lock:
            self.results = {}
            if "stress" in properties and getattr(self.model, "direct_forces", False):
                raise PropertyNotImplementedError(
                    f"{type(self.model).__name__} predicts forces directly (not as the "
                    "energy's gradient), so it has no stress; do not ask for stress"
                )
            super().calculate(atoms, properties, system_changes)
            self._system = self.model.system_inputs(self.atoms)
            structure = Structure.from_ase(self.atoms, self._system)
            # Energy alone needs no backward pass; stress comes with forces (same gradients).
            wanted = {"forces", "stress"}.intersection(properties)
            results = self._compute(structure, forces=bool(wanted))
            if "stress" in properties and "stress" not in results:
                raise PropertyNotImplementedError(
                    "stress needs a cell with nonzero volume; set atoms.cell (e.g. atoms.center("
                    "vacuum=10)) or do not ask for stress"
                )
            self.results = results

    def __reduce_ex__(self, protocol):
        # copy.deepcopy(atoms) and pickle reach here: a copy cannot own the same workers.
        raise TypeError(
            "a DistributedCalculator owns worker processes and cannot be copied or pickled; "
            "copy the atoms with atoms.copy() (which leaves the calculator behind) and attach "
            "this calculator or a new one"
        )

    def __deepcopy__(self, memo):
        self.__reduce_ex__(4)

    def get_spin_polarized(self) -> bool:
        # Defined here so ASE's Calculator does not store a bound method on the instance: that
        # reference cycle kept dropped calculators (and their workers) alive until a gc run.
        return False

    def close(self) -> None:
        """Stop the worker processes (the calculator restarts them if used again)."""
        self.pool.close()

    def __enter__(self) -> DistributedCalculator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        pool = self.__dict__.get("pool")
        if pool is not None:
            pool.close()
