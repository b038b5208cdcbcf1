"""The driver's side: the pool of workers it starts, talks to and stops.

Modules: ``pool`` (:class:`~distmlip.driver.pool.WorkerPool`: start, request, collect, stop,
restart after failures), ``processes`` (handles on local children and remote ranks, reply
collection, heartbeats), ``sender`` (positions-only requests), ``zygote`` (forking CPU workers
from a pre-started interpreter), ``failures`` (a worker's failure as one line). Imports
neither :mod:`distmlip.worker` nor :mod:`distmlip.exchange`: what crosses is in
:mod:`distmlip.messages`.
"""
