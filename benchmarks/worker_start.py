"""Worker start-up: CPU workers forked from a zygote vs fresh interpreters, side by side.

For each model family, P = 2 CPU workers (float32), the seconds ``WorkerPool.start()`` takes
until every worker has loaded the model and joined the group: the first start of the process
(with ``fork`` this includes starting the zygote, which imports torch and the model's package)
and the fastest of ``--restarts`` later starts (a second calculator, a pool restarted after a
failure or an interrupted call). ``DISTMLIP_WORKER_START`` selects the method; each method runs
in its own process, so neither finds the other's imports. Models: the reference model, CHGNet
0.3.0 (shipped weights), MACE of MACE-MP-medium shape, TensorNet and eSEN (random weights of
the shapes in benchmarks/mace_scaling.py and benchmarks/model_families.py).

    python benchmarks/worker_start.py --out docs/benchmarks
    python benchmarks/worker_start.py --families reference chgnet --restarts 2   # quicker

Writes ``<out>/worker_start.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MATGL_BACKEND", "PYG")

from distmlip.report import machine_description, markdown_table, write_report  # noqa: E402

FAMILIES = ("reference", "chgnet", "mace", "tensornet", "esen")


def model(family: str, directory: Path):
    if family in ("reference", "chgnet"):
        return family
    if family == "mace":
        import torch
        from mace_scaling import build_model

        path = directory / "mace_medium.model"
        torch.save(build_model(), path)
        return str(path)
    from model_families import esen_model, tensornet_model

    return tensornet_model() if family == "tensornet" else esen_model(directory)


def measure(family: str, restarts: int) -> dict:
    """In this process: the first start and the later ones, in seconds."""
    from distmlip import DistributedCalculator
    from distmlip.launch import WorkerPool

    durations = []
    start_pool = WorkerPool.start

    def timed(pool) -> None:
        start = time.perf_counter()
        start_pool(pool)
        durations.append(time.perf_counter() - start)

    WorkerPool.start = timed
    with tempfile.TemporaryDirectory() as directory:
        built = model(family, Path(directory))
        with DistributedCalculator(built, nprocs=2, dtype="float32", timeout=600) as calc:
            for _ in range(restarts):
                calc.pool.close()
                calc.pool.start()
    return {"first_s": durations[0], "restart_s": min(durations[1:]), "restarts": durations[1:]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child run: one family, one method, JSON on the last line
        print(json.dumps(measure(args.one[0], args.restarts)))
        return
    rows, results = [], {}
    for family in args.families:
        for method in ("exec", "fork"):
            environment = {**os.environ, "DISTMLIP_WORKER_START": method}
            command = [sys.executable, __file__, "--one", family, method]
            command += ["--restarts", str(args.restarts)]
            output = subprocess.run(
                command, env=environment, capture_output=True, text=True, check=True
            )
            results[family, method] = json.loads(output.stdout.strip().splitlines()[-1])
            print(family, method, results[family, method])
        fresh, forked = results[family, "exec"], results[family, "fork"]
        rows.append(
            [
                family,
                f"{fresh['first_s']:.2f}",
                f"{forked['first_s']:.2f}",
                f"{fresh['restart_s']:.2f}",
                f"{forked['restart_s']:.3f}",
                f"{fresh['restart_s'] / forked['restart_s']:.0f}×",
            ]
        )
    header = [
        "family",
        "first start, fresh (s)",
        "first start, fork (s)",
        "restart, fresh (s)",
        "restart, fork (s)",
        "restart fresh / fork",
    ]
    markdown = (
        "# Worker start-up, P = 2 CPU workers: fresh interpreters vs forks of a zygote\n\n"
        f"{machine_description()}\n\n{markdown_table(header, rows)}\n\n"
        "First start: the process's first pool (with fork, the zygote's start included); "
        f"restart: the fastest of {args.restarts} later starts.\n"
    )
    payload = {
        "machine": machine_description(),
        "results": [
            {"family": family, "method": method, **values}
            for (family, method), values in results.items()
        ],
    }
    for path in write_report(args.out, "worker_start", payload=payload, markdown=markdown):
        print(path)


if __name__ == "__main__":
    main()
