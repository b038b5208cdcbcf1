"""Argument types of the command line: each rejects a bad value with one readable line."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

__all__ = [
    "UsageError",
    "Parser",
    "positive_int",
    "positive_float",
    "finite_float",
    "non_negative_float",
    "model_argument",
    "MODEL_HELP",
    "structure_file",
    "frame_index",
    "output_directory",
    "writable_path",
    "worker_calculator",
    "timeout_seconds",
]


class UsageError(Exception):
    """A command line that cannot work as written (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``distmlip: error: …``), raised, not printed."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (unless it is None or a flag's False); keeps the
    descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "%(default)" in text:
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            default = action.default
            if isinstance(default, list):
                default = " ".join(map(str, default))
            text += f" (default: {default})"
        return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _finite_float(text: str, accept, requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _finite_float(text, lambda value: True, "a finite number")


def positive_float(text: str) -> float:
    return _finite_float(text, lambda value: value > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _finite_float(text, lambda value: value >= 0, "a number >= 0")


MODEL_HELP = (
    "a name: reference (random weights, for tests), chgnet (pretrained CHGNet 0.3.0, shipped), "
    "chgnet-0.2.0, chgnet-r2scan, or a model an installed package registers (entry-point group "
    "distmlip.models); or a path: a MACE model file, a fairchem eSEN checkpoint (.pt), or the "
    "directory of a saved matgl TensorNet potential (potential.save(DIR))"
)
"""``--model``'s help: what :func:`model_argument` (and ``DistributedCalculator``) take."""


def model_argument(text: str) -> str:
    """What ``DistributedCalculator(model)`` takes as a string: a model name (built in or an
    entry point's), a model file (MACE, fairchem checkpoint) or a saved matgl model's directory.

    Checked here as far as that is cheap (the name is known, the path exists, a directory holds
    a saved matgl model); the file's contents are read, and checked, when the model loads.
    The same rule as :func:`distmlip.models.registry.resolve_model` tells names from paths.
    """
    from distmlip.models import model_names
    from distmlip.models.registry import MODEL_FILE_SUFFIXES

    names = model_names()
    if text.lower() in names:
        return text.lower()
    path = Path(text).expanduser()
    if os.sep in text or "/" in text or text.lower().endswith(MODEL_FILE_SUFFIXES) or path.exists():
        if path.is_dir():
            from distmlip.models.tensornet import missing_matgl_files

            missing = missing_matgl_files(path)
            if missing:  # else matgl would look for the directory's name on its model hub
                raise argparse.ArgumentTypeError(
                    f"{text!r} is a directory but not a saved matgl model (no "
                    f"{', '.join(missing)}; save one with potential.save(DIR))"
                )
            return text
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"no model file or directory {text!r}")
        return text
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; choose one of {', '.join(names)}, or give a model file "
        "(MACE, fairchem .pt) or a saved matgl model's directory"
    )


def _serving_rank() -> bool:
    """A rank other than 0 of a torchrun/SLURM job: it reads no input (rank 0 does, and the
    file may exist on rank 0's machine only)."""
    from distmlip.cluster.launch import detect_launch

    try:
        launch = detect_launch()
    except ValueError:
        return False
    return launch is not None and launch.rank > 0


def structure_file(text: str) -> Path:
    """An existing, non-empty file (its contents are read, and checked, by the job)."""
    path = Path(text)
    if _serving_rank():
        return path
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a structure file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file {text!r}")
    if path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return path


def output_directory(text: str) -> Path:
    """A directory to write into: existing, or creatable (checked before any work)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {str(existing)!r}")
    return path


def writable_path(path, option: str) -> None:
    """A file the job can create or replace: its directory exists and can be written.

    Raises:
        UsageError: naming ``option`` (checked before any work, so no result is lost).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; name a file")
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{option} {str(path)!r}: no directory {str(directory)!r}")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{option} {str(path)!r}: cannot write into {str(directory)!r}")


def timeout_seconds(text: str) -> float:
    from distmlip.options import MAX_TIMEOUT

    return _finite_float(
        text, lambda value: 0 < value <= MAX_TIMEOUT, f"a number of seconds in (0, {MAX_TIMEOUT:g}]"
    )


def frame_index(text: str):
    """ASE's index syntax: ``0``, ``-1``, ``2:10:2``, ``:`` (all frames)."""
    from ase.io.formats import string2index

    try:
        index = string2index(text)
    except ValueError:
        index = None
    if not isinstance(index, int | slice):
        raise argparse.ArgumentTypeError(
            f"must be a frame number or a slice such as 0, -1, 2:10 or ':', got {text!r}"
        )
    return index


def worker_calculator(args, **options):
    """The DistributedCalculator of a command's worker options (``--model``, ``--nprocs``,
    ``--partitioner``, ``--device``, ``--backend``, ``--dtype``, ``--checkpoint``,
    ``--timeout``); ``options`` add to or replace them."""
    from distmlip import DistributedCalculator

    settings = dict(
        nprocs=args.nprocs,
        partitioner=args.partitioner,
        device=args.device,
        backend=args.backend,
        dtype=args.dtype,
        checkpoint=args.checkpoint,
        timeout=args.timeout,
    )
    if hasattr(args, "skin"):  # md and demo: the same on every rank of a launched job
        settings["skin"] = args.skin
    return DistributedCalculator(args.model, **{**settings, **options})
