"""Benchmark results on disk, written one way: ``<out>/<name>.json``, ``.md`` and ``.png``.

``distmlip bench`` and every script in ``benchmarks/`` write through :func:`write_report`, so
all result files share one JSON policy (floats to :data:`SIGNIFICANT_DIGITS` significant
digits, numpy values as plain numbers, NaN and infinities as ``null``: strict JSON), one
markdown table layout (:func:`markdown_table`) and one way of saving plots (matplotlib's Agg
backend, imported only when a plot is drawn: matplotlib is the optional ``bench`` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SIGNIFICANT_DIGITS",
    "jsonable",
    "markdown_table",
    "machine_description",
    "pyplot",
    "command_line",
    "write_report",
]

SIGNIFICANT_DIGITS = 5
"""Digits kept of every float in the JSON files: timings on shared machines are not more
precise, and shorter numbers keep the committed files readable."""


def jsonable(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """``value`` as plain JSON types, recursively: floats (Python or numpy) rounded to ``digits``
    significant digits, except whole numbers (counts kept as floats, e.g. a max over ranks,
    stay exact so a table rendered again from the JSON shows the same counts), NaN and ±inf
    as None, numpy integers, booleans and arrays as Python ones, tuples as lists, paths as
    strings. Anything else is returned unchanged (``json.dumps`` rejects what it cannot
    write)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return value if value.is_integer() else float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: jsonable(item, digits) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), digits)
    if isinstance(value, (list, tuple)):
        return [jsonable(item, digits) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table, one line per row: ``| a | b |``, a ``|---|---|`` rule after the header.

    Cells are written with ``str``; format numbers before. Raises ValueError for a row whose
    length differs from the header's. No trailing newline.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {index} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def machine_description(device: str | None = None) -> str:
    """What a results file says it was measured on, e.g. ``x86_64, 2 cores, 24 GB RAM``.

    ``device="cpu"`` appends ``CPU only (gloo)``; ``"cuda"`` appends the GPU count and name
    (torch is imported only then). Memory is the machine's physical memory, GB = 2**30 bytes.
    """
    import psutil

    parts = [
        platform.machine() or "unknown machine",
        f"{os.cpu_count()} cores",
        f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM",
    ]
    if device == "cpu":
        parts.append("CPU only (gloo)")
    elif device == "cuda":
        import torch

        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            parts.append(f"{count} × {torch.cuda.get_device_name(0)} (NCCL)")
        else:
            parts.append("no CUDA device visible")
    return ", ".join(parts)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, as a person would type it again (``distmlip bench ...`` or
    ``python benchmarks/x.py ...``)."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]) if argv else Path("python")
    if program.name == "distmlip" or (
        program.name == "__main__.py" and program.parent.name == "distmlip"
    ):
        head = ["distmlip"]
    else:
        try:
            shown = program.resolve().relative_to(Path.cwd())
        except ValueError:
            shown = program
        head = ["python", str(shown)]
    return shlex.join(head + argv[1:])


def write_report(
    out: Path | str,
    name: str,
    *,
    payload: Any,
    markdown: str | None = None,
    figure: Callable[[], Any] | None = None,
    dpi: int = 120,
) -> list[Path]:
    """Write ``<out>/<name>.json`` (``payload``, see :func:`jsonable`), ``<out>/<name>.md``
    (``markdown``, if given) and ``<out>/<name>.png`` (the matplotlib figure ``figure()``
    returns, if given, saved at ``dpi`` and closed). Creates ``out``.

    Without matplotlib installed the PNG is skipped with a note on stderr: the numbers matter
    more than the picture. Returns the paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json"]
    text = json.dumps(jsonable(payload), indent=1, ensure_ascii=False, allow_nan=False)
    written[0].write_text(text + "\n", encoding="utf-8")
    if markdown is not None:
        # Every table says which command wrote it (the one running now).
        written.append(out / f"{name}.md")
        footer = f"\nWritten by `{command_line()}`.\n"
        written[-1].write_text(markdown.rstrip("\n") + "\n" + footer, encoding="utf-8")
    if figure is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print(
                f"matplotlib not installed: no {name}.png (pip install 'distmlip[bench]')",
                file=sys.stderr,
            )
        else:
            drawn = figure()
            written.append(out / f"{name}.png")
            drawn.savefig(written[-1], dpi=dpi)
            pyplot().close(drawn)
    return written
