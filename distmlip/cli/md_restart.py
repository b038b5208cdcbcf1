"""What a ``distmlip md`` run records, so that ``--restart`` cannot change its science silently.

A run records its model (a name, or a model file's absolute path) with a content hash (the
file's bytes, or for a name the weights), its dtype, its skin (Å) and its MD settings
(ensemble, thermostat, temperature K, time step fs, friction 1/fs, damping times fs, pressure
GPa), in ``<trajectory>.state.json`` and in every frame's ``atoms.info``: a trajectory whose
state file is lost still knows them. ``--restart`` takes them over; an option given replaces
one, with a note; a model file that is gone or changed since is refused unless ``--model`` is
given; another ensemble or thermostat is refused (its integrator state would not apply).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import UsageError

__all__ = [
    "SETTING_DEFAULTS",
    "MODEL_DEFAULTS",
    "RECORD_KEYS",
    "RestartPoint",
    "read_restart",
    "md_settings",
    "choose_model",
    "fill_model_defaults",
    "model_hash",
    "check_weights",
    "run_record",
    "frame_record",
    "note_changes",
]

SETTING_DEFAULTS = {
    "ensemble": "nve",
    "thermostat": "langevin",
    "temperature": 300.0,
    "timestep": 1.0,
    "friction": 0.01,
    "tdamp": None,
    "pressure": 0.0,
    "pdamp": None,
}
"""The MD options' defaults for a new run; a restart takes the run's own instead."""

MODEL_DEFAULTS = {"model": "chgnet", "dtype": "float32", "skin": 1.0}
"""``--model``, ``--dtype`` and ``--skin`` (Å) of a new run; a restart takes the run's own."""

SETTING_FIELDS = {
    "ensemble": "ensemble",
    "thermostat": "thermostat",
    "temperature": "temperature_K",
    "timestep": "timestep_fs",
    "friction": "friction_per_fs",
    "tdamp": "tdamp_fs",
    "pressure": "pressure_GPa",
    "pdamp": "pdamp_fs",
}
"""Option name → MDSettings field (the seed is not recorded: it only starts a run)."""

RUN_KEYS = ("model", "model_hash", "dtype", "skin")
RECORD_KEYS = (*RUN_KEYS, *SETTING_FIELDS.values())
"""The ``atoms.info`` keys every frame records the run by."""


@dataclass
class RestartPoint:
    """Where a restart continues: the last complete frame of ``path`` and what it records.

    Attributes:
        frame: positions, momenta, cell (Å, ASE units) of the last complete frame.
        frames: complete frames in ``path``; step: its step; time_fs: its time, fs (nan if
            not recorded).
        state: the integrator state saved for ``step``, or None (state file lost or stale).
        settings: MDSettings fields of the run (from the state file, else the frames), or None.
        run: ``model``, ``model_hash``, ``dtype``, ``skin`` of the run, or None.
    """

    path: Path
    frame: object
    frames: int
    step: int
    time_fs: float
    state: dict | None
    settings: dict | None
    run: dict | None


def read_restart(path: Path, appending: bool) -> RestartPoint:
    """The last complete frame of ``path`` and the run it records (``appending``: cut a torn
    final frame off the file, which is then appended to)."""
    from distmlip.md.trajectory import last_frame, load_state, state_at

    size = path.stat().st_size
    frame, frames = last_frame(path, repair=appending)
    if "step" not in frame.info:
        raise ValueError(
            f"{str(path)!r} has no step numbers (not a distmlip md trajectory); to start "
            "from its last frame's positions and momenta, give it as STRUCTURE with "
            "--keep-velocities"
        )
    if path.stat().st_size != size:
        print(f"distmlip: note: dropped a torn final frame of {path}", file=sys.stderr)
    step = int(frame.info["step"])
    state = state_at(path, step)
    info = {key: _plain(frame.info[key]) for key in RECORD_KEYS if key in frame.info}
    disagree = _disagreements(state, info)
    if disagree:
        print(
            f"distmlip: warning: the integrator state beside {path} is not this run's "
            f"({'; '.join(disagree)}): not used",
            file=sys.stderr,
        )
        state = None
    stale = load_state(path) or {}
    # The state for this very step, else the frame's own record, else a stale state file.
    settings = (state or {}).get("settings") or _fields(info) or stale.get("settings")
    run = (state or {}).get("run") or ({k: info[k] for k in RUN_KEYS if k in info} or None)
    time_fs = float(frame.info.get("time_fs", np.nan))
    for key in RECORD_KEYS:
        frame.info.pop(key, None)  # the continued run writes its own record
    return RestartPoint(path, frame, frames, step, time_fs, state, settings, run)


