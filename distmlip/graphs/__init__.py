"""Atom graphs, in numpy: the replicated structure, the neighbour search, partitions, each
worker's local graph and halo plan, input checks, carved pieces and the ghost baseline's graph.

Modules: ``structure`` (:class:`Structure`, the edge list), ``neighbors`` (vesin neighbour
lists, binning), ``partition`` (slab, rcb, metis), ``halo`` (local graphs, halo plans),
``validate`` (what a structure must satisfy), ``carving`` (smaller pieces of a structure, for
calibration), ``ghost`` (the ghost baseline's graph). Imports nothing of distmlip but
:mod:`distmlip.trace`.
"""
