"""ASE calculator that evaluates a model across P worker processes."""

from __future__ import annotations

import difflib
import inspect
import numbers
import threading
import time
from dataclasses import dataclass

import numpy as np
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from distmlip.graph import Structure
from distmlip.launch import WorkerPool
from distmlip.models import resolve_model
from distmlip.options import WorkerOptions
from distmlip.partition import check_partitioner, partition
from distmlip.validate import validate_structure

__all__ = ["DistributedCalculator", "assemble"]

HALO_MODES = ("exchange", "ghost")
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
        virial = sum(result.virial for result in results)
        if volume > 0:
            stress = 0.5 * (virial + virial.T) / volume
            properties["stress"] = full_3x3_to_voigt_6_stress(stress)
    return properties


@dataclass(frozen=True)
class _BuiltGraph:
    """What the workers' cached graphs were built for (Verlet-skin reuse)."""

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray
    owner: np.ndarray
    generation: int

    @classmethod
    def of(cls, structure: Structure, owner: np.ndarray, generation: int) -> _BuiltGraph:
        return cls(
            structure.positions.copy(),
            structure.cell.copy(),
            structure.pbc.copy(),
            structure.numbers.copy(),
            owner,
            generation,
        )

    def still_holds(self, structure: Structure, skin: float, pool: WorkerPool) -> bool:
        """True if every edge shorter than the cutoff is still in the graphs built with skin.

        Raw displacements, not minimum-image ones: an atom wrapped back into the cell changes
        the image shifts of its edges, so it must trigger a rebuild.
        """
        if not (pool.running and pool.generation == self.generation):
            return False
        if structure.positions.shape != self.positions.shape:
            return False
        if not (
            np.array_equal(structure.cell, self.cell)
            and np.array_equal(structure.pbc, self.pbc)
            and np.array_equal(structure.numbers, self.numbers)
        ):
            return False
        displacement = structure.positions - self.positions
        largest = np.sqrt(np.einsum("ij,ij->i", displacement, displacement).max())
        # Two atoms approach by at most twice the largest displacement.
        return bool(2.0 * largest < skin)


