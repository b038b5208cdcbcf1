"""Molecular dynamics ensembles on ASE's integrators, with their state saved for restarts.

* ``nve``: velocity Verlet (``ase.md.verlet.VelocityVerlet``).
* ``nvt``: Langevin (``ase.md.langevin.Langevin``, its random stream seeded) or a Nosé–Hoover
  chain (``ase.md.nose_hoover_chain.NoseHooverChainNVT``).
* ``npt``: Martyna–Tobias–Klein (``ase.md.nose_hoover_chain.MTKNPT``): Nosé–Hoover chains on
  the particles and on all nine cell degrees of freedom, so anisotropic and triclinic cells
  fluctuate, driven by the model's stress.

:func:`dynamics_state` and :func:`restore_dynamics_state` carry what a restart needs beyond
positions, momenta and cell (the thermostat and barostat variables, the Langevin random
stream), so a restarted run continues the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ENSEMBLES",
    "THERMOSTATS",
    "MDSettings",
    "make_dynamics",
    "initial_velocities",
    "maxwell_boltzmann",
    "dynamics_state",
    "restore_dynamics_state",
]

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "nose-hoover")


@dataclass(frozen=True)
class MDSettings:
    """What defines an MD run, in the units people use.

    Attributes:
        ensemble: ``"nve"``, ``"nvt"`` or ``"npt"``.
        timestep_fs: integration time step, fs.
        temperature_K: initial velocities' temperature and the thermostat's target, K.
        thermostat: for ``nvt``: ``"langevin"`` or ``"nose-hoover"``.
        friction_per_fs: Langevin friction, 1/fs (0.01: a 100 fs relaxation time).
        tdamp_fs: Nosé–Hoover (and MTK) thermostat time, fs; default 100 time steps.
        pressure_GPa: ``npt``'s external pressure, GPa.
        pdamp_fs: MTK barostat time, fs; default 1000 time steps.
        seed: seed of the initial velocities and of the Langevin random stream.
    """

    ensemble: str = "nve"
    timestep_fs: float = 1.0
    temperature_K: float = 300.0
    thermostat: str = "langevin"
    friction_per_fs: float = 0.01
    tdamp_fs: float | None = None
    pressure_GPa: float = 0.0
    pdamp_fs: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.thermostat not in THERMOSTATS:
            raise ValueError(f"thermostat must be one of {THERMOSTATS}, got {self.thermostat!r}")
        for name in ("timestep_fs", "friction_per_fs", "tdamp_fs", "pdamp_fs"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not np.isfinite(self.pressure_GPa):
            raise ValueError(f"pressure_GPa must be a finite number, got {self.pressure_GPa!r}")
        if not (np.isfinite(self.temperature_K) and self.temperature_K >= 0):
            raise ValueError(f"temperature_K must be >= 0, got {self.temperature_K!r}")
        if self.ensemble != "nve" and self.temperature_K == 0:
            raise ValueError(f"{self.ensemble} needs a temperature above 0 K")

    @property
    def tdamp(self) -> float:
        return self.tdamp_fs if self.tdamp_fs is not None else 100 * self.timestep_fs

    @property
    def pdamp(self) -> float:
        return self.pdamp_fs if self.pdamp_fs is not None else 1000 * self.timestep_fs

    def describe(self) -> str:
        """One line: the integrator and its parameters."""
        if self.ensemble == "nve":
            return "NVE, velocity Verlet"
        if self.ensemble == "nvt" and self.thermostat == "langevin":
            return f"NVT, Langevin, {self.temperature_K:g} K, friction {self.friction_per_fs:g}/fs"
        if self.ensemble == "nvt":
            return f"NVT, Nosé–Hoover chain, {self.temperature_K:g} K, tdamp {self.tdamp:g} fs"
        return (
            f"NPT, MTK (full cell), {self.temperature_K:g} K, {self.pressure_GPa:g} GPa, "
            f"tdamp {self.tdamp:g} fs, pdamp {self.pdamp:g} fs"
        )


def initial_velocities(atoms, temperature_K: float, seed: int) -> None:
    """Maxwell–Boltzmann momenta at ``temperature_K`` from ``seed``, no centre-of-mass drift,
    rescaled to exactly that temperature."""
    from ase.md.velocitydistribution import Stationary

    if temperature_K == 0 or len(atoms) < 2:
        atoms.set_momenta(np.zeros((len(atoms), 3)))
        return
    maxwell_boltzmann(atoms, temperature_K, np.random.default_rng(seed))
    Stationary(atoms)
    atoms.set_momenta(atoms.get_momenta() * np.sqrt(temperature_K / atoms.get_temperature()))


def maxwell_boltzmann(atoms, temperature_K: float, rng, exact: bool = False) -> None:
    """ASE's Maxwell–Boltzmann momenta (``exact``: rescaled to exactly ``temperature_K``).

    ASE 3.29 renamed ``MaxwellBoltzmannDistribution`` to ``thermalize_momenta`` (the same
    draws); older releases have only the old name."""
    from ase.md import velocitydistribution

    if hasattr(velocitydistribution, "thermalize_momenta"):
        velocitydistribution.thermalize_momenta(
            atoms, temperature_K=temperature_K, rng=rng, exact_temperature=exact
        )
    else:
        velocitydistribution.MaxwellBoltzmannDistribution(
            atoms, temperature_K=temperature_K, rng=rng, force_temp=exact
        )


def make_dynamics(atoms, settings: MDSettings):
    """The ASE integrator for ``settings`` on ``atoms`` (which carry their calculator)."""
    from ase import units

    dt = settings.timestep_fs * units.fs
    if settings.ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if settings.ensemble == "nvt" and settings.thermostat == "langevin":
        from ase.md.langevin import Langevin

        return Langevin(
            atoms,
            timestep=dt,
            temperature_K=settings.temperature_K,
            friction=settings.friction_per_fs / units.fs,
            fixcm=False,
            rng=np.random.default_rng(settings.seed),
        )
    if settings.ensemble == "nvt":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        return NoseHooverChainNVT(
            atoms,
            timestep=dt,
            temperature_K=settings.temperature_K,
            tdamp=settings.tdamp * units.fs,
        )
    if not (np.all(atoms.pbc) and atoms.cell.volume > 0):
        raise ValueError("npt needs a periodic cell in all three directions (pbc True, volume > 0)")
    from ase.md.nose_hoover_chain import MTKNPT

    return MTKNPT(
        atoms,
        timestep=dt,
        temperature_K=settings.temperature_K,
        pressure_au=settings.pressure_GPa * units.GPa,
        tdamp=settings.tdamp * units.fs,
        pdamp=settings.pdamp * units.fs,
    )


_STATE_ARRAYS = {
    "NoseHooverChainNVT": ("_thermostat._eta", "_thermostat._p_eta"),
    "MTKNPT": (
        "_thermostat._eta",
        "_thermostat._p_eta",
        "_barostat._xi",
        "_barostat._p_xi",
        "_p_g",
    ),
}
"""The integrator variables beyond positions, momenta and cell (ASE 3.23+ attribute paths)."""


def _resolve(dynamics, path: str):
    owner_path, _, name = path.rpartition(".")
    owner = dynamics
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    return owner, name


def dynamics_state(dynamics) -> dict:
    """JSON-serialisable state of the integrator: its class, its variables, its random stream."""
    kind = type(dynamics).__name__
    state: dict = {"integrator": kind, "arrays": {}}
    for path in _STATE_ARRAYS.get(kind, ()):
        owner, name = _resolve(dynamics, path)
        state["arrays"][path] = np.asarray(getattr(owner, name)).tolist()
    rng = getattr(dynamics, "rng", None)
    if rng is not None and hasattr(rng, "bit_generator"):
        state["rng"] = rng.bit_generator.state
    return state


def restore_dynamics_state(dynamics, state: dict) -> None:
    """Put back what :func:`dynamics_state` saved (the same integrator class is required)."""
    kind = type(dynamics).__name__
    if state.get("integrator") != kind:
        raise ValueError(
            f"the restart state is of a {state.get('integrator')} run, this run is {kind}; "
            "use the same --ensemble and --thermostat as the run you continue"
        )
    for path, value in state.get("arrays", {}).items():
        owner, name = _resolve(dynamics, path)
        current = getattr(owner, name)
        restored = np.asarray(value, dtype=float)
        if np.shape(current) != restored.shape:
            raise ValueError(
                f"restart state {path} has shape {restored.shape}, expected "
                f"{np.shape(current)} (a different --tchain or cell mask?)"
            )
        setattr(owner, name, restored if np.ndim(current) else float(restored))
    if "rng" in state:
        dynamics.rng.bit_generator.state = state["rng"]
