"""One worker process: start-up, the request loop, each call's graph and its evaluation.

Modules: ``main`` (set-up and the request loop; ``python -m distmlip.worker FD`` runs it),
``builders`` (each call's graph: partition, local graph, halo plan, ``prepare``; Verlet-skin
reuse), ``resident`` (the same in torch on the worker's device), ``engine`` (``evaluate``:
energies, forces and virial), ``store`` (the structure kept for positions-only requests),
``memory`` (the memory bound, per-call peaks, out-of-memory reports), ``zygote`` (the
pre-started interpreter CPU workers are forked from). Never imported by the driver.
"""
