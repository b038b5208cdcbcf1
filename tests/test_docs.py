"""The example in docs/adapters.md runs as printed and is exact."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import cluster, evaluate, small_cell

from distmlip import DistributedCalculator

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_adapter_example_is_exact(tmp_path, monkeypatch):
    text = (DOCS / "adapters.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(block for block in blocks if "class BondModel" in block)
    (tmp_path / "bond_model_example.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", pythonpath)  # workers unpickle the model from there
    from bond_model_example import BondModel

    model = BondModel()
    systems = {"small_cell": small_cell(), "cluster": cluster()}
    with DistributedCalculator(model, nprocs=1, timeout=120) as single:
        expected = {name: evaluate(single, atoms) for name, atoms in systems.items()}
    with DistributedCalculator(model, nprocs=3, partitioner="rcb", timeout=120) as calc:
        for name, atoms in systems.items():
            got = evaluate(calc, atoms)
            assert got["energy"] == pytest.approx(expected[name]["energy"], rel=1e-12), name
            np.testing.assert_allclose(got["forces"], expected[name]["forces"], rtol=0, atol=1e-10)
            assert np.abs(got["forces"]).max() > 1e-4, "the example's forces are all zero"


@pytest.mark.parametrize("model", ["chgnet", "mace", "esen"])
def test_model_page_accuracy_tables_are_the_scripts_output(model):
    """docs/<model>.md shows the tables benchmarks/accuracy.py wrote, not hand-typed ones."""
    generated = (DOCS / "benchmarks" / f"accuracy_{model}.md").read_text()
    tables = generated[generated.index("## float64") : generated.index("\nWritten by")].strip()
    page = (DOCS / f"{model}.md").read_text()
    assert tables.replace("## ", "### ") in page


def test_md_page_stability_study_is_the_scripts_output():
    """docs/md.md shows the tables benchmarks/md_stability.py wrote (≥ 10,000 CHGNet steps)."""
    generated = (DOCS / "benchmarks" / "md_stability.md").read_text()
    body = generated[generated.index("\n\n") : generated.index("![energy drift]")].strip()
    assert body in (DOCS / "md.md").read_text()
    import json

    study = json.loads((DOCS / "benchmarks" / "md_stability.json").read_text())
    assert study["settings"]["model"] == "chgnet" and study["settings"]["steps"] >= 10_000
    assert set(study["runs"]) == {"1", "2"} and study["runs"]["1"]["atoms"] >= 200
