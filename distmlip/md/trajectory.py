"""MD output that an interruption cannot corrupt: trajectory frames, the thermo log, the restart
state.

* :class:`FrameWriter` writes extended XYZ (``.xyz``/``.extxyz``) or ASE trajectories
  (``.traj``); each frame holds positions, momenta, cell, pbc, energy, forces, stress (periodic
  cells) and any asked-for per-atom outputs, with ``step`` and ``time_fs`` in ``atoms.info``.
  A frame is written in one piece and flushed to disk before the next step starts.
* :func:`last_frame` reads the last complete frame of a trajectory, dropping a torn final frame
  (a process killed mid-write) so the file can be appended to.
* :class:`ThermoLog` writes whitespace-separated columns with a ``#`` header
  (``numpy.loadtxt`` reads it).
* :func:`save_state` / :func:`load_state` keep the integrator state of the last frame (and of
  the one before, :func:`state_at`) in ``<trajectory>.state.json``, replaced atomically.
* :func:`interrupts_deferred` holds Ctrl-C until a frame and its state are both written.

A write that fails (a full disk) raises :class:`OutputError` naming the file, and leaves no
part of what it was writing: a frame or a log row is cut back off the file, a temporary file
is removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np

from distmlip.md.durable import OutputError, append_durably, open_appending, replace_durably

__all__ = [
    "FrameWriter",
    "OutputError",
    "last_frame",
    "ThermoLog",
    "THERMO_COLUMNS",
    "state_path",
    "is_thermo_log",
    "truncate_log",
    "save_state",
    "load_state",
    "state_at",
    "interrupts_deferred",
    "trajectory_format",
]

EXTXYZ_SUFFIXES = (".xyz", ".extxyz")


def trajectory_format(path: Path) -> str:
    """``"extxyz"`` or ``"traj"`` from the file name; ValueError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in EXTXYZ_SUFFIXES:
        return "extxyz"
    if suffix == ".traj":
        return "traj"
    raise ValueError(
        f"trajectory {str(path)!r}: name it .extxyz, .xyz (extended XYZ) or .traj (ASE)"
    )


