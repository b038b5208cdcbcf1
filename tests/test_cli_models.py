"""``--model`` takes what ``DistributedCalculator(model)`` takes, and ``bench`` checks its
options against the model before measuring anything."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ase.io import write

from distmlip.cli import _parser, main
from distmlip.models import registry
from distmlip.models.reference import ReferenceMPNN

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs


def test_predict_with_a_saved_tensornet_directory_equals_upstream(tmp_path, capfd):
    """A seeded random TensorNet saved with ``Potential.save``: ``--model DIR`` gives matgl's
    own single-process numbers (float64), as ``DistributedCalculator(DIR)`` does."""
    from test_tensornet import build_potential, crystal, upstream

    potential = build_potential(seed=4)
    saved = tmp_path / "tensornet"
    potential.save(saved)
    path = tmp_path / "crystal.extxyz"
    write(path, crystal())
    argv = ["predict", str(path), "--model", str(saved), "--nprocs", "2", "--json"]
    capfd.readouterr()  # matgl's import banner (Warp) in this process: not the command's
    assert main(argv) == 0
    result = json.loads(capfd.readouterr().out)
    assert result["model"] == str(saved) and len(result["workers"]) == 2
    expected = upstream(potential, "float64")["crystal"]
    assert result["energy"] == pytest.approx(expected["energy"], rel=1e-10)
    np.testing.assert_allclose(result["forces"], expected["forces"], rtol=0, atol=1e-8)


def test_model_accepts_names_plugins_files_and_saved_directories(tmp_path, monkeypatch):
    class Plugin:  # an installed package's entry point in group distmlip.models
        name = "mymodel"

        @staticmethod
        def load():
            return ReferenceMPNN

    monkeypatch.setattr(registry, "_plugins", lambda: {"mymodel": Plugin})
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("model.json", "model.pt", "state.pt"):  # what potential.save writes
        (saved / name).write_text("{}")
    checkpoint = tmp_path / "esen.pt"
    checkpoint.write_bytes(b"PK")  # read when the model loads, not by the parser
    mace = tmp_path / "mace.model"
    mace.write_bytes(b"x")
    parse = _parser().parse_args
    for given in ["reference", "chgnet", "CHGNet-0.2.0", "chgnet-r2scan", "mymodel", "MyModel"]:
        assert parse(["predict", "--model", given]).model == given.lower()
    for given in [saved, checkpoint, mace]:
        for command in ("predict", "md", "relax", "estimate", "bench", "demo"):
            extra = ["bulk:Cu:fcc"] if command in ("relax", "estimate") else []
            assert parse([command, *extra, "--model", str(given)]).model == str(given)


def test_plugin_model_runs_like_the_built_in_one(monkeypatch, capfd):
    class Plugin:
        @staticmethod
        def load():
            return ReferenceMPNN  # the same seeded weights as "reference"

    monkeypatch.setattr(registry, "_plugins", lambda: {"mymodel": Plugin})
    common = ["predict", "bulk:Cu:fcc:3.61:cubic", "--repeat", "2", "2", "2", "--nprocs", "1"]
    energies = []
    for model in ("mymodel", "reference"):
        assert main([*common, "--model", model, "--json"]) == 0
        energies.append(json.loads(capfd.readouterr().out)["energy"])
    assert energies[0] == energies[1]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("{tmp}", "is a directory but not a saved matgl model (no model.pt, state.pt, model.json"),
        ("{tmp}/missing.pt", "no model file or directory"),
        ("nosuch", "unknown model 'nosuch'"),
    ],
)
def test_bad_models_are_one_line_usage_errors(given, says, tmp_path, capsys):
    assert main(["predict", "--model", given.format(tmp=tmp_path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and says in error


def test_help_lists_every_kind_of_model(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for kind in ("chgnet-r2scan", "entry-point", "MACE model file", "eSEN", "TensorNet"):
        assert kind in text


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--model", "chgnet", "--halo", "exchange", "ghost"], "--halo ghost: chgnet"),
        (["--nprocs", "1", "8", "--atoms", "4"], "nprocs=8 is larger than the number of atoms"),
        (["--backend", "nccl"], "backend='nccl' needs device='cuda'"),
    ],
)
def test_bench_refuses_a_configuration_before_measuring(argv, says, tmp_path, capsys):
    """Exit 2 and one line, before the first configuration is measured: nothing written."""
    out = tmp_path / "out"
    started = time.monotonic()
    assert main(["bench", "--atoms", "32", "--out", str(out), *argv]) == 2
    assert time.monotonic() - started < 20  # no measurement (CHGNet loads once: seconds)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmlip: error: ") and says in lines[0]
    assert captured.out == "" and not (out.exists() and any(out.iterdir()))


def test_a_directory_with_only_a_model_json_is_refused_without_looking_on_a_model_hub(tmp_path):
    """matgl looks for a directory's name on its model hub unless all three files are there:
    refused at once, in the CLI and in the API, naming what is missing."""
    from distmlip import DistributedCalculator

    (tmp_path / "model.json").write_text("")
    assert main(["predict", "--model", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match=r"not a saved matgl model \(no model.pt, state.pt;"):
        DistributedCalculator(str(tmp_path), nprocs=1)
