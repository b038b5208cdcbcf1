"""``distmlip bench``'s report: extrapolated capacity, the markdown table and the plots, written
(JSON, markdown, PNG) under ``--out`` as configurations finish (:func:`write`)."""

from __future__ import annotations

import numpy as np

from distmlip.bench.report import machine_description, markdown_table, pyplot, write_report

__all__ = ["capacity", "write", "BENCH_COLUMNS", "COMMUNICATION_DEFINITIONS"]


def capacity(rows: list[dict], budget_mb: float) -> dict[tuple[str, int], float]:
    """Extrapolated largest N per (halo, P) whose per-worker peak fits ``budget_mb``."""
    result = {}
    for key in sorted({(r["halo"], r["nprocs"]) for r in rows}):
        group = [r for r in rows if (r["halo"], r["nprocs"]) == key]
        held = np.array([max(np.add(r["owned_atoms"], r["halo_atoms"])) for r in group], float)
        peak = np.array([max(r["peak_rss_mb"]) for r in group])
        if len(group) < 2 or np.ptp(held) == 0:
            continue
        slope, base = np.polyfit(held, peak, 1)
        held_per_atom = np.mean(held / np.array([r["atoms"] for r in group]))
        result[key] = max(0.0, (budget_mb - base) / slope / held_per_atom) if slope > 0 else 0.0
    return result


BENCH_COLUMNS = (
    "atoms",
    "P",
    "partitioner",
    "halo",
    "time (s)",
    "×single",
    "preprocess (s)",
    "forward (s)",
    "backward (s)",
    "comm/worker (s)",
    "comm % critical path",
    "comm % largest",
    "imbalance (s)",
    "peak/worker (MB)",
    "×single",
    "computed atoms/worker",
    "edges/worker",
    "halo/worker",
    "bytes/exchange",
    "forward compute between exchanges (s)",
)


COMMUNICATION_DEFINITIONS = (
    "Time and phases are the fastest of the repeats; phases (preprocess, forward, backward, "
    "forward compute) are those of the critical worker, the one with the most compute "
    "(forward + backward + forces − communication), which the others wait for. "
    "*comm/worker*: seconds each worker spent posting and waiting on exchanges. "
    "*comm % critical path*: the critical worker's communication as a share of the step: "
    "the exchange cost the step could not hide. *comm % largest*: the largest worker's share: "
    "transfer plus waiting for the critical worker. *imbalance*: max − min compute over the "
    "workers, the waiting that comes from unequal partitions."
)


def _table_row(row: dict, single: dict | None) -> list[str]:
    """One configuration's cells of :data:`BENCH_COLUMNS`; ratios against ``single`` (P = 1)."""
    t_ratio = f"{row['time_s'] / single['time_s']:.2f}" if single else "–"
    m_ratio = f"{max(row['peak_rss_mb']) / max(single['peak_rss_mb']):.2f}" if single else "–"
    per_exchange = [b for log in row["bytes_per_exchange"] for b in log]
    mean_bytes = f"{np.mean(per_exchange) / 1e6:.2f} MB" if per_exchange else "0"
    return [
        f"{row['atoms']}",
        f"{row['nprocs']}",
        row["partitioner"],
        row["halo"],
        f"{row['time_s']:.2f}",
        t_ratio,
        f"{row['preprocess_s']:.2f}",
        f"{row['forward_s']:.2f}",
        f"{row['backward_s']:.2f}",
        " / ".join(f"{c:.3f}" for c in row["communication_s"]),
        f"{100 * row['critical_path_fraction']:.1f}",
        f"{100 * row['largest_fraction']:.1f}",
        f"{row['imbalance_s']:.3f}",
        f"{max(row['peak_rss_mb']):.0f}",
        m_ratio,
        f"{max(row['computed_atoms'])}",
        f"{max(row['edges'])}",
        f"{max(row['halo_atoms'])}",
        mean_bytes,
        " / ".join(f"{t:.3f}" for t in row["forward_segments_s"]),
    ]