def _disagreements(state: dict | None, info: dict) -> list[str]:
    """Where a state file (matched to the frame by its step alone) differs from what the
    frames record of their run: ``KEY X in the state file, Y in the frames``."""
    if state is None:
        return []
    recorded = {**(state.get("settings") or {}), **(state.get("run") or {})}
    differ = []
    for key, theirs in info.items():
        if key not in recorded or key == "model":  # a model path may be written relative
            continue
        ours = recorded[key]
        both_numbers = isinstance(ours, int | float) and isinstance(theirs, int | float)
        same = np.isclose(ours, theirs, rtol=1e-12, atol=0) if both_numbers else ours == theirs
        if not same:
            differ.append(f"{key} {ours} in the state file, {theirs} in the frames")
    return differ


def _plain(value):
    """numpy scalars from an extended XYZ comment line as JSON-able Python values."""
    return value.item() if isinstance(value, np.generic) else value


def _fields(info: dict) -> dict:
    from distmlip.md.dynamics import MDSettings

    names = {field.name for field in fields(MDSettings)}
    return {key: value for key, value in info.items() if key in names}


def md_settings(args, saved: dict | None):
    """(MDSettings from the options given, else the run's, else the defaults; the changes).

    Raises:
        UsageError: a bad value, or another ensemble or thermostat than the run continued.
    """
    from distmlip.md.dynamics import MDSettings

    values, changed = {}, []
    for option, field in SETTING_FIELDS.items():
        given = getattr(args, option)
        if given is not None:
            values[field] = given
            if saved and field in saved and saved[field] != given:
                changed.append(f"--{option} {given} (the run had {saved[field]})")
        elif saved and field in saved:
            values[field] = saved[field]
        else:
            values[field] = SETTING_DEFAULTS[option]
    try:
        settings = MDSettings(seed=args.seed, **values)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if saved and "ensemble" in saved:
        run = _integrator(saved["ensemble"], saved.get("thermostat", "langevin"))
        now = _integrator(settings.ensemble, settings.thermostat)
        if run != now:
            raise UsageError(
                f"the run continued is {_INTEGRATORS[run]}, not {_INTEGRATORS[now]}: a restart "
                "keeps its ensemble and thermostat (their state would not carry over); to "
                "switch, start a new trajectory: give its last frame as STRUCTURE with "
                "--keep-velocities"
            )
    return settings, changed


_INTEGRATORS = {
    ("nve", ""): "NVE",
    ("nvt", "langevin"): "NVT with Langevin",
    ("nvt", "nose-hoover"): "NVT with a Nosé–Hoover chain",
    ("npt", ""): "NPT (MTK)",
}


def _integrator(ensemble: str, thermostat: str) -> tuple[str, str]:
    return ensemble, thermostat if ensemble == "nvt" else ""


def _is_file(model: str) -> bool:
    from distmlip.models import model_names

    return model.lower() not in model_names()


