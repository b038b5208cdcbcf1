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


@pytest.mark.slow
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


def test_multinode_page_shows_the_exchange_volume_table():
    """docs/multinode.md shows the table benchmarks/exchange_volume.py wrote, for P up to 64."""
    generated = (DOCS / "benchmarks" / "exchange_volume.md").read_text()
    table = generated[: generated.index("\nWritten by")].strip()
    assert table in (DOCS / "multinode.md").read_text()
    import json

    study = json.loads((DOCS / "benchmarks" / "exchange_volume.json").read_text())
    rows = study["rows"]
    assert {r["partitioner"] for r in rows} == {"slab", "rcb"} and max(r["P"] for r in rows) >= 64
    assert {r["model"] for r in study["measured"]} == {"reference", "chgnet"}


@pytest.mark.slow
def test_exchange_volume_counts_what_workers_send(monkeypatch):
    """The benchmark's halo rows × row bytes = the bytes real workers sent in each exchange."""
    monkeypatch.syspath_prepend(str(DOCS.parent / "benchmarks"))
    from ase.build import bulk
    from exchange_volume import halo_matrix

    from distmlip import Structure
    from distmlip.models import ReferenceMPNN

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=1)
    model = ReferenceMPNN()
    for nprocs, partitioner in ((3, "rcb"), (4, "slab")):
        sent = halo_matrix(Structure.from_ase(atoms), nprocs, partitioner, model.cutoff).sum(0)
        assert sent.min() > 0
        with DistributedCalculator(model, nprocs=nprocs, partitioner=partitioner, trace=True) as c:
            atoms.calc = c
            atoms.get_potential_energy()
            for rank, record in enumerate(c.last_traces):
                exchanges = [e["bytes_sent"] for e in record.events if e["name"] == "exchange"]
                # hidden features, float64, after every layer but the last
                row_bytes = model.embedding.embedding_dim * 8
                assert exchanges == [sent[rank] * row_bytes] * (model.num_layers - 1)
