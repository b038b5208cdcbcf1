"""Worker start-up and shut-down: CPU workers forked from a zygote vs fresh interpreters.

For each model family, P = 2 CPU workers (float32), the seconds ``WorkerPool.start()`` takes
until every worker has loaded the model and joined the group: the first start of the process
(with ``fork`` this includes starting the zygote, which imports torch and the model's package)
and the fastest of ``--restarts`` later starts (a second calculator, a pool restarted after a
failure or an interrupted call); and the fastest ``WorkerPool.close()``.
``DISTMLIP_WORKER_START`` selects the method; each method runs in its own process, so neither
finds the other's imports.

Workers end with ``os._exit`` (``distmlip.worker.main.exit_process``) instead of the interpreter's
shutdown; a second table measures what that saves: a process that imports torch and the
family's package, ended by the interpreter's shutdown vs by ``os._exit`` (fastest of three).

Models: the reference model, CHGNet 0.3.0 (shipped weights), MACE of MACE-MP-medium shape,
TensorNet and eSEN (random weights of the shapes in benchmarks/mace_scaling.py and
benchmarks/model_families.py).

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

from distmlip.bench.report import machine_description, markdown_table, write_report  # noqa: E402

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
    from distmlip.driver.pool import WorkerPool

    durations, closes = [], []
    start_pool, close_pool = WorkerPool.start, WorkerPool.close

    def timed(pool) -> None:
        start = time.perf_counter()
        start_pool(pool)
        durations.append(time.perf_counter() - start)

    def timed_close(pool, wait=None) -> None:
        start = time.perf_counter()
        close_pool(pool, wait)
        closes.append(time.perf_counter() - start)

    WorkerPool.start, WorkerPool.close = timed, timed_close
    with tempfile.TemporaryDirectory() as directory:
        built = model(family, Path(directory))
        with DistributedCalculator(built, nprocs=2, dtype="float32", timeout=600) as calc:
            for _ in range(restarts):
                calc.pool.close()
                calc.pool.start()
    return {
        "first_s": durations[0],
        "restart_s": min(durations[1:]),
        "restarts": durations[1:],
        "close_s": min(closes),
    }


PACKAGES = {
    "reference": "torch",
    "chgnet": "torch, chgnet.model",
    "mace": "torch, mace.modules",
    "tensornet": "torch, matgl",
    "esen": "torch, fairchem.core",
}
"""What a worker of each family imports (besides distmlip)."""


def shutdown_cost(family: str, repeats: int = 3) -> dict:
    """Wall seconds of ``python -c "import PACKAGES"`` ended by the interpreter's shutdown
    and by ``os._exit``, fastest of ``repeats`` each."""
    seconds = {}
    for ending, suffix in (("shutdown", ""), ("os_exit", "; import os; os._exit(0)")):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", f"import {PACKAGES[family]}{suffix}"],
                check=True,
                capture_output=True,
            )
            runs.append(time.perf_counter() - start)
        seconds[ending] = min(runs)
    return seconds


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
    rows, results, shutdown_rows, shutdowns = [], {}, [], {}
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
                f"{fresh['close_s']:.3f}",
                f"{forked['close_s']:.3f}",
            ]
        )
        shutdowns[family] = cost = shutdown_cost(family)
        shutdown_rows.append(
            [
                family,
                PACKAGES[family],
                f"{cost['shutdown']:.2f}",
                f"{cost['os_exit']:.2f}",
                f"{cost['shutdown'] - cost['os_exit']:.2f}",
            ]
        )
    header = [
        "family",
        "first start, fresh (s)",
        "first start, fork (s)",
        "restart, fresh (s)",
        "restart, fork (s)",
        "restart fresh / fork",
        "close, fresh (s)",
        "close, fork (s)",
    ]
    shutdown_header = ["family", "imports", "shutdown (s)", "os._exit (s)", "saved per process (s)"]
    markdown = (
        "# Worker start-up, P = 2 CPU workers: fresh interpreters vs forks of a zygote\n\n"
        f"{machine_description()}\n\n{markdown_table(header, rows)}\n\n"
        "First start: the process's first pool (with fork, the zygote's start included); "
        f"restart: the fastest of {args.restarts} later starts; close: the fastest "
        "`WorkerPool.close()`.\n\n"
        "## Ending a process: the interpreter's shutdown vs `os._exit`\n\n"
        "Workers end with `os._exit` once their output is flushed. What the interpreter's "
        "shutdown would cost instead, per worker (a pool's close waits for it), measured as "
        '`python -c "import IMPORTS"` ending normally vs ending with `os._exit` (fastest '
        "of 3):\n\n"
        f"{markdown_table(shutdown_header, shutdown_rows)}\n"
    )
    payload = {
        "machine": machine_description(),
        "results": [
            {"family": family, "method": method, **values}
            for (family, method), values in results.items()
        ],
        "shutdown_s": shutdowns,
    }
    for path in write_report(args.out, "worker_start", payload=payload, markdown=markdown):
        print(path)


if __name__ == "__main__":
    main()