def _markdown(rows: list[dict], caps: dict, config, machine: str) -> str:
    single = {r["atoms"]: r for r in rows if r["nprocs"] == 1 and r["halo"] == "exchange"}
    lines = [
        f"# distmlip bench: {config.model} on {config.crystal}, {config.dtype}, "
        f"{config.total_threads} threads in total per configuration",
        "",
        f"Machine: {machine}.",
        "",
        markdown_table(BENCH_COLUMNS, [_table_row(r, single.get(r["atoms"])) for r in rows]),
        "",
        COMMUNICATION_DEFINITIONS,
    ]
    if caps:
        lines += [
            "",
            f"Extrapolated capacity (largest N with per-worker peak ≤ "
            f"{config.memory_budget_gb:g} GB; linear fit of peak RSS vs atoms held):",
            "",
            markdown_table(
                ("halo", "P", "atoms"), [(h, p, f"{n:,.0f}") for (h, p), n in caps.items()]
            ),
        ]
    return "\n".join(lines) + "\n"


def _figure(rows: list[dict], caps: dict, title: str):
    """Strong scaling, memory per worker, communication share and capacity, 2 × 2 panels."""
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    (scaling, memory), (comm, cap) = axes
    largest = max(r["atoms"] for r in rows)
    for halo, marker in (("exchange", "o"), ("ghost", "s")):
        for part in sorted({r["partitioner"] for r in rows}):
            pts = sorted(
                (r["nprocs"], r["time_s"])
                for r in rows
                if r["atoms"] == largest and r["halo"] == halo and r["partitioner"] == part
            )
            if pts:
                scaling.plot(*zip(*pts, strict=True), marker=marker, label=f"{halo}/{part}")
            mem = sorted(
                (r["atoms"], max(r["peak_rss_mb"]) / 1024, r["nprocs"])
                for r in rows
                if r["halo"] == halo and r["partitioner"] == part
            )
            for nprocs in sorted({m[2] for m in mem}):
                series = [(a, m) for a, m, p in mem if p == nprocs]
                memory.plot(
                    *zip(*series, strict=True), marker=marker, label=f"{halo}/{part} P={nprocs}"
                )
            chosen = sorted(
                (r["nprocs"], 100 * r["critical_path_fraction"], 100 * r["largest_fraction"])
                for r in rows
                if r["atoms"] == largest and r["halo"] == halo and r["partitioner"] == part
            )
            if chosen:
                nprocs, critical, worst = zip(*chosen, strict=True)
                comm.plot(nprocs, critical, marker=marker, label=f"{halo}/{part} critical path")
                comm.plot(
                    nprocs, worst, marker=marker, linestyle=":", label=f"{halo}/{part} largest"
                )
    scaling.set(xlabel="P", ylabel="time per evaluation (s)", title=f"strong scaling, N={largest}")
    memory.set(
        xlabel="atoms",
        ylabel="peak RSS per worker (GB)",
        xscale="log",
        yscale="log",
        title="memory per worker",
    )
    comm.set(xlabel="P", ylabel="communication (% of step)", title=f"N={largest}")
    if caps:
        labels = [f"{h}\nP={p}" for h, p in caps]
        cap.bar(labels, [n for n in caps.values()])
        cap.set(ylabel="atoms", title="extrapolated capacity")
    for axis in (scaling, memory, comm):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write(config, rows: list[dict], plot: bool) -> None:
    """Rows so far (and the plot if ``plot``) under ``config.out``, if set."""
    if config.out is None or not rows:
        return
    caps = capacity(rows, config.memory_budget_gb * 1024)
    machine = machine_description(config.device)
    write_report(
        config.out,
        f"bench_{config.model}_{config.crystal}",
        payload={
            "config": {k: str(v) for k, v in vars(config).items()},
            "machine": machine,
            "rows": rows,
            "capacity": {f"{h}/P={p}": n for (h, p), n in caps.items()},
        },
        markdown=_markdown(rows, caps, config, machine),
        figure=(lambda: _figure(rows, caps, f"{config.model} on {config.crystal}"))
        if plot
        else None,
        dpi=110,
    )
