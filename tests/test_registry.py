"""Model lookup: names, objects, files and third-party adapters registered by entry point."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from conftest import evaluate, small_cell

from distmlip import DistributedCalculator, ReferenceMPNN
from distmlip.models import ENTRY_POINT_GROUP, model_names, resolve_model

TOY_PACKAGE = '''
from distmlip.models import ReferenceMPNN


class ToyAdapter(ReferenceMPNN):
    """A third-party adapter: the reference model with its own defaults."""

    def __init__(self, seed=7, **kwargs):
        super().__init__(cutoff=4.0, num_layers=2, hidden=8, seed=seed, **kwargs)
'''


@pytest.fixture
def toy_distribution(tmp_path, monkeypatch):
    """An installed package (a module and its dist-info) that declares one entry point."""
    (tmp_path / "toy_distmlip_models.py").write_text(TOY_PACKAGE)
    info = tmp_path / "toy_distmlip_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: toy-distmlip-models\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{ENTRY_POINT_GROUP}]
            toymodel = toy_distmlip_models:ToyAdapter
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # Workers are fresh interpreters: they find the package the way an installed one is found.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    yield tmp_path
    sys.modules.pop("toy_distmlip_models", None)


@pytest.mark.slow
def test_entry_point_model_is_found_by_name(toy_distribution):
    assert "toymodel" in model_names()
    adapter = resolve_model("ToyModel", seed=3)
    assert type(adapter).__name__ == "ToyAdapter" and adapter.cutoff == 4.0
    with DistributedCalculator("toymodel", nprocs=2, timeout=120) as calc:
        distributed = evaluate(calc, small_cell())
    expected = ReferenceMPNN(cutoff=4.0, num_layers=2, hidden=8, seed=7)
    with DistributedCalculator(expected, nprocs=1, timeout=120) as single:
        reference = evaluate(single, small_cell())
    assert distributed["energy"] == pytest.approx(reference["energy"], rel=1e-12)
    np.testing.assert_allclose(distributed["forces"], reference["forces"], atol=1e-10)


def test_names_objects_and_errors(reference_model):
    assert resolve_model(reference_model) is reference_model
    assert isinstance(resolve_model("REFERENCE", hidden=8), ReferenceMPNN)
    assert {"reference", "chgnet", "chgnet-r2scan"} <= set(model_names())
    with pytest.raises(TypeError, match="cannot use 'nosuch' as a model.*reference"):
        resolve_model("nosuch")
    with pytest.raises(TypeError, match="cannot use 42"):
        resolve_model(42)
