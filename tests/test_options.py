"""Every option is checked in the constructor: one ValueError line each, before any work."""

from __future__ import annotations

import time

import pytest

from distmlip import DistributedCalculator

BAD_OPTIONS = [
    ({"nprocs": -1}, "nprocs must be a positive integer, got -1"),
    ({"nprocs": 1.7}, "nprocs must be a positive integer, got 1.7"),
    ({"nprocs": 2.0}, "nprocs must be a positive integer, got 2.0"),
    ({"nprocs": 0}, "nprocs must be a positive integer, got 0"),
    ({"nprocs": True}, "nprocs must be a positive integer, got True"),
    ({"nprocs": "2"}, "nprocs must be a positive integer, got '2'"),
    ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
    ({"timeout": -5.0}, "timeout must be a finite number of seconds > 0"),
    ({"timeout": float("nan")}, "timeout must be a finite number of seconds > 0"),
    ({"timeout": float("inf")}, "timeout must be a finite number of seconds > 0"),
    ({"timeout": "60"}, "timeout must be a number of seconds > 0"),
    ({"threads_per_worker": 0}, "threads_per_worker must be a positive integer, got 0"),
    ({"threads_per_worker": 1.5}, "threads_per_worker must be a positive integer, got 1.5"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
    ({"allocator": "jemalloc"}, "allocator must be one of"),
    ({"partitioner": "voronoi"}, "partitioner"),
    ({"halo": "full"}, "halo must be one of"),
    ({"skin": -1.0}, "skin must be"),
    ({"skin": "1"}, "skin must be"),
    ({"skin": None}, "skin must be"),
    ({"nprocs": 2**40}, "worker processes per core"),
    ({"skin": True}, "skin must be"),
    ({"timeout": 1e10}, "timeout must be a finite number of seconds > 0 and <= 1e"),
    ({"threads_per_worker": 10**6}, "threads_per_worker=1000000 is more than"),
    ({"partitioner": ["slab"]}, "unknown partitioner"),
    ({"halo": "ghost", "skin": 1.0}, "skin=1.0 needs halo='exchange'"),
    ({"trace": "no"}, "trace must be True or False, got 'no'"),
    ({"trace": 1}, "trace must be True or False"),
    ({"checkpoint": "yes"}, "checkpoint must be True, False or a number of edges per chunk >= 64"),
    ({"checkpoint": 0}, "checkpoint must be True, False or a number of edges per chunk >= 64"),
    ({"checkpoint": -5}, "checkpoint must be True, False or a number of edges per chunk >= 64"),
    ({"checkpoint": 2.5}, "checkpoint must be True, False or a number of edges per chunk >= 64"),
    ({"checkpoint": 63}, "got 63$"),
    ({"checkpoint": 1}, "got 1 .use True for the default chunks"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=lambda v: str(v)[:30])
def test_bad_option_is_one_value_error_before_anything_starts(options, message):
    start = time.perf_counter()
    # "chgnet" would take seconds to load: the check must come before the model.
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        DistributedCalculator("chgnet", **options)
    assert "\n" not in str(error.value)
    assert time.perf_counter() - start < 1.0


def test_integral_options_of_other_integer_types_are_accepted(reference_model):
    import numpy as np

    with DistributedCalculator(reference_model, nprocs=np.int64(1), threads_per_worker=1) as calc:
        assert calc.nprocs == 1 and isinstance(calc.nprocs, int)


def test_misspelled_keyword_is_a_type_error_with_a_suggestion():
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'nproc'; did you mean 'nprocs'"
    ):
        DistributedCalculator("reference", nproc=4)
    with pytest.raises(TypeError, match="'time_out'; did you mean 'timeout'"):
        DistributedCalculator("reference", time_out=1)


def test_skin_larger_than_the_model_supports(reference_model):
    with pytest.raises(ValueError, match="skin=6.0 Å is more than ReferenceMPNN supports"):
        DistributedCalculator(reference_model, skin=6.0)


@pytest.mark.slow
def test_settings_are_read_only(reference_model):
    """The workers were started for these settings: changing one would silently not apply."""
    with DistributedCalculator(reference_model, nprocs=1, skin=0.2, checkpoint=128) as calc:
        for name, value in [
            ("nprocs", 3),
            ("skin", 2.0),
            ("partitioner", "rcb"),
            ("halo", "ghost"),
            ("checkpoint", False),
            ("memory_limit", 4),
            ("backend", "nccl"),
            ("resident", True),
        ]:
            with pytest.raises(AttributeError):
                setattr(calc, name, value)
        assert (calc.nprocs, calc.skin, calc.partitioner) == (1, 0.2, "slab")
        assert (calc.checkpoint, calc.memory_limit, calc.backend) == (128, None, "auto")


@pytest.mark.slow
def test_a_calculator_cannot_be_copied_or_pickled(reference_model):
    """Atoms deep-copied with their calculator would share (or orphan) its workers."""
    import copy
    import pickle

    from ase.build import bulk

    with DistributedCalculator(reference_model, nprocs=1) as calc:
        atoms = bulk("Cu", "fcc", a=3.61)
        atoms.calc = calc
        for attempt in (lambda: copy.deepcopy(atoms), lambda: pickle.dumps(calc)):
            with pytest.raises(TypeError, match="cannot be copied or pickled; copy the atoms"):
                attempt()
        assert atoms.copy().calc is None
        assert atoms.get_potential_energy() != 0  # still usable