class DistributedCalculator(Calculator):
    """Evaluate ``model`` with its atom graph partitioned over ``nprocs`` workers.

    Args:
        model: a :class:`~distmlip.models.base.DistributedModel` or a model name
            (``"reference"``).
        nprocs: number of worker processes P (1 runs the same code without communication).
        partitioner: ``"slab"``, ``"rcb"`` or ``"metis"``.
        device: ``"cpu"`` or ``"cuda"`` (one GPU per worker).
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
            it. ``graph_builds`` and ``graph_reuses`` count what happened. Exchange mode only.
        allocator: ``"keep"`` (default): workers keep freed memory mapped, so repeated calls
            (MD) do not pay page faults again (faster steps, up to ~40 % higher peak memory for
            cheap models); ``"system"``: the C library's defaults (lowest peak memory).

    Properties: ``energy``, ``free_energy``, ``energies`` (eV), ``forces`` (eV/Å) and ``stress``
    (eV/Å³, Voigt xx yy zz yz xz xy; needs a cell of nonzero volume). A call computes what it
    is asked for (energy alone: no backward pass); :meth:`get_properties` gets several from
    one evaluation. Options after ``model`` are keyword-only; the settings are read-only. After
    each call ``last_timings`` (seconds per phase; ``communication`` is the part of forward,
    backward and forces spent waiting on exchanges), ``last_stats`` (sizes, bytes, peak RSS) and
    ``last_exchanges`` (one entry per exchange) and ``last_forward_segments`` (forward compute
    between exchanges: per layer for models with one exchange per layer) hold per-worker
    records.

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
        nprocs: int = 2,
        partitioner: str = "slab",
        device: str = "cpu",
        dtype: str = "float64",
        timeout: float = 600.0,
        threads_per_worker: int | None = None,
        halo: str = "exchange",
        skin: float = 0.0,
        allocator: str = "keep",
        **kwargs,
    ):
        # Every option is checked before the model loads or a worker starts.
        options = WorkerOptions(
            nprocs=nprocs,
            device=device,
            dtype=dtype,
            timeout=timeout,
            threads_per_worker=threads_per_worker,
            allocator=allocator,
        )
        check_partitioner(partitioner)
        if halo not in HALO_MODES:
            raise ValueError(f"halo must be one of {HALO_MODES}, got {halo!r}")
        if (
            isinstance(skin, bool)
            or not isinstance(skin, numbers.Real)
            or not np.isfinite(skin)
            or skin < 0
        ):
            raise ValueError(f"skin must be a finite number of Å >= 0, got {skin!r}")
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
        if halo == "ghost" and not self.model.num_layers:
            raise ValueError(
                f"halo='ghost' needs the model's number of message-passing layers, which "
                f"{type(self.model).__name__} does not declare; use halo='exchange'"
            )
        self._halo = halo
        self._skin = float(skin) if halo == "exchange" else 0.0
        max_skin = self._model.max_skin or self._model.cutoff
        if self._skin > max_skin:
            raise ValueError(
                f"skin={skin} Å is more than {type(self._model).__name__} supports "
                f"({max_skin:g} Å); 0.5-1 Å suits MD at 1-2 fs"
            )
        self.graph_builds = 0
        self.graph_reuses = 0
        self._built_for: _BuiltGraph | None = None
        # Models may add per-atom outputs (CHGNet: "magmoms"); ASE only serves listed names.
        self.implemented_properties = list(type(self).implemented_properties) + [
            name
            for name in getattr(self.model, "site_properties", ())
            if name not in type(self).implemented_properties
        ]
        self._partitioner = partitioner
        self.pool = WorkerPool(self.model, options)
        self.last_timings: list[dict[str, float]] = []
        self.last_stats: list[dict[str, int]] = []
        self.last_exchanges: list[list[dict]] = []
        self.last_forward_segments: list[list[float]] = []
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
        return self._partitioner

    @property
    def halo(self) -> str:
        return self._halo

    @property
    def skin(self) -> float:
        return self._skin

    def compute(self, structure: Structure, forces: bool = True) -> dict:
        """Evaluate a :class:`~distmlip.graph.Structure`; returns the properties dictionary."""
        with self._lock:
            return self._compute(structure, forces)

    def _compute(self, structure: Structure, forces: bool) -> dict:
        # A failed or interrupted call must not leave the previous structure's records.
        self.last_timings, self.last_stats, self.last_exchanges = [], [], []
        self.last_forward_segments = []
        validate_structure(structure, self.nprocs, self.model)
        start = time.perf_counter()
        built, self._built_for = self._built_for, None  # a failed call leaves no cache behind
        reuse = built is not None and built.still_holds(structure, self.skin, self.pool)
        if reuse:
            owner = built.owner
        else:
            owner = partition(structure, self.nprocs, self.partitioner, self.model.cutoff)
        partition_time = time.perf_counter() - start
        results = self.pool.evaluate(
            structure, owner, compute_forces=forces, halo=self.halo, skin=self.skin, reuse=reuse
        )
        if reuse:
            self.graph_reuses += 1
            self._built_for = built
        else:
            self.graph_builds += 1
            if self.skin > 0:
                self._built_for = _BuiltGraph.of(structure, owner, self.pool.generation)
        self.last_timings = [{"partition": partition_time, **r.timings} for r in results]
        self.last_stats = [r.stats for r in results]
        self.last_exchanges = [r.exchanges for r in results]
        self.last_forward_segments = [r.forward_segments for r in results]
        return assemble(results, structure.n_atoms, structure.volume)

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

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with self._lock:
            self.results = {}
            super().calculate(atoms, properties, system_changes)
            structure = Structure.from_ase(self.atoms)
            # Energy alone needs no backward pass; stress comes with forces (same gradients).
            wanted = {"forces", "stress"}.intersection(properties)
            results = self._compute(structure, forces=bool(wanted))
            if "stress" in properties and "stress" not in results:
                raise PropertyNotImplementedError(
                    "stress needs a cell with nonzero volume; set atoms.cell (e.g. atoms.center("
                    "vacuum=10)) or do not ask for stress"
                )
            self.results = results

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