def model_hash(model: str) -> str | None:
    """``sha256:…`` of a model file's bytes (a directory: of its files' names and bytes);
    None for a model name (its weights are hashed once loaded, :func:`check_weights`)."""
    if not _is_file(model):
        return None
    path = Path(model).expanduser()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:  # a large model file is read once per command, not at each check
        _HASHES[key] = _content_hash(path)
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file != path:  # a directory's files: their names count too
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def choose_model(args, point: RestartPoint | None) -> list[str]:
    """Set ``args.model``, ``args.dtype``, ``args.skin``: the options given, else the restarted
    run's, else the defaults; returns the changes against the run (for the note).

    Raises:
        UsageError: the run's model file is gone or changed since and no ``--model`` is given,
            or the trajectory records no model and no ``--model`` is given.
    """
    run = point.run if point is not None else None
    if point is not None and args.model is None and not (run and "model" in run):
        raise UsageError(
            f"{point.path} does not record its model (written by an older distmlip?): give "
            "--model (and --dtype, --skin) as the run had"
        )
    changed: list[str] = []
    if run and "model" in run:
        recorded, before = str(run["model"]), run.get("model_hash")
        if args.model is None:
            args.model = recorded
            if _is_file(recorded):
                _check_model_file(recorded, before)
        else:
            now = model_hash(args.model)
            same_name = not _is_file(args.model) and args.model == recorded
            if (
                now is not None
                and now != before
                and Path(args.model).expanduser().resolve() == Path(recorded)
            ):
                changed.append(
                    f"--model {args.model} (changed since the run: {now}, it had {before})"
                )
            elif not (same_name or (now is not None and now == before)):
                changed.append(f"--model {args.model} (the run had {recorded})")
    for option in ("dtype", "skin"):
        given = getattr(args, option)
        if given is None:
            value = (run or {}).get(option, MODEL_DEFAULTS[option])
            setattr(args, option, float(value) if option == "skin" else str(value))
        elif run and option in run and run[option] != given:
            changed.append(f"--{option} {given} (the run had {run[option]})")
    fill_model_defaults(args)
    return changed


def _check_model_file(path: str, recorded_hash: str | None) -> None:
    if not Path(path).exists():
        raise UsageError(
            f"the run's model file {path!r} is gone; give --model to continue with another "
            "(the run had " + (recorded_hash or "no hash") + ")"
        )
    now = model_hash(path)
    if recorded_hash is not None and now != recorded_hash:
        raise UsageError(
            f"the run's model file {path!r} has changed since ({now}, the run had "
            f"{recorded_hash}); give --model {path} to continue with it as it is now"
        )


def fill_model_defaults(args) -> None:
    """``--model``, ``--dtype``, ``--skin`` not given and not taken from a run: the defaults
    (a command without one of these options is left without it)."""
    for option, value in MODEL_DEFAULTS.items():
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, value)


def check_weights(args, calc, point: RestartPoint | None, given: bool) -> str:
    """The hash of a named model's weights (``weights:…``), checked against the run's.

    A file's hash is taken from its bytes (:func:`model_hash`); a name's weights come with
    its package, which may have been upgraded since the run.

    Raises:
        UsageError: the weights differ from the run's and ``--model`` was not given.
    """
    from distmlip.cluster.launch import identity

    own = model_hash(args.model)
    if own is not None:
        return own
    now = "weights:" + identity(calc.model)["weights"]
    run = point.run if point is not None else None
    before = (run or {}).get("model_hash")
    if run and run.get("model") == args.model and before is not None and before != now:
        if not given:
            raise UsageError(
                f"the weights of {args.model} are not the run's ({now}, the run had {before}: "
                f"another package version?); give --model {args.model} to continue with them"
            )
        note_changes([f"the weights of {args.model} ({now}, the run had {before})"])
    return now


def run_record(args, content_hash: str) -> dict:
    """What the state file and every frame record of the model: ``model`` (a name, or the
    file's absolute path, so a restart from another directory finds it), ``model_hash``,
    ``dtype``, ``skin`` (Å)."""
    model = str(Path(args.model).expanduser().resolve()) if _is_file(args.model) else args.model
    return {"model": model, "model_hash": content_hash, "dtype": args.dtype, "skin": args.skin}


def frame_record(settings, run: dict) -> dict:
    """The ``atoms.info`` entries of every frame: ``run`` and the MD settings (not the seed,
    which only starts a run; unset damping times are left out, extended XYZ has no None)."""
    record = {field: getattr(settings, field) for field in SETTING_FIELDS.values()}
    return {**{k: v for k, v in record.items() if v is not None}, **run}


def note_changes(changed: list[str]) -> None:
    """One line naming what a restart changed."""
    if changed:
        print("distmlip: note: changed on restart: " + ", ".join(changed), file=sys.stderr)
