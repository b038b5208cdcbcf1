"""The command line's predict job, as the README runs it (smaller)."""

from __future__ import annotations

import json

from distmlip.cli import main


def test_predict_json(capsys):
    assert main(["predict", "--model", "reference", "--size", "3", "--nprocs", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["atoms"] == 108
    assert result["nprocs"] == 2 and len(result["workers"]) == 2
    assert sum(worker["owned_atoms"] for worker in result["workers"]) == 108
    assert result["energy_eV"] < 0 and len(result["stress_GPa"]) == 6


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


def test_bench_writes_json_markdown_and_plot(tmp_path, capsys):
    argv = [
        "bench",
        "--crystal",
        "cu",
        "--sizes",
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
