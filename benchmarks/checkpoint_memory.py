"""Activation checkpointing: memory per atom and time, ``checkpoint=True`` vs ``False``,
side by side in one run.

For each model, two sizes of one rattled crystal, each evaluated by a fresh worker pool
(``distmlip.bench.run.measure``: energy + forces + stress, fastest of ``--repeats`` calls, float32,
P = 1 with all ``--threads``): peak RSS of the worker and time per call. Memory per atom is the
slope between the two sizes, (peak(N2) − peak(N1)) / (N2 − N1), so the process baseline (torch,
the model) cancels. Models (random weights where upstream's need a download; weights do not
change the cost):

* CHGNet 0.3.0 (shipped weights), Si diamond;
* MACE with the shape of MACE-MP "medium" (benchmarks/mace_scaling.py), Cu fcc.
(The reference model's activations, ~0.1 MB per atom, are within the noise of RSS slopes.)

    python benchmarks/checkpoint_memory.py --out docs/benchmarks
    python benchmarks/checkpoint_memory.py --quick      # small systems, a smoke run

Writes ``<out>/checkpoint.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report  # noqa: E402
from distmlip.bench.run import BenchConfig, measure  # noqa: E402
from distmlip.bench.systems import crystal  # noqa: E402

TARGETS_MB_PER_ATOM = {"chgnet": 0.25, "mace": 1.2}
"""Issue 13's targets with checkpointing (measured on a GPU: float32 activations per atom)."""


def models(directory: Path, quick: bool) -> dict:
    """name → (model, crystal, (N1, N2))."""
    import mace  # noqa: F401  (before e3nn)
    import torch
    from mace_scaling import build_model

    mace_path = directory / "mace_medium.model"
    torch.save(build_model(), mace_path)
    sizes = {
        # Sizes far apart: RSS peaks scatter by ~±150 MB from run to run.
        "chgnet": (216, 512) if quick else (1000, 4096),
        "mace": (108, 256) if quick else (500, 1728),
    }
    return {
        "chgnet": ("chgnet", "si", sizes["chgnet"]),
        "mace": (str(mace_path), "cu", sizes["mace"]),
    }