def _frame(atoms, results: dict, step: int, time_fs: float, extras: tuple[str, ...], info: dict):
    """A copy of ``atoms`` carrying ``results`` (energy, forces, stress, extras), the step and
    ``info``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()  # positions, momenta, cell, pbc, numbers; not the calculator
    frame.info = {key: value for key, value in atoms.info.items() if _plain_info(value)}
    frame.info.update(info)
    frame.info.update(step=int(step), time_fs=float(time_fs))
    stored = {name: results[name] for name in ("energy", "forces", "stress") if name in results}
    stored.update({name: results[name] for name in extras if name in results})
    frame.calc = SinglePointCalculator(frame, **stored)
    return frame


def _plain_info(value) -> bool:
    return isinstance(value, int | float | str | bool) and not isinstance(value, np.ndarray)


class FrameWriter:
    """Appends frames to ``path``; ``append=False`` starts the file anew. The file is opened at
    the first frame, so a run that fails before its first frame leaves no empty file behind.
    ``info`` goes into every frame's ``atoms.info`` (the run's record)."""

    def __init__(
        self, path, append: bool = False, extras: tuple[str, ...] = (), info: dict | None = None
    ):
        self.path = Path(path)
        self.format = trajectory_format(self.path)
        self.extras = tuple(extras)
        self.info = dict(info or {})
        self.frames = 0
        self._append = append
        self._trajectory = self._fd = None
        self._broken = False

    def _open(self) -> None:
        if self.format == "traj":
            from ase.io.trajectory import Trajectory

            try:
                self._trajectory = Trajectory(str(self.path), "a" if self._append else "w")
            except OSError as error:
                raise OutputError.of(error, self.path) from error
        else:
            self._fd = open_appending(self.path, self._append)

    def write(self, atoms, results: dict, step: int, time_fs: float) -> None:
        """One complete frame, on disk when this returns.

        Raises:
            OutputError: the frame could not be written (an extended XYZ file is cut back to
                its previous frames; an ASE trajectory counts a frame only once complete).
        """
        frame = _frame(atoms, results, step, time_fs, self.extras, self.info)
        if self._trajectory is None and self._fd is None:
            self._open()
        if self.format == "traj":
            try:
                self._trajectory.write(frame)  # ULM: the frame counts only once it is complete
                self._trajectory.backend.fd.flush()
                os.fsync(self._trajectory.backend.fd.fileno())
            except OSError as error:
                self._broken = True  # its buffer may hold the rest: never flushed again
                raise OutputError.of(error, self.path) from error
        else:
            from ase.io import write

            text = io.StringIO()
            write(text, frame, format="extxyz")
            append_durably(self._fd, text.getvalue().encode(), self.path)
        self.frames += 1

    def close(self) -> None:
        if self._trajectory is not None:
            with contextlib.suppress(OSError) if self._broken else contextlib.nullcontext():
                self._trajectory.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FrameWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def last_frame(path, repair: bool = False) -> tuple[object, int]:
    """The last complete frame of trajectory ``path`` and how many complete frames it holds.

    A final frame torn by a kill (an extended XYZ file that ends inside a frame, or without its
    last newline) is not counted; with ``repair`` the file is truncated after the last complete
    frame, so appending to it leaves a readable file. A damaged frame anywhere else is an error,
    and nothing is changed. ASE trajectories count a frame only once it is complete.

    Raises:
        ValueError: no complete frame, or a damaged frame before the last.
    """
    path = Path(path)
    if trajectory_format(path) == "traj":
        return _last_traj_frame(path, repair)
    data = path.read_bytes()
    starts, end = _extxyz_frames(data, path)
    if not starts:
        raise ValueError(f"no complete frame in {str(path)!r} to restart from")
    if repair and end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    from ase.io import read

    text = data[starts[-1] : end].decode()
    try:
        frame = read(io.StringIO(text), format="extxyz")
    except Exception as error:
        raise ValueError(f"frame {len(starts)} of {str(path)!r} cannot be read: {error}") from None
    return frame, len(starts)


def _last_traj_frame(path: Path, repair: bool) -> tuple[object, int]:
    """ASE trajectories: the last frame that reads; with ``repair``, a copy without the torn
    ones replaces the file (a ULM file cannot be cut back in place)."""
    from ase.io.trajectory import Trajectory

    try:
        frames = Trajectory(str(path))
    except Exception as error:
        raise ValueError(f"{str(path)!r} is not a readable ASE trajectory ({error})") from None
    with frames:
        count, frame = len(frames), None
        while count > 0 and frame is None:
            try:
                frame = frames[count - 1]
            except Exception:  # torn by a kill or a full disk
                count -= 1
        if frame is None:
            raise ValueError(f"no complete frame in {str(path)!r} to restart from")
        if repair and count < len(frames):
            temporary = path.with_name(path.name + ".repair")
            try:
                with Trajectory(str(temporary), "w") as copy:
                    for index in range(count):
                        copy.write(frames[index])
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)  # a full disk: no half copy left behind
    return frame, count


def _extxyz_frames(data: bytes, path: Path) -> tuple[list[int], int]:
    """Byte offsets of the complete frames' starts, and the end of the last complete frame."""
    lines = data.splitlines(keepends=True)
    offsets = np.concatenate([[0], np.cumsum([len(line) for line in lines])])
    starts, index = [], 0
    while index < len(lines):
        header = lines[index]
        try:
            n_atoms = int(header.strip())
        except ValueError:
            if index + 1 >= len(lines) or not header.endswith(b"\n"):
                break  # the torn start of a last frame
            raise ValueError(
                f"{str(path)!r}: frame {len(starts) + 1} is damaged (line {index + 1} should "
                "be an atom count); nothing was changed"
            ) from None
        last = index + n_atoms + 2  # header, comment, atoms
        if last > len(lines) or not lines[last - 1].endswith(b"\n"):
            break  # the last frame, torn
        starts.append(int(offsets[index]))
        index = last
    return starts, int(offsets[index])


