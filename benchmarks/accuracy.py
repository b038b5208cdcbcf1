"""Accuracy of the distributed adapters against their upstream packages' single process.

Writes the accuracy tables of docs/chgnet.md, docs/mace.md, docs/tensornet.md and
docs/esen.md. Every (dtype, P, partitioner) of the matrix evaluates the systems of the model's
test module (``tests/test_<model>.py``; eSEN: ``tests/test_fairchem.py``), the same builders
and the same upstream references, imported from there, so the table measures what the tests
check, and records the worst error over the systems, per property:

* float64: relative, max |distributed − upstream| / max |upstream| (upstream in float64 too);
* float32: absolute, against upstream in float32 (energy per atom, eV; forces eV/Å; stress
  GPa; per-atom energies eV; magmoms μB).

    python benchmarks/accuracy.py --model chgnet mace tensornet esen --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import relative_error  # noqa: E402

from distmlip import DistributedCalculator  # noqa: E402
from distmlip.bench.report import machine_description, markdown_table, write_report  # noqa: E402

GPA = 160.21766208  # GPa per eV/Å³ (ase.units.GPa is its inverse)
FLOAT64_MATRIX = [(1, "slab")] + [(p, m) for p in (2, 3, 4, 8) for m in ("slab", "rcb", "metis")]
FLOAT32_MATRIX = [(1, "slab")] + [(p, m) for p in (2, 3, 4) for m in ("slab", "rcb", "metis")]


def absolute(key: str, value, reference, n_atoms: int) -> float:
    error = float(np.abs(np.asarray(value, dtype=float) - np.asarray(reference)).max())
    if key == "energy":
        return error / n_atoms
    if key == "stress":
        return error * GPA
    return error


class CHGNetCase:
    """CHGNet 0.3.0 (shipped weights) on the six systems of tests/test_chgnet.py."""

    name = "chgnet"
    keys = ("energy", "energies", "forces", "stress", "magmoms")
    units = {"energy": "eV/atom", "energies": "eV", "forces": "eV/Å", "stress": "GPa"}

    def __init__(self):
        import test_chgnet

        self.tests = test_chgnet
        self.adapter = test_chgnet.resolve_model("chgnet")
        self.structures = test_chgnet.STRUCTURES

    def upstream(self, dtype: str) -> dict:
        if dtype == "float64":  # upstream made float64 throughout (see the test module)
            return self.tests.upstream_float64(self.adapter)
        return {
            n: self.tests._upstream(self.adapter.model, b()) for n, b in self.structures.items()
        }

    def calculator(self, nprocs: int, partitioner: str, dtype: str):
        return DistributedCalculator(
            self.adapter, nprocs=nprocs, partitioner=partitioner, dtype=dtype
        )

    def evaluate(self, calc, name: str) -> dict:
        return self.tests._evaluate(calc, self.structures[name]())


class MACECase:
    """A random-weight ScaleShiftMACE (2 residual layers, correlation 3, L=1 features, ZBL)
    on the five systems of tests/test_mace.py; stress compared as the virial σ·V."""

    name = "mace"
    keys = ("energy", "energies", "forces", "virial")
    units = {"energy": "eV/atom", "energies": "eV", "forces": "eV/Å", "virial": "eV"}
    shape = "residual_2x_L1_c3"

    def __init__(self, directory: Path):
        import test_mace

        self.tests = test_mace
        self.path = directory / f"{self.shape}.model"
        test_mace.torch.save(test_mace.build_model(self.shape), self.path)
        self.structures = test_mace.STRUCTURES

    def upstream(self, dtype: str) -> dict:
        return self.tests.upstream(str(self.path), dtype)

    def calculator(self, nprocs: int, partitioner: str, dtype: str):
        return DistributedCalculator(
            str(self.path), nprocs=nprocs, partitioner=partitioner, dtype=dtype
        )

    def evaluate(self, calc, name: str) -> dict:
        return self.tests.distributed(calc, self.structures[name])


class TensorNetCase:
    """A random-weight TensorNet in a matgl Potential on the four systems of
    tests/test_tensornet.py (stress for the periodic ones)."""

    name = "tensornet"
    keys = ("energy", "forces", "stress")
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "GPa"}

    def __init__(self):
        import test_tensornet

        self.tests = test_tensornet
        self.potential = test_tensornet.build_potential()
        self.structures = test_tensornet.STRUCTURES

    def upstream(self, dtype: str) -> dict:
        return self.tests.upstream(self.potential, dtype)

    def calculator(self, nprocs: int, partitioner: str, dtype: str):
        from distmlip.models.tensornet import TensorNetAdapter

        return DistributedCalculator(
            TensorNetAdapter(self.potential), nprocs=nprocs, partitioner=partitioner, dtype=dtype
        )

    def evaluate(self, calc, name: str) -> dict:
        return calc.get_properties(list(self.keys), self.structures[name]())


class ESENCase:
    """A random-weight eSEN (fairchem eSCNMDBackbone + MLP_EFS_Head, 2 blocks, lmax 2) loaded
    from a fairchem checkpoint, on the four systems of tests/test_fairchem.py (stress for the
    periodic ones); upstream is fairchem's FAIRChemCalculator at the same precision."""

    name = "esen"
    test_module = "test_fairchem"
    keys = ("energy", "forces", "stress")
    units = {"energy": "eV/atom", "forces": "eV/Å", "stress": "GPa"}

    def __init__(self, directory: Path):
        import fairchem_models
        import test_fairchem

        self.tests, self.models = test_fairchem, fairchem_models
        self.path = fairchem_models.write_esen_checkpoint(directory / "esen.pt")
        self.structures = test_fairchem.STRUCTURES

    def upstream(self, dtype: str) -> dict:
        unit = self.models.predict_unit(self.path, dtype)
        return {name: self.tests.upstream(unit, name) for name in self.structures}

    def calculator(self, nprocs: int, partitioner: str, dtype: str):
        return DistributedCalculator(
            str(self.path), nprocs=nprocs, partitioner=partitioner, dtype=dtype
        )

    def evaluate(self, calc, name: str) -> dict:
        return calc.get_properties(list(self.keys), self.structures[name]())


