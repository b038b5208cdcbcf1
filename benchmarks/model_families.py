"""TensorNet and eSEN: per-worker memory and time at P = 1 vs P = 2, and the edges each worker
computes at P = 4 with zero redundancy vs the ghost baseline, side by side in one run.

Random-weight models of published shapes (weights do not change the cost):

* TensorNet (matgl): units 64, 2 interaction layers, cutoff 5 Å, 89 elements (the shape of
  matgl's TensorNet-MatPES-PBE);
* eSEN (fairchem): ``eSCNMDBackbone`` with 64 sphere channels, lmax = mmax = 2, 4 blocks,
  cutoff 6 Å (a small eSEN; eSEN-30M-OMAT has 10 blocks of 128 channels), conservative
  ``MLP_EFS_Head``, loaded from a fairchem checkpoint.

Each configuration is ``distmlip.bench.run.measure``: a fresh worker pool, energy + forces +
stress, fastest of ``--repeats`` calls, the same total number of torch threads split over the
workers (so P = 2 and P = 1 get equal hardware), float32, rattled Cu fcc: P = 1 and P = 2 on
``--<model>-atoms`` atoms, P = 4 with exchange and with ghosts on ``--<model>-ghost-atoms``
(smaller: at these sizes a ghost worker holds about the whole structure, four of them would
not fit in memory at the larger size).

    python benchmarks/model_families.py --out docs/benchmarks
    python benchmarks/model_families.py --quick     # small systems, a smoke run

Writes ``<out>/model_families.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MATGL_BACKEND", "PYG")

from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report  # noqa: E402
from distmlip.bench.run import BenchConfig, measure  # noqa: E402
from distmlip.bench.systems import crystal  # noqa: E402

# (P, halo, which size): memory and time at P = 1 vs 2 on the larger structure; exchange vs
# ghost at P = 4 on the smaller one (ghosts of a structure this size are nearly all of it, so
# four ghost workers each hold about the whole structure: the larger one would not fit).
CONFIGURATIONS = [
    (1, "exchange", "atoms"),
    (2, "exchange", "atoms"),
    (4, "exchange", "ghost_atoms"),
    (4, "ghost", "ghost_atoms"),
]


def tensornet_model():
    import torch
    from ase.data import chemical_symbols
    from matgl.apps.pes import Potential
    from matgl.models import TensorNet

    from distmlip.models.tensornet import TensorNetAdapter

    torch.manual_seed(0)
    model = TensorNet(
        element_types=tuple(chemical_symbols[1:90]),
        units=64,
        nblocks=2,
        num_rbf=32,
        cutoff=5.0,
        is_intensive=False,
        use_warp=False,
    )
    return TensorNetAdapter(Potential(model=model))


def esen_model(directory: Path) -> str:
    from fairchem_models import esen_config, write_esen_checkpoint

    config = esen_config(cutoff=6.0, num_layers=4, channels=64)
    return str(write_esen_checkpoint(directory / "esen_small.pt", config=config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensornet-atoms", type=int, default=4000)
    parser.add_argument("--tensornet-ghost-atoms", type=int, default=1372)
    parser.add_argument("--esen-atoms", type=int, default=500)
    parser.add_argument("--esen-ghost-atoms", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="total torch threads")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.tensornet_atoms, args.esen_atoms, args.repeats = 256, 108, 1
        args.tensornet_ghost_atoms, args.esen_ghost_atoms = 256, 108
    config = BenchConfig(dtype="float32", total_threads=args.threads, repeats=args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        families = {
            "tensornet": (
                tensornet_model(),
                {"atoms": args.tensornet_atoms, "ghost_atoms": args.tensornet_ghost_atoms},
            ),
            "esen": (
                esen_model(Path(directory)),
                {"atoms": args.esen_atoms, "ghost_atoms": args.esen_ghost_atoms},
            ),
        }
        for family, (model, sizes) in families.items():
            for nprocs, halo, size in CONFIGURATIONS:
                atoms = crystal("cu", sizes[size], rattle=0.02, seed=0)
                row = measure(model, atoms, nprocs, "slab", halo, config)
                row["model"] = family
                rows.append(row)
                print(
                    f"{family} N={len(atoms)} P={nprocs} {halo}: {row['time_s']:.2f} s, "
                    f"peak {max(row['peak_rss_mb']):.0f} MiB, edges {row['edges']}",
                    flush=True,
                )
    payload = {"machine": machine_description(), "dtype": "float32", "rows": rows}
    write_report(
        args.out,
        "model_families",
        payload=payload,
        markdown=markdown(rows),
        figure=lambda: figure(rows),
    )


def markdown(rows: list[dict]) -> str:
    lines = [
        "# TensorNet and eSEN: memory, time and computed edges per worker",
        "",
        f"Machine: {machine_description()}. float32, rattled Cu fcc, energy + forces + stress, "
        "fastest call of a fresh worker pool; total torch threads equal across P. "
        "Script: `benchmarks/model_families.py` (model shapes in its docstring). Ratios are "
        "to the base of the same structure: P = 1 for P = 1 and 2, P = 4 exchange for the "
        "P = 4 rows (a smaller structure).",
        "",
    ]
    header = [
        "model",
        "atoms",
        "P",
        "halo",
        "time (s)",
        "time / base",
        "peak RSS per worker (MiB)",
        "max worker / base",
        "edges per worker",
        "max edges / base",
    ]
    table = []
    for row in rows:
        # P = 1 and 2 share a structure; the P = 4 rows (a smaller one) compare with P = 4
        # exchange, so every ratio is between configurations of one structure.
        base = (1, "exchange") if row["nprocs"] < 4 else (4, "exchange")
        single = next(
            r for r in rows if r["model"] == row["model"] and (r["nprocs"], r["halo"]) == base
        )
        table.append(
            [
                row["model"],
                row["atoms"],
                row["nprocs"],
                row["halo"],
                f"{row['time_s']:.2f}",
                f"{row['time_s'] / single['time_s']:.2f}",
                " / ".join(f"{m:.0f}" for m in row["peak_rss_mb"]),
                f"{max(row['peak_rss_mb']) / max(single['peak_rss_mb']):.2f}",
                " / ".join(str(e) for e in row["edges"]),
                f"{max(row['edges']) / max(single['edges']):.3f}",
            ]
        )
    lines += [markdown_table(header, table), ""]
    for family in dict.fromkeys(row["model"] for row in rows):
        exchange = next(
            r for r in rows if r["model"] == family and r["nprocs"] == 4 and r["halo"] == "exchange"
        )
        ghost = next(r for r in rows if r["model"] == family and r["halo"] == "ghost")
        ghost_edges, edges = sum(ghost["edges"]), sum(exchange["edges"])
        lines.append(
            f"* {family}, P = 4: the ghost baseline computes {ghost_edges / edges:.2f}× the "
            f"edges of zero redundancy, {ghost_edges} vs {edges} over the 4 workers "
            "(zero redundancy computes each of the structure's edges once)."
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict]):
    plt = pyplot()
    families = list(dict.fromkeys(row["model"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"P={r['nprocs']} {r['halo']}" for r in rows if r["model"] == families[0]]
    width = 0.8 / len(families)
    for i, family in enumerate(families):
        chosen = [r for r in rows if r["model"] == family]
        positions = [k + i * width for k in range(len(chosen))]
        axes[0].bar(positions, [max(r["peak_rss_mb"]) for r in chosen], width, label=family)
        axes[1].bar(positions, [max(r["edges"]) for r in chosen], width, label=family)
    for axis, title in zip(
        axes, ("largest worker peak RSS (MiB)", "largest worker edges"), strict=True
    ):
        axis.set_xticks([k + width * (len(families) - 1) / 2 for k in range(len(labels))])
        axis.set_xticklabels(labels)
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