THERMO_COLUMNS = (
    "step",
    "time_fs",
    "epot_eV",
    "ekin_eV",
    "etotal_eV",
    "temperature_K",
    "pressure_GPa",
    "volume_A3",
    "seconds_per_step",
    "graph_builds",
    "imbalance",
)
"""The thermo log's columns. ``pressure_GPa`` includes the kinetic (ideal-gas) part and is nan
for a cell without volume; ``seconds_per_step`` is the wall time of the steps since the last row;
``graph_builds`` counts neighbour-list builds so far; ``imbalance`` is the largest worker's edge
count over the mean (1 = perfectly balanced)."""


class ThermoLog:
    """The thermo log at ``path``: a header, then one row per :meth:`write`."""

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        self._append = append
        self._fd = None

    def write(self, **values) -> None:
        """One row (with the header first in a new file), on disk when this returns.

        Raises:
            OutputError: the row could not be written (the file is cut back to its rows).
        """
        header = ""
        if self._fd is None:  # opened at the first row, like the trajectory
            if not (self._append and self.path.exists() and self.path.stat().st_size > 0):
                header = "# " + " ".join(THERMO_COLUMNS) + "\n"
            self._fd = open_appending(self.path, self._append)
        cells = []
        for name in THERMO_COLUMNS:
            value = values[name]
            if isinstance(value, int | np.integer):
                cells.append(str(int(value)))
            else:
                cells.append("nan" if not math.isfinite(value) else f"{value:.10g}")
        append_durably(self._fd, (header + " ".join(cells) + "\n").encode(), self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ThermoLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_thermo_log(path) -> bool:
    """Whether ``path`` starts with the thermo log's header (a file safe to replace)."""
    try:
        with open(path) as handle:
            return handle.readline().split()[1:3] == list(THERMO_COLUMNS[:2])
    except (OSError, UnicodeDecodeError, IndexError):
        return False


def truncate_log(path, step: int) -> None:
    """Drop the rows after ``step`` (a restart continues from that step's frame)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.startswith("#") or _row_step(line) <= step]
    if len(kept) != len(lines):
        replace_durably(path, "".join(kept).encode())


def _row_step(line: str) -> float:
    try:
        return float(line.split()[0])
    except (IndexError, ValueError):
        return math.inf  # a torn row


def state_path(trajectory) -> Path:
    """Where the restart state of ``trajectory``'s last frame lives."""
    trajectory = Path(trajectory)
    return trajectory.with_name(trajectory.name + ".state.json")


def save_state(trajectory, state: dict) -> None:
    """Replace the restart state atomically (a reader sees the old or the new, never half).

    ``state["previous"]``, if given, is the state of the frame before: written before a frame
    (a frame that then fails to be written leaves the state of the last one that was).

    Raises:
        OutputError: the old state stays, and no temporary file.
    """
    replace_durably(state_path(trajectory), json.dumps(state).encode())


def load_state(trajectory) -> dict | None:
    """The saved restart state, or None if there is none (or it cannot be read)."""
    try:
        return json.loads(state_path(trajectory).read_text())
    except (OSError, ValueError):
        return None


def state_at(trajectory, step: int) -> dict | None:
    """The saved restart state of ``step`` (the latest, or the one before it), or None."""
    state = load_state(trajectory)
    if not isinstance(state, dict):
        return None
    for candidate in (state, state.get("previous")):
        if isinstance(candidate, dict) and candidate.get("step") == step:
            return {key: value for key, value in candidate.items() if key != "previous"}
    return None


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) and SIGTERM inside the block are held, then delivered at its end to the
    handlers that were in place (an ignored signal stays ignored).

    Only in the main thread (elsewhere Python delivers no signals, and the block runs as is).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {n: signal.signal(n, lambda number, frame: received.append(number)) for n in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    for number in dict.fromkeys(received):
        handler = previous[number]
        if callable(handler):
            handler(number, None)
        elif handler == signal.SIG_DFL and number == signal.SIGINT:
            raise KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            signal.raise_signal(number)  # the default action (SIGTERM: the process ends)
