"""The one writer of benchmark results: JSON policy, markdown tables, PNG plots."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from distmlip.bench.report import (
    jsonable,
    machine_description,
    markdown_table,
    pyplot,
    write_report,
)


def test_json_is_strict_rounded_and_plain(tmp_path):
    payload = {
        "time_s": 1.23456789,
        "tiny_s": 3.14159e-7,
        "edges_max": 2087403.0,  # a count kept as a float stays exact
        "numpy": {"float": np.float32(0.1), "int": np.int64(7), "bool": np.bool_(True)},
        "array": np.array([[1.0, 2.5], [np.pi, 4.0]]),
        "missing": [float("nan"), np.inf, None],
        "pair": (1, 2),
    }
    written = write_report(tmp_path, "result", payload=payload)
    assert written == [tmp_path / "result.json"]
    text = (tmp_path / "result.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["time_s"] == 1.2346 and data["tiny_s"] == 3.1416e-7
    assert data["edges_max"] == 2087403
    assert data["numpy"] == {"float": 0.1, "int": 7, "bool": True}
    assert data["array"] == [[1.0, 2.5], [3.1416, 4.0]]
    assert data["missing"] == [None, None, None]
    assert data["pair"] == [1, 2]


def test_jsonable_keeps_types_json_can_write_and_leaves_others_to_it():
    assert jsonable(np.arange(3)) == [0, 1, 2]
    assert jsonable(np.float64(2.0)) == 2.0 and jsonable(12345.678, digits=3) == 12300.0
    assert type(jsonable(np.int32(3))) is int and type(jsonable(np.bool_(False))) is bool
    with pytest.raises(TypeError):
        json.dumps(jsonable({"object": object()}))


def test_markdown_table_shape():
    table = markdown_table(("atoms", "P", "time (s)"), [(1000, 1, "1.35"), ("5,832", 2, "6.35")])
    lines = table.splitlines()
    assert lines == [
        "| atoms | P | time (s) |",
        "|---|---|---|",
        "| 1000 | 1 | 1.35 |",
        "| 5,832 | 2 | 6.35 |",
    ]
    assert all(line.count("|") == 4 for line in lines)
    assert markdown_table(["only"], []) == "| only |\n|---|"
    with pytest.raises(ValueError, match="row 1 has 2 cells, the header 3"):
        markdown_table(("a", "b", "c"), [(1, 2, 3), (1, 2)])


def test_report_writes_markdown_and_png(tmp_path):
    def figure():
        drawn, axis = pyplot().subplots(figsize=(3, 2))
        axis.plot([1, 2, 3], [1, 4, 9])
        return drawn

    written = write_report(
        tmp_path / "new" / "folder",
        "scaling",
        payload=[{"atoms": 1000}],
        markdown="# title\n\n" + markdown_table(["atoms"], [[1000]]),
        figure=figure,
        dpi=50,
    )
    out = tmp_path / "new" / "folder"
    assert written == [out / "scaling.json", out / "scaling.md", out / "scaling.png"]
    text = (out / "scaling.md").read_text()
    assert text.startswith("# title\n\n| atoms |\n|---|\n| 1000 |\n\nWritten by `python ")
    assert text.endswith("`.\n")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not pyplot().get_fignums(), "the figure was not closed"


def test_machine_description_names_architecture_cores_and_memory():
    text = machine_description()
    assert re.fullmatch(r".+, \d+ cores, \d+ GB RAM", text), text
    assert machine_description("cpu") == text + ", CPU only (gloo)"


def test_command_line_is_what_a_person_would_type_again():
    from distmlip.bench.report import command_line

    assert command_line(["/env/bin/distmlip", "bench", "--atoms", "1 2"]) == (
        "distmlip bench --atoms '1 2'"
    )
    assert command_line(["/x/distmlip/__main__.py", "bench"]) == "distmlip bench"
    assert command_line(["/x/pytest/__main__.py", "-q"]).startswith("python ")