MMAP_THRESHOLD = str(1 << 17)
"""glibc serves allocations above this (bytes) with their own mappings, unmapped when freed, so
a worker's RSS follows its live tensors. Its default threshold grows to 32 MB after large frees,
and chunk-sized tensors then come from the heap, whose holes inflate the peak RSS."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)  # the workers inherit it
    # allocator="system": freed blocks go back to the kernel, so the peak RSS is the peak of
    # live tensors (the "keep" allocator's heap fragmentation would blur the comparison).
    config = BenchConfig(
        dtype="float32", total_threads=args.threads, repeats=args.repeats, allocator="system"
    )
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, (model, kind, sizes) in models(Path(directory), args.quick).items():
            for n_atoms in sizes:
                atoms = crystal(kind, n_atoms, rattle=0.02, seed=0)
                for checkpoint in (False, True):
                    row = measure(
                        model, atoms, 1, "slab", "exchange", replace(config, checkpoint=checkpoint)
                    )
                    row.update(model=name, checkpoint=checkpoint)
                    rows.append(row)
                    print(
                        f"{name} N={len(atoms)} checkpoint={checkpoint}: {row['time_s']:.2f} s, "
                        f"peak {row['peak_rss_mb'][0]:.0f} MiB",
                        flush=True,
                    )
            rows += timings(model, name, crystal(kind, sizes[1], rattle=0.02, seed=0), config)
    summary = summarise(rows)
    payload = {"machine": machine_description(), "dtype": "float32", "rows": rows}
    payload["summary"] = summary
    write_report(
        args.out,
        "checkpoint",
        payload=payload,
        markdown=markdown(rows, summary),
        figure=lambda: figure(summary),
    )


def timings(model, name: str, atoms, config: BenchConfig) -> list[dict]:
    """Time per call with the workers' default memory settings, off and on alternately.

    The memory rows' settings (a fresh mapping for every allocation above 128 kB, returned at
    every free) cost page faults in proportion to allocations, and checkpointing allocates more
    often, so their times overstate its cost; these rows are the ones a user's run sees."""
    threshold = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    try:
        for checkpoint in (False, True):
            row = measure(
                model,
                atoms,
                1,
                "slab",
                "exchange",
                replace(
                    config, checkpoint=checkpoint, allocator="keep", repeats=config.repeats + 1
                ),
            )
            row.update(model=name, checkpoint=checkpoint, timing=True)
            rows.append(row)
            print(
                f"{name} N={len(atoms)} checkpoint={checkpoint}, default memory settings: "
                f"{row['time_s']:.2f} s",
                flush=True,
            )
    finally:
        if threshold is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = threshold
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and setting: MB per atom (slope), time of the larger size, and ratios."""
    summary = []
    for name in dict.fromkeys(row["model"] for row in rows):
        entry = {"model": name}
        for checkpoint in (False, True):
            mine = [r for r in rows if r["model"] == name and r["checkpoint"] == checkpoint]
            small, large = sorted(
                (r for r in mine if not r.get("timing")), key=lambda r: r["atoms"]
            )
            timed = [r for r in mine if r.get("timing")]
            key = "on" if checkpoint else "off"
            atoms = large["atoms"] - small["atoms"]
            for suffix, field in (("", "first_call_peak_rss_mb"), ("_repeated", "peak_rss_mb")):
                slope = (large[field][0] - small[field][0]) / atoms
                entry[f"mb_per_atom_{key}{suffix}"] = slope * 2**20 / 1e6  # MiB → MB
            entry[f"time_{key}_s"] = (timed[0] if timed else large)["time_s"]
            entry[f"time_{key}_memory_settings_s"] = large["time_s"]
            entry["atoms"] = (small["atoms"], large["atoms"])
        off = entry["mb_per_atom_off"]
        entry["memory_ratio"] = entry["mb_per_atom_on"] / off if off > 0 else float("nan")
        entry["time_ratio"] = entry["time_on_s"] / entry["time_off_s"]
        summary.append(entry)
    return summary


def markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = [
        "# Activation checkpointing: memory per atom and time",
        "",
        f"Machine: {machine_description()}. float32, P = 1, energy + forces + stress, fastest "
        'call of a fresh worker pool per row, `allocator="system"` with '
        "`MALLOC_MMAP_THRESHOLD_=131072` (RSS follows live tensors). MB per atom: the slope "
        "of the worker's peak RSS between the two sizes (the process baseline cancels), after "
        "the pool's first call (a fresh process: that call's peak) and after all `--repeats` "
        "calls (heap fragmentation over repeated calls adds to it). Times: the larger size, "
        "fastest call of a separate pool with the default memory settings (the memory rows' "
        "settings add page faults per allocation, which checkpointing makes more of; their "
        "times are in the detail table). Script: `benchmarks/checkpoint_memory.py`.",
        "",
    ]
    header = [
        "model",
        "atoms",
        "MB/atom off",
        "MB/atom on",
        "after all calls: off / on",
        "target on",
        "memory on/off",
        "time off (s)",
        "time on (s)",
        "time on/off",
    ]
    table = [
        [
            e["model"],
            " → ".join(str(n) for n in e["atoms"]),
            f"{e['mb_per_atom_off']:.3f}",
            f"{e['mb_per_atom_on']:.3f}",
            f"{e['mb_per_atom_off_repeated']:.3f} / {e['mb_per_atom_on_repeated']:.3f}",
            f"≤ {TARGETS_MB_PER_ATOM[e['model']]}" if e["model"] in TARGETS_MB_PER_ATOM else "–",
            f"{e['memory_ratio']:.2f}",
            f"{e['time_off_s']:.2f}",
            f"{e['time_on_s']:.2f}",
            f"{e['time_ratio']:.2f}",
        ]
        for e in summary
    ]
    lines += [markdown_table(header, table), "", "Every configuration:", ""]
    detail = [
        [
            r["model"],
            r["atoms"],
            r["checkpoint"],
            "default" if r.get("timing") else "memory rows'",
            f"{r['time_s']:.2f}",
            f"{r['peak_rss_mb'][0]:.0f}",
        ]
        for r in rows
    ]
    header = ["model", "atoms", "checkpoint", "memory settings", "time (s)", "peak RSS (MiB)"]
    lines.append(markdown_table(header, detail))
    return "\n".join(lines) + "\n"


def figure(summary: list[dict]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [e["model"] for e in summary]
    positions = range(len(names))
    for offset, key, label in ((-0.2, "off", "checkpoint off"), (0.2, "on", "checkpoint on")):
        axes[0].bar(
            [p + offset for p in positions],
            [e[f"mb_per_atom_{key}"] for e in summary],
            0.4,
            label=label,
        )
        axes[1].bar(
            [p + offset for p in positions], [e[f"time_{key}_s"] for e in summary], 0.4, label=label
        )
    for axis, title in zip(
        axes, ("MB per atom (worker peak RSS slope)", "time per call (s)"), strict=True
    ):
        axis.set_xticks(list(positions), names)
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
