"""GPU exactness check: CHGNet and MACE in float64 on device="cuda" against upstream and the CPU.

    python benchmarks/gpu_check.py --out DIR                        # one GPU: < 5 min on an H100
    python benchmarks/gpu_check.py --out DIR --device cpu --quick   # the same code on the CPU

Models: pretrained CHGNet 0.3.0 on the float64 systems of tests/test_chgnet.py, and the
random-weight MACE that tests/test_mace.py builds (``build_model("residual_2x_L1_c3")``) on its
systems; the references are imported from those modules: upstream's single process on the CPU
(float64) and distmlip's P=1 on the CPU. Rows per model, on ``--device``:

* P=1, and P=2, 3 × slab/rcb/metis (the partitioners of the CPU tests); on "cuda" the P >= 2
  workers share the GPU(s) over ``backend="gloo"`` (halo transfers staged through the host);
* a Verlet-skin random walk (graphs reused between rebuilds) with the resident step
  (``resident=True``, the default on "cuda"), and the same walk with ``resident=False``;
  each step compared with a fresh CPU P=1 evaluation;
* activation checkpointing (``checkpoint=97``: several edge chunks per layer).

Every row must agree within 1e-11 relative (max |Δ| / max |reference| per property), and with
what it exercises (workers exchanged halos, graphs were reused and rebuilt, checkpointed regions
ran, the workers allocated GPU memory on "cuda"). Prints a PASS/FAIL table; DIR/gpu_check.json
(device name, torch and CUDA versions, every row) is rewritten after each row, so a run cut
short keeps what it measured. Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from conftest import relative_error, trajectory  # noqa: E402

from distmlip import DistributedCalculator  # noqa: E402
from distmlip.bench.report import machine_description  # noqa: E402
from distmlip.models import resolve_model  # noqa: E402

RTOL = 1e-11


class Case:
    """One model: what the workers load, its systems, how a calculator evaluates, references."""

    def __init__(self, name, model, structures, evaluate, upstream, walk, skin):
        self.name, self.model, self.structures = name, model, structures
        self.evaluate, self.upstream, self.walk, self.skin = evaluate, upstream, walk, skin


def chgnet_case() -> Case:
    import test_chgnet

    adapter = resolve_model("chgnet")
    names = test_chgnet.FLOAT64_STRUCTURES
    return Case(
        "chgnet",
        adapter,
        {name: test_chgnet.STRUCTURES[name] for name in names},
        test_chgnet._evaluate,
        lambda: test_chgnet.upstream_float64(adapter, names),
        trajectory(test_chgnet.crystal(), steps=8, step_size=0.07, seed=21),
        0.6,
    )


def mace_case(directory: Path) -> Case:
    import test_mace

    path = directory / "mace.model"
    torch.save(test_mace.build_model("residual_2x_L1_c3"), path)
    return Case(
        "mace",
        str(path),
        test_mace.STRUCTURES,
        lambda calc, atoms: test_mace.distributed(calc, atoms.copy),
        lambda: test_mace.upstream(str(path), "float64"),
        trajectory(test_mace.crystal(), steps=8, step_size=0.06, seed=31),
        0.5,
    )


def configurations(skin: float, quick: bool) -> list[dict]:
    rows = [dict(nprocs=1, partitioner="slab")]
    rows += [dict(nprocs=p, partitioner=m) for p in (2, 3) for m in ("slab", "rcb", "metis")]
    rows += [
        dict(nprocs=3, partitioner="rcb", skin=skin, resident=True),
        dict(nprocs=2, partitioner="slab", skin=skin, resident=False),
        dict(nprocs=2, partitioner="rcb", checkpoint=97),
    ]
    if quick:  # P=1, one P=3 partition, the resident walk, checkpointing
        rows = [rows[0], rows[6], rows[7], rows[9]]
    return rows


def worst(got: dict, expected: dict) -> float:
    return max(relative_error(got[key], value) for key, value in expected.items())


def check(case: Case, row: dict, device: str, upstream: dict, cpu: dict) -> dict:
    """One calculator: its worst errors against upstream and the CPU P=1, and what it ran."""
    options = dict(row, device=device, dtype="float64", timeout=300)
    if device == "cuda" and row["nprocs"] > 1:
        options["backend"] = "gloo"  # any number of workers on however many GPUs there are
    result = {"errors": {}, "problems": []}
    walk = "skin" in row
    with DistributedCalculator(case.model, **options) as calc:
        if walk:
            result["errors"]["cpu"] = max(
                worst(case.evaluate(calc, atoms), expected)
                for atoms, expected in zip(case.walk, cpu["walk"], strict=True)
            )
            result.update(builds=calc.graph_builds, reuses=calc.graph_reuses)
            if not (calc.graph_builds >= 2 and calc.graph_reuses >= 2):
                result["problems"].append("the walk did not both reuse and rebuild graphs")
            if calc.resident is not row["resident"]:
                result["problems"].append(f"resident is {calc.resident}")
        else:
            names = [n for n in case.structures if len(case.structures[n]()) >= row["nprocs"]]
            got = {name: case.evaluate(calc, case.structures[name]()) for name in names}
            result["errors"]["upstream"] = max(worst(got[n], upstream[n]) for n in names)
            result["errors"]["cpu"] = max(worst(got[n], cpu[n]) for n in names)
        stats = calc.last_stats
        if row["nprocs"] > 1 and not all(s["exchanges"] > 0 for s in stats):
            result["problems"].append("a worker exchanged no halo")
        if row.get("checkpoint") and not all(s["checkpoint_regions"] > 0 for s in stats):
            result["problems"].append("no checkpointed region ran")
        if device == "cuda":
            result["peak_gpu_mb"] = max(s.get("peak_gpu_mb", 0.0) for s in stats)
            if not result["peak_gpu_mb"] > 0:
                result["problems"].append("the workers allocated no GPU memory")
    result["passed"] = not result["problems"] and all(
        error <= RTOL for error in result["errors"].values()
    )
    return result


def label(row: dict) -> str:
    if "nprocs" not in row:
        return "references (upstream, CPU P=1)"
    text = f"P={row['nprocs']} {row['partitioner']}"
    if "skin" in row:
        text += f", skin {row['skin']} Å walk, resident={row['resident']}"
    if row.get("checkpoint"):
        text += f", checkpoint={row['checkpoint']}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="4 rows per model (a smoke run)")
    parser.add_argument(
        "--models", nargs="+", choices=["chgnet", "mace"], default=["chgnet", "mace"]
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no GPU; use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
        "machine": machine_description(args.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rtol": RTOL,
        "quick": args.quick,
        "rows": [],
    }
    print(f"gpu_check on {report['machine']}, torch {torch.__version__}", flush=True)

    def record(result: dict, model: str, row: dict, start: float) -> None:
        result.update(model=model, config=label(row), **row)
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["rows"].append(result)
        report["passed"] = all(r["passed"] for r in report["rows"])
        report["seconds"] = round(time.perf_counter() - began, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        print(format_row(result), flush=True)

    with tempfile.TemporaryDirectory() as directory:
        for model in args.models:
            start = time.perf_counter()
            try:
                case = chgnet_case() if model == "chgnet" else mace_case(Path(directory))
                upstream = case.upstream()
                with DistributedCalculator(case.model, nprocs=1, dtype="float64") as calc:
                    cpu = {n: case.evaluate(calc, make()) for n, make in case.structures.items()}
                    cpu["walk"] = [case.evaluate(calc, atoms) for atoms in case.walk]
            except Exception as error:  # e.g. a package missing: the other model still runs
                record(failure(error), model, {"references": "CPU"}, start)
                continue
            print(f"{model}: references in {time.perf_counter() - start:.0f} s", flush=True)
            for row in configurations(case.skin, args.quick):
                start = time.perf_counter()
                try:
                    result = check(case, row, args.device, upstream, cpu)
                except Exception as error:  # a failed row is reported, the others still run
                    result = failure(error)
                record(result, model, row, start)
    print_table(report)
    return 0 if report["passed"] else 1


def failure(error: Exception) -> dict:
    """A row that raised: the error's first line for the table, its traceback for the JSON."""
    first = (str(error).strip().splitlines() or [""])[0]
    problem = f"{type(error).__name__}: {first}"
    return {
        "errors": {},
        "problems": [problem],
        "passed": False,
        "traceback": traceback.format_exc(),
    }


def format_row(r: dict) -> str:
    def error(key):
        return f"{r['errors'][key]:.1e}" if key in r["errors"] else "-"

    gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
    reuse = f"{r['builds']}/{r['reuses']}" if "builds" in r else "-"
    verdict = "PASS" if r["passed"] else "FAIL " + "; ".join(r["problems"])[:200]
    return (
        f"{r['model']:<7}{r['config']:<46}{error('upstream'):>10}{error('cpu'):>10}"
        f"{reuse:>9}{gpu:>9}{r['seconds']:>7.1f}  {verdict}"
    )


def print_table(report: dict) -> None:
    print(f"\n{report['device_name']} ({report['machine']}), max relative error <= {RTOL:g}:")
    header = f"{'model':<7}{'configuration':<46}{'upstream':>10}{'CPU P=1':>10}"
    print(header + f"{'built/re':>9}{'GPU MB':>9}{'s':>7}  verdict")
    for row in report["rows"]:
        print(format_row(row))
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"{verdict}: {sum(r['passed'] for r in report['rows'])}/{len(report['rows'])} rows, "
          f"{report['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
