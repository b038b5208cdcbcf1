"""STRUCTURE, as ``predict``, ``md`` and ``relax`` take it: a file ASE reads, or a generator spec.

    distmlip md POSCAR ...                              # any format ASE reads
    distmlip md bulk:Al:fcc:4.05 --repeat 3 3 3 ...     # ase.build.bulk, repeated
    distmlip md bulk:Cu:fcc:3.61:cubic --repeat 4 4 4 --rattle 0.05 --seed 1 ...

A spec is ``bulk:SYMBOL:CRYSTAL[:A][:cubic|orthorhombic]``: ``ase.build.bulk(SYMBOL, CRYSTAL,
a=A)`` (A in Å; ASE's tabulated value when omitted), by default its primitive cell. ``--repeat NX
NY NZ`` repeats a file's frames or the generated cell; ``--rattle S`` then displaces every
coordinate by a Gaussian of standard deviation S Å, from ``--seed``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmlip.cli.arguments import (
    UsageError,
    frame_index,
    non_negative_float,
    positive_int,
    structure_file,
)

__all__ = [
    "BulkSpec",
    "structure_argument",
    "add_structure_arguments",
    "load_structures",
    "frame_numbers",
    "read_frames",
    "ReadError",
]

CRYSTAL_STRUCTURES = (
    "sc fcc bcc tetragonal bct hcp rhombohedral orthorhombic mcl diamond zincblende rocksalt "
    "cesiumchloride fluorite wurtzite"
).split()
"""The crystal structures ``ase.build.bulk`` builds."""

CELL_SHAPES = ("primitive", "cubic", "orthorhombic")


@dataclass(frozen=True)
class BulkSpec:
    """A crystal that ``ase.build.bulk`` generates: ``bulk:SYMBOL:CRYSTAL[:A][:SHAPE]``."""

    symbol: str
    crystal: str
    a: float | None = None
    shape: str = "primitive"

    def build(self):
        from ase.build import bulk

        return bulk(
            self.symbol,
            self.crystal,
            a=self.a,
            cubic=self.shape == "cubic",
            orthorhombic=self.shape == "orthorhombic",
        )

    def __str__(self) -> str:
        lattice = "" if self.a is None else f":{self.a:g}"
        shape = "" if self.shape == "primitive" else f":{self.shape}"
        return f"bulk:{self.symbol}:{self.crystal}{lattice}{shape}"


def _bulk_spec(text: str) -> BulkSpec:
    fields = text.split(":")[1:]
    usage = (
        "a generator spec is bulk:SYMBOL:CRYSTAL[:A][:cubic|orthorhombic], e.g. bulk:Al:fcc:4.05"
    )
    if len(fields) < 2 or len(fields) > 4 or not all(fields):
        raise argparse.ArgumentTypeError(f"{text!r}: {usage}")
    symbol, crystal, *rest = fields
    from ase.data import chemical_symbols
    from ase.symbols import string2symbols

    try:
        known = set(string2symbols(symbol)) <= set(chemical_symbols[1:])
    except ValueError:
        known = False
    if not known:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {symbol!r} is not a chemical symbol or formula (e.g. Cu, GaAs)"
        ) from None
    if crystal not in CRYSTAL_STRUCTURES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown crystal structure {crystal!r}; ase.build.bulk knows "
            + ", ".join(CRYSTAL_STRUCTURES)
        )
    a, shape = None, "primitive"
    for field in rest:
        if field in CELL_SHAPES:
            shape = field
            continue
        try:
            a = float(field)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {field!r} is neither a lattice constant (Å) nor a cell shape "
                f"({', '.join(CELL_SHAPES)})"
            ) from None
        if not 0 < a < 1e3:
            raise argparse.ArgumentTypeError(
                f"{text!r}: the lattice constant must be between 0 and 1000 Å"
            )
    spec = BulkSpec(symbol, crystal, a, shape)
    more = (
        f"{crystal} needs lattice parameters the spec cannot give (b, c, α); build it with "
        "ase.build.bulk and pass the file"
    )
    try:  # ASE's own checks: unknown elements, missing lattice constants, impossible shapes
        with np.errstate(all="ignore"):
            atoms = spec.build()
    except TypeError:  # a parameter ASE needs is None
        raise argparse.ArgumentTypeError(f"{text!r}: {more}") from None
    except Exception as error:
        reason = str(error).strip().splitlines()
        reason = reason[0] if reason else type(error).__name__
        raise argparse.ArgumentTypeError(f"{text!r}: ase.build.bulk says: {reason}") from None
    if not np.all(np.isfinite(atoms.cell[:])) or atoms.cell.volume <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: {more}")
    return spec


def seed(text: str) -> int:
    """A random seed numpy accepts: an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**32 - 1, got {text!r}")
    return value


MAX_ATOMS = 100_000_000
"""More atoms than any run here could hold: --repeat beyond it is a typo, refused at once."""


def structure_argument(text: str) -> Path | BulkSpec:
    """A generator spec (``bulk:...``) or an existing, non-empty structure file."""
    if text.startswith("bulk:"):
        return _bulk_spec(text)
    return structure_file(text)


