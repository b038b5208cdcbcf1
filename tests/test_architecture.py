"""The layout's rules (docs/design.md's package map): import-linter's contracts in
pyproject.toml, no module importing another's private names, few modules at the top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distmlip"


def test_import_contracts_are_kept():
    """Each package imports only those below it; the driver neither the worker nor the
    exchange; adapters only the protocol; no cycles between the modules of a package."""
    linter = Path(sys.executable).with_name("lint-imports")
    if not linter.exists():
        pytest.fail("lint-imports is missing: install the test extra (import-linter)")
    run = subprocess.run(
        [str(linter), "--no-cache"],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout and "4 kept" in run.stdout, run.stdout


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_private_names() -> list[str]:
    """``importer: from module import _name`` for every import, in functions too, of a name
    that starts with one underscore from another distmlip module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if not node.module.startswith("distmlip") or node.module == importer:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{importer}: from {node.module} import {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert _imported_private_names() == []


def test_the_check_for_private_names_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The scan above can fail: a private import inside a function is found."""
    package = tmp_path / "distmlip"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from distmlip.b import _hidden\n")
    (package / "b.py").write_text("_hidden = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert _imported_private_names() == ["distmlip.a: from distmlip.b import _hidden"]


def test_few_modules_at_the_top_and_every_job_in_a_package():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    jobs = {"graphs", "exchange", "models", "worker", "driver", "cluster", "md", "bench", "cli"}
    assert packages == jobs


def test_no_source_file_over_400_lines():
    long = {
        str(path.relative_to(PACKAGE.parent)): length
        for folder in (PACKAGE, PACKAGE.parent / "benchmarks")
        for path in folder.rglob("*.py")
        if (length := len(path.read_text().splitlines())) > 400
    }
    assert long == {}


def test_the_options_partitioner_names_are_the_partitioners():
    from distmlip.graphs.partition import PARTITIONERS
    from distmlip.options import PARTITIONER_NAMES

    assert PARTITIONER_NAMES == tuple(PARTITIONERS)
