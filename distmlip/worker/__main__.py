"""``python -m distmlip.worker FD``: the process a :class:`~distmlip.driver.pool.WorkerPool`
starts."""

import signal
import sys

if __name__ == "__main__":
    # Before any import: a Ctrl-C that reaches the whole process group is the driver's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from multiprocessing.connection import Connection

    from distmlip.worker.main import exit_process, worker_main

    worker_main(Connection(int(sys.argv[1])), pdeathsig=sys.argv[2:] != ["no-pdeathsig"])
    exit_process(0)