def add_structure_arguments(parser, optional: bool = False, index_default: str = "all") -> None:
    """STRUCTURE (positional) with --index, --repeat, --rattle and --seed."""
    parser.add_argument(
        "structure",
        type=structure_argument,
        nargs="?" if optional else None,
        metavar="STRUCTURE",
        help="a file ASE reads, or bulk:SYMBOL:CRYSTAL[:A][:cubic|orthorhombic] "
        "(ase.build.bulk; e.g. bulk:Al:fcc:4.05)",
    )
    parser.add_argument(
        "--index",
        type=frame_index,
        help=f"frames of a STRUCTURE file, ASE syntax: 0, -1, 2:10, ':' (default: {index_default})",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        nargs=3,
        metavar=("NX", "NY", "NZ"),
        help="repeat the cell NX × NY × NZ times",
    )
    parser.add_argument(
        "--rattle",
        type=non_negative_float,
        default=0.0,
        help="Gaussian displacement of every coordinate, standard deviation in Å",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="random seed (rattle, and MD velocities)"
    )


def load_structures(args, default_index=slice(None)) -> tuple[list, str]:
    """The frames STRUCTURE names, repeated and rattled as asked, and a description.

    Raises:
        UsageError: --index with a generator spec.
        ReadError: a file that cannot be read as structures.
    """
    source = args.structure
    if isinstance(source, BulkSpec):
        if args.index is not None:
            raise UsageError("--index selects frames of a STRUCTURE file, not of a bulk: spec")
        frames, description = [source.build()], str(source)
    else:
        index = default_index if args.index is None else args.index
        frames, description = read_frames(source, index), str(source)
    if args.repeat:
        largest = max(len(atoms) for atoms in frames) * int(np.prod(args.repeat, dtype=float))
        if largest > MAX_ATOMS:
            raise UsageError(
                f"--repeat {' '.join(map(str, args.repeat))} makes {largest:.3g} atoms "
                f"(more than {MAX_ATOMS:,}); use smaller repeats"
            )
        frames = [atoms.repeat(tuple(args.repeat)) for atoms in frames]
        description += " × " + "×".join(map(str, args.repeat))
    if args.rattle > 0:
        for atoms in frames:
            atoms.rattle(stdev=args.rattle, seed=args.seed)
        description += f", rattled {args.rattle:g} Å"
    return frames, description


class ReadError(Exception):
    """A structure file that exists but cannot be read as structures."""


def read_frames(path, index) -> list:
    """The frames of ``path`` selected by ``index`` (ASE's syntax), as a list of Atoms."""
    from ase.io import read

    if isinstance(index, int) and index < 0:
        # ASE reads an index before the first frame as the first frame: count, and refuse.
        count = _count_frames(path)
        if -index > count:
            raise ReadError(f"{str(path)!r} has no frame at index {index} (it has {count} frames)")
        index += count
    try:
        frames = read(path, index=index)
    except (StopIteration, IndexError) as error:
        raise ReadError(f"{str(path)!r} has no frame at index {index}") from error
    except Exception as error:  # ASE raises many types for truncated or corrupt files
        text = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
        raise ReadError(f"cannot read structures from {str(path)!r} ({reason})") from error
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ReadError(f"cannot read structures from {str(path)!r} (no frames found)")
    return frames


def frame_numbers(path, index, selected: int) -> list[int]:
    """The file's own indices (0-based) of the ``selected`` frames that ``index`` (ASE's
    syntax: an int or a slice) picked from ``path``: ``7:9`` → 7, 8; ``-1`` → the last.

    Counts the file's frames only where the index counts from the end (negative start or stop,
    negative step); an extended XYZ file is counted by skipping lines, without parsing atoms.
    """
    if isinstance(index, int) and index >= 0:
        return [index]
    if isinstance(index, slice) and (index.step or 1) > 0 and (index.start or 0) >= 0:
        if index.stop is None or index.stop >= 0:
            start, step = index.start or 0, index.step or 1
            return [start + k * step for k in range(selected)]
    count = _count_frames(path)
    numbers = [count + index] if isinstance(index, int) else list(range(count)[index])
    if len(numbers) != selected:  # a file the fast count misread (e.g. VEC lines)
        count = _count_frames(path, fast=False)
        numbers = [count + index] if isinstance(index, int) else list(range(count)[index])
    return numbers


def _count_frames(path, fast: bool = True) -> int:
    """The number of frames in ``path``; extended XYZ by its atom-count lines (what ASE's own
    frame index does: each frame is a count, a comment and that many atom lines, up to the
    first blank line), any other format by reading every frame."""
    import collections
    import itertools

    from ase.io import iread

    path = Path(path)
    if fast and path.suffix.lower() in (".xyz", ".extxyz"):
        count = 0
        with path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    break
                try:
                    atoms = int(line)
                except ValueError:
                    return _count_frames(path, fast=False)
                collections.deque(itertools.islice(handle, atoms + 1), maxlen=0)  # skip
                count += 1
        return count
    return sum(1 for _ in iread(path, index=":"))