CASES = {
    "chgnet": CHGNetCase,
    "mace": MACECase,
    "tensornet": TensorNetCase,
    "esen": ESENCase,
}


def measure(case, dtype: str, matrix: list[tuple[int, str]]) -> tuple[list[dict], list[str]]:
    """Worst errors per configuration, and the systems compared."""
    reference = case.upstream(dtype)
    rows = []
    for nprocs, partitioner in matrix:
        start = time.perf_counter()
        worst = dict.fromkeys(case.keys, 0.0)
        with case.calculator(nprocs, partitioner, dtype) as calc:
            for name, expected in reference.items():
                n_atoms = len(case.structures[name]())
                if n_atoms < nprocs:
                    continue  # more workers than atoms is refused
                got = case.evaluate(calc, name)
                for key in case.keys:
                    if key not in expected:
                        continue  # no stress without a cell
                    if dtype == "float64":
                        error = relative_error(got[key], expected[key])
                    else:
                        error = absolute(key, got[key], expected[key], n_atoms)
                    worst[key] = max(worst[key], error)
        rows.append({"dtype": dtype, "nprocs": nprocs, "partitioner": partitioner, **worst})
        print(
            f"{case.name} {dtype} P={nprocs} {partitioner}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return rows, list(reference)


def markdown(case, rows: list[dict], systems: dict[str, list[str]]) -> str:
    lines = [
        f"# Accuracy: distributed {case.name} vs upstream single process",
        "",
        f"Machine: {machine_description()}. Worst case over the systems of "
        f"`tests/{getattr(case, 'test_module', 'test_' + case.name)}.py` named under each table.",
        "",
    ]
    for dtype, what in (
        ("float64", "relative error, max |Δ| / max |upstream| (upstream in float64)"),
        ("float32", "absolute error against upstream in float32"),
    ):
        chosen = [row for row in rows if row["dtype"] == dtype]
        if not chosen:
            continue
        if dtype == "float64":
            header = ["P", "partitioner", *case.keys]
        else:
            header = ["P", "partitioner", *(f"{k} ({case.units.get(k, 'μB')})" for k in case.keys)]
        table = [
            [row["nprocs"], row["partitioner"], *(f"{row[k]:.1e}" for k in case.keys)]
            for row in chosen
        ]
        lines += [
            f"## {dtype}: {what}",
            "",
            f"Systems: {', '.join(systems[dtype])}.",
            "",
            markdown_table(header, table),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(CASES), default=["chgnet"])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--quick", action="store_true", help="P ∈ {1, 2} only (a smoke run)")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        for model in args.model:
            takes_directory = model in ("mace", "esen")
            case = CASES[model](Path(directory)) if takes_directory else CASES[model]()
            rows, systems = [], {}
            for dtype, matrix in (("float64", FLOAT64_MATRIX), ("float32", FLOAT32_MATRIX)):
                if args.quick:
                    matrix = [entry for entry in matrix if entry[0] <= 2][:2]
                dtype_rows, systems[dtype] = measure(case, dtype, matrix)
                rows += dtype_rows
            payload = {
                "model": model,
                "machine": machine_description(),
                "systems": systems,
                "rows": rows,
            }
            write_report(
                args.out,
                f"accuracy_{model}",
                payload=payload,
                markdown=markdown(case, rows, systems),
            )


if __name__ == "__main__":
    main()
