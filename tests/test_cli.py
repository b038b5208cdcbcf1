"""The command line's predict job, as the README runs it (smaller)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ase.build import bulk
from ase.io import write

from distmlip.cli import main


def test_predict_json(capsys):
    assert main(["predict", "--model", "reference", "--size", "3", "--nprocs", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["atoms"] == 108
    assert result["nprocs"] == 2 and len(result["workers"]) == 2
    assert sum(worker["owned_atoms"] for worker in result["workers"]) == 108
    assert result["energy_eV"] < 0 and len(result["stress_GPa"]) == 6


@pytest.mark.slow
def test_predict_table_and_errors(capsys, tmp_path):
    argv = ["predict", "--model", "reference", "--size", "2", "--partitioner", "rcb"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "energy" in out and "max |force|" in out and "stress (GPa)" in out
    path = tmp_path / "one.xyz"
    path.write_text("1\n\nCu 0 0 0\n")
    assert main(["predict", "--model", "reference", "--structure", str(path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("distmlip: error: nprocs=2 is larger than the number of atoms")
    assert len(error.splitlines()) == 1


@pytest.mark.slow
def test_demo_json_runs_md_and_compares_with_single_process(capsys):
    argv = ["demo", "--model", "reference", "--size", "3", "--steps", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["atoms"] == 216 and len(report["steps"]) == 3
    assert all(100 < step["temperature_K"] < 600 for step in report["steps"])
    # float32 distributed vs float32 single process: round-off only.
    assert report["energy_diff_eV_per_atom"] < 1e-5
    assert report["max_force_diff_eV_per_A"] < 1e-4
    assert all(memory > 0 for memory in report["worker_peak_rss_mb"])
    # 1 fs steps at 300 K move atoms ~0.01 Å: the graph built first serves every step.
    assert report["graph_builds"] == 1 and report["graph_reuses"] >= 3


@pytest.mark.slow
def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    argv = [
        "bench",
        "--crystal",
        "cu",
        "--atoms",
        "108",
        "--nprocs",
        "1",
        "2",
        "--halo",
        "exchange",
        "ghost",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "bench_reference_cu.json").read_text())
    rows = payload["rows"]
    assert {(r["nprocs"], r["halo"]) for r in rows} == {
        (1, "exchange"),
        (2, "exchange"),
        (2, "ghost"),
    }
    exchange = next(r for r in rows if r["nprocs"] == 2 and r["halo"] == "exchange")
    assert sum(exchange["owned_atoms"]) == 108
    assert len(exchange["bytes_per_exchange"][0]) >= 2  # one forward exchange per layer > 0
    # The reference model exchanges once per layer after the first: one segment per layer.
    segments = exchange["forward_segments_s"]
    assert len(segments) == 3 and all(t >= 0 for t in segments)
    assert sum(segments) <= exchange["forward_s"] + 1e-9
    single = next(r for r in rows if r["nprocs"] == 1)
    assert len(single["forward_segments_s"]) == 1
    assert "| 108 | 2 | slab | ghost |" in (tmp_path / "bench_reference_cu.md").read_text()
    assert (tmp_path / "bench_reference_cu.png").stat().st_size > 0


def _write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("distmlip: error: ")
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["predict", "--structure", "{tmp}/missing.xyz"], 2, "no such file"),
        (["predict", "--structure", "{empty}"], 2, "is empty"),
        (["predict", "--structure", "{tmp}"], 2, "is a directory"),
        (["predict", "--model", "reference", "--structure", "{truncated}"], 1, "cannot read"),
        (["predict", "--model", "reference", "--structure", "{corrupt}"], 1, "cannot read"),
        (["predict", "--model", "reference", "--structure", "{garbled_cif}"], 1, "cannot read"),
        (
            ["predict", "--model", "reference", "--structure", "{two}", "--index", "5"],
            1,
            "no frame",
        ),
        (["predict", "--model", "nosuch"], 2, "unknown model 'nosuch'"),
        (["predict", "--model", "chgnet-9.9"], 2, "unknown model"),
        (["predict", "--model", "{tmp}/missing.model"], 2, "no model file"),
        (["predict", "--index", "1"], 2, "--index selects frames of a STRUCTURE file"),
        (["predict", "--index", "abc", "--structure", "{two}"], 2, "--index"),
        (["predict", "--size", "-2"], 2, "--size: must be a positive integer, got '-2'"),
        (["predict", "--nprocs", "1.7"], 2, "--nprocs: must be a positive integer"),
        (["predict", "--timeout", "0"], 2, "--timeout: must be a number of seconds in (0, "),
        (["predict", "--timeout", "1e10"], 2, "--timeout: must be a number of seconds in (0, "),
        (["bench", "--out", "{empty}"], 2, "exists and is not a directory"),
        (["demo", "--steps", "0"], 2, "--steps: must be a positive integer, got '0'"),
        (["demo", "--skin", "-1"], 2, "--skin: must be a number >= 0"),
        (["bench", "--nprocs", "0"], 2, "--nprocs: must be a positive integer, got '0'"),
        (["bench", "--crystal", "nacl"], 2, "--crystal: invalid choice"),
        (["bench", "--backend", "mpi"], 2, "--backend: invalid choice: 'mpi'"),
        (["predict", "--backend", "nccl"], 1, "backend='nccl' needs device='cuda'"),
        (["bench", "--structure", "si"], 2, "unrecognized arguments: --structure"),
        ([], 2, "required: COMMAND"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_line_with_exit_status(argv, status, says, tmp_path, capsys):
    files = {
        "tmp": str(tmp_path),
        "empty": _write(tmp_path / "empty.xyz", ""),
        "truncated": _write(tmp_path / "truncated.xyz", "5\n\nCu 0 0 0\nCu 1.8 1.8 0\n"),
        "corrupt": _write(tmp_path / "corrupt.xyz", bytes(range(256)) * 4),
        "garbled_cif": _write(tmp_path / "garbled.cif", "data_x\n_cell_length_a oops\n"),
        "two": _write(tmp_path / "two.xyz", "1\n\nCu 0 0 0\n1\n\nCu 0 0 0.5\n"),
    }
    argv = [arg.format(**files) for arg in argv]
    assert main(argv) == status
    assert says in _one_line_error(capsys)


@pytest.mark.slow
def test_predict_evaluates_every_frame_of_a_file(tmp_path, capsys):
    """Several frames: all are evaluated (not silently the last), each as --index alone."""
    frames = []
    for seed in range(3):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.rattle(0.1, seed=seed)
        frames.append(atoms)
    path = tmp_path / "frames.extxyz"
    write(path, frames)
    common = ["predict", "--model", "reference", "--structure", str(path), "--json"]
    assert main(common) == 0
    every = json.loads(capsys.readouterr().out)["frames"]
    assert [frame["frame"] for frame in every] == [0, 1, 2]
    energies = [frame["energy_eV"] for frame in every]
    assert len(set(energies)) == 3
    assert main([*common, "--index", "1"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["energy_eV"] == pytest.approx(energies[1], rel=1e-12)
    assert main(common[:-1]) == 0
    table = capsys.readouterr().out
    assert "3 frames" in table and f"{energies[2]:.6f}" in table


def test_help_shows_defaults_and_plain_description(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "5,832 atoms" in text and "(default: 9)" in text and "(default: 1.0)" in text


def test_predict_defaults_to_the_shipped_pretrained_model():
    from distmlip.cli import _parser

    assert _parser().parse_args(["predict"]).model == "chgnet"
    assert _parser().parse_args(["predict", "--structure", __file__]).model == "chgnet"


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["predict", "--structure", "/nonexistent/file.xyz"], 2),
        (["demo", "--steps", "0"], 2),
        (["predict", "--model", "reference", "--structure", "{corrupt}"], 1),
    ],
)
def test_errors_as_a_process_print_one_line(argv, status, tmp_path):
    """The same as a real command: nothing else (warnings, tracebacks) on stderr or stdout."""
    corrupt = _write(tmp_path / "corrupt.xyz", bytes(range(256)) * 4)
    argv = [arg.format(corrupt=corrupt) for arg in argv]
    run = subprocess.run(
        [sys.executable, "-m", "distmlip", *argv], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == status
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmlip: error: "), run.stderr


def test_every_partitioner_and_device_option_of_the_calculator_is_offered():
    """The commands' choices come from distmlip.options: none is left out or added."""
    from distmlip.cli import _parser
    from distmlip.cli.arguments import UsageError
    from distmlip.options import BACKENDS, DEVICES, DTYPES, PARTITIONER_NAMES

    for command in ("predict", "md", "relax", "estimate", "demo"):
        for option, values in (
            ("--partitioner", PARTITIONER_NAMES),
            ("--device", DEVICES),
            ("--backend", BACKENDS),
            ("--dtype", DTYPES),
        ):
            for value in values:
                structure = [] if command == "demo" else ["bulk:Cu:fcc:3.61"]
                args = _parser().parse_args([command, *structure, option, value])
                assert getattr(args, option[2:]) == value
            with pytest.raises(UsageError, match="invalid choice: 'nonsense'"):
                _parser().parse_args([command, *structure, option, "nonsense"])
