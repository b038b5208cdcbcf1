"""Halo rows and bytes exchanged per message-passing layer vs P (docs/multinode.md).

Counted from the halo plans themselves (the same :func:`distmlip.graphs.halo.build_local_graph` the
workers run), not timed: each layer, worker p receives one row per halo atom from the peer
that owns it, and only from peers it shares an edge with (point to point). Bytes are rows
times the bytes of one row: ``--row-bytes`` (default 256: 64 float32 channels, CHGNet's atom
features, or the reference model's 32 float64). ``tests/test_docs.py`` checks the counting
against the bytes a traced call of real workers sent.

These are atom rows of one forward exchange. A call with forces sends about as much again in
the backward pass (the gradients of the same rows), and CHGNet also exchanges bond rows:
``--measure`` adds what real workers sent in one energy-and-forces call (their traces), per
model and P, side by side.

Strong scaling: one system, more workers (total traffic grows, each worker's shrinks). Weak
scaling: a fixed number of atoms per worker; with RCB each worker's traffic and number of peers
stay flat as P grows, which is what lets a job spread over many nodes.

    python benchmarks/exchange_volume.py --measure reference chgnet --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distmlip.bench.report import markdown_table, pyplot, write_report  # noqa: E402
from distmlip.bench.systems import crystal  # noqa: E402
from distmlip.graphs.halo import build_local_graph  # noqa: E402
from distmlip.graphs.partition import partition  # noqa: E402
from distmlip.graphs.structure import Structure  # noqa: E402

COLUMNS = (
    "scaling",
    "atoms",
    "partitioner",
    "P",
    "atoms/worker",
    "rows/layer (all workers)",
    "rows/layer per worker, max",
    "peers per worker, max",
    "MB/layer (all)",
    "MB/layer per worker, max",
)


def halo_matrix(structure: Structure, nprocs: int, partitioner: str, cutoff: float):
    """(P, P) int64: rows worker p receives from worker q per layer (sent by q to p)."""
    owner = partition(structure, nprocs, partitioner, cutoff)
    return np.stack(
        [build_local_graph(structure, owner, p, nprocs, cutoff).recv_counts for p in range(nprocs)]
    )


def row(scaling: str, atoms, nprocs: int, partitioner: str, cutoff: float, row_bytes: int):
    matrix = halo_matrix(Structure.from_ase(atoms), nprocs, partitioner, cutoff)
    received, sent = matrix.sum(axis=1), matrix.sum(axis=0)
    peers = np.maximum((matrix > 0).sum(axis=1), (matrix > 0).sum(axis=0))
    per_worker = int(np.maximum(received, sent).max())
    return {
        "scaling": scaling,
        "atoms": len(atoms),
        "partitioner": partitioner,
        "P": nprocs,
        "rows": int(matrix.sum()),
        "rows_per_worker_max": per_worker,
        "peers_max": int(peers.max()),
        "mb": matrix.sum() * row_bytes / 1e6,
        "mb_per_worker_max": per_worker * row_bytes / 1e6,
    }


MEASURED_COLUMNS = (
    "model",
    "atoms",
    "partitioner",
    "P",
    "exchanges/call",
    "MB/call (all workers)",
    "MB/call per worker, max",
    "atom halo rows (all workers)",
)


def measure(model: str, atoms, nprocs: int, partitioner: str) -> dict:
    """Bytes real workers sent in one float32 energy-and-forces call (their traces)."""
    from distmlip import DistributedCalculator
    from distmlip.models import resolve_model

    adapter = resolve_model(model)
    with DistributedCalculator(
        adapter, nprocs=nprocs, partitioner=partitioner, dtype="float32", trace=True
    ) as calc:
        calc.get_properties(["energy", "forces"], atoms)
        sent = [
            [e["bytes_sent"] for e in record.events if e["name"] == "exchange"]
            for record in calc.last_traces
        ]
    matrix = halo_matrix(Structure.from_ase(atoms), nprocs, partitioner, adapter.cutoff)
    forward = [len(record) for record in sent]
    return {
        "model": model,
        "atoms": len(atoms),
        "partitioner": partitioner,
        "P": nprocs,
        "exchanges": max(forward),
        "mb": sum(map(sum, sent)) / 1e6,
        "mb_per_worker_max": max(map(sum, sent)) / 1e6,
        "atom_rows": int(matrix.sum()),
    }


def measured_markdown(rows: list[dict]) -> str:
    table = markdown_table(
        MEASURED_COLUMNS,
        [
            (
                r["model"],
                f"{r['atoms']:,}",
                r["partitioner"],
                r["P"],
                r["exchanges"],
                f"{r['mb']:.2f}",
                f"{r['mb_per_worker_max']:.3f}",
                f"{r['atom_rows']:,}",
            )
            for r in rows
        ],
    )
    return (
        "Measured: bytes real workers sent in one float32 energy-and-forces call (every halo "
        "exchange of the forward and backward passes, all row kinds: atoms, and CHGNet's bonds), "
        "fcc Cu rattled 0.03 Å, and the atom halo rows of its plan.\n\n" + table
    )


def markdown(rows: list[dict], cutoff: float, row_bytes: int) -> str:
    table = markdown_table(
        COLUMNS,
        [
            (
                r["scaling"],
                f"{r['atoms']:,}",
                r["partitioner"],
                r["P"],
                f"{r['atoms'] // r['P']:,}",
                f"{r['rows']:,}",
                f"{r['rows_per_worker_max']:,}",
                r["peers_max"],
                f"{r['mb']:.2f}",
                f"{r['mb_per_worker_max']:.3f}",
            )
            for r in rows
        ],
    )
    return (
        f"Halo rows exchanged per message-passing layer, fcc Cu, cutoff {cutoff:g} Å, "
        f"{row_bytes} bytes per row (per worker: the larger of what it sends and receives).\n\n"
        + table
    )


def figure(rows: list[dict]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, scaling in zip(axes, ("strong", "weak"), strict=True):
        for partitioner in sorted({r["partitioner"] for r in rows}):
            chosen = [
                r for r in rows if r["scaling"] == scaling and r["partitioner"] == partitioner
            ]
            ax.plot(
                [r["P"] for r in chosen],
                [r["mb_per_worker_max"] for r in chosen],
                marker="o",
                label=partitioner,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("P (workers)")
        ax.set_ylabel("MB per layer, busiest worker")
        first = next(r for r in rows if r["scaling"] == scaling)
        per_worker = f"~{first['atoms'] // first['P']:,} atoms/worker"
        title = f"{first['atoms']:,} atoms" if scaling == "strong" else per_worker
        ax.set_title(f"{scaling} scaling ({title})")
        ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--partitioners", nargs="+", default=["slab", "rcb"])
    parser.add_argument("--atoms", type=int, default=32_000, help="strong scaling system")
    parser.add_argument("--atoms-per-worker", type=int, default=2_000, help="weak scaling")
    parser.add_argument("--cutoff", type=float, default=6.0, help="Å (CHGNet's atom graph)")
    parser.add_argument("--row-bytes", type=int, default=256)
    parser.add_argument(
        "--measure", nargs="*", default=[], help="models whose real workers' bytes to measure"
    )
    parser.add_argument("--measure-nprocs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--measure-atoms", type=int, default=864)
    parser.add_argument("--out", type=Path, help="directory for JSON, markdown and PNG")
    args = parser.parse_args(argv)
    rows = []
    for partitioner in args.partitioners:
        strong = crystal("cu", n_atoms=args.atoms)
        for nprocs in args.nprocs:
            rows.append(row("strong", strong, nprocs, partitioner, args.cutoff, args.row_bytes))
            weak = crystal("cu", n_atoms=args.atoms_per_worker * nprocs)
            rows.append(row("weak", weak, nprocs, partitioner, args.cutoff, args.row_bytes))
            print(rows[-2], rows[-1], sep="\n", file=sys.stderr)
    rows.sort(key=lambda r: (r["scaling"] != "strong", r["partitioner"], r["P"]))
    text = markdown(rows, args.cutoff, args.row_bytes)
    measured = []
    for model in args.measure:
        atoms = crystal("cu", n_atoms=args.measure_atoms, rattle=0.03)
        for nprocs in args.measure_nprocs:
            measured.append(measure(model, atoms, nprocs, "rcb"))
            print(measured[-1], file=sys.stderr)
    if measured:
        text += "\n\n" + measured_markdown(measured)
    print(text)
    if args.out:
        payload = {
            "cutoff": args.cutoff,
            "row_bytes": args.row_bytes,
            "rows": rows,
            "measured": measured,
        }
        write_report(
            args.out, "exchange_volume", payload=payload, markdown=text, figure=lambda: figure(rows)
        )


if __name__ == "__main__":
    main()
