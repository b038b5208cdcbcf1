"""The options several commands share, each defined once, with their choices taken from
:mod:`distmlip.options` (what the calculator accepts)."""

from __future__ import annotations

from distmlip.cli.arguments import (
    MODEL_HELP,
    model_argument,
    non_negative_float,
    positive_int,
    timeout_seconds,
)
from distmlip.options import BACKENDS, DEVICES, DTYPES, PARTITIONER_NAMES

__all__ = ["add_model_option", "add_device_options", "add_worker_options", "add_skin_option"]


def add_model_option(parser, default: str) -> None:
    parser.add_argument("--model", type=model_argument, default=default, help=MODEL_HELP)


def add_device_options(parser, dtype: str) -> None:
    """--device, --backend and --dtype, the same in every command."""
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="where workers run")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto: NCCL on cuda, gloo on cpu; gloo on cuda lets several workers share a GPU "
        "(transfers through host memory, slower)",
    )
    parser.add_argument("--dtype", default=dtype, choices=DTYPES, help="precision")


def add_worker_options(parser, dtype: str, timeout: float) -> None:
    """The options of commands that run one calculator: P, partitioner, device, dtype,
    checkpointing, timeout (:func:`distmlip.cli.arguments.worker_calculator` maps them to the
    calculator's keywords)."""
    parser.add_argument(
        "--nprocs",
        type=positive_int,
        help="worker processes P (default: 2; under torchrun or srun, the job's ranks)",
    )
    parser.add_argument(
        "--partitioner",
        default="slab",
        choices=PARTITIONER_NAMES,
        help="how atoms are split",
    )
    add_device_options(parser, dtype)
    parser.add_argument(
        "--checkpoint",
        nargs="?",
        const=True,
        default=False,
        type=positive_int,
        metavar="EDGES",
        help="activation checkpointing: less memory per atom, more time, the same numbers "
        "(optional: edges per chunk, default 32768)",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=timeout,
        help="seconds a worker may take per call",
    )


def add_skin_option(parser) -> None:
    parser.add_argument(
        "--skin",
        type=non_negative_float,
        default=1.0,
        help="Å; graphs are reused until an atom has moved skin/2 (0: rebuild every step)",
    )
