"""``python -m distmlip._worker FD``: the process a :class:`~distmlip.launch.WorkerPool` starts."""

import sys
from multiprocessing.connection import Connection

from distmlip.launch import _worker_main

if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[1])))
