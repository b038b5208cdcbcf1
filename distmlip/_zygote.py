"""``python -m distmlip._zygote FD``: the pre-started interpreter that forks CPU workers.

See :mod:`distmlip.zygote` (the driver's side) for why and when. Requests arrive on the socket
``FD`` as one pickled tuple each, a worker's socket riding along as ``SCM_RIGHTS``:

* ``("preload", [module, ...])``: import them here (what the next workers' model needs);
  reply ``("ok", [module that failed, ...])``.
* ``("fork", (environment, streams))`` + a socket + the driver's ``streams`` (of stdout=1 and
  stderr=2, those open): fork a worker serving that socket with that environment, writing
  where the driver's standard output and error go at that moment; reply ``("pid", pid)``.
* ``("status", pid)``: that worker's exit code (it exited and was reaped); reply
  ``("status", code or None)``, codes as :attr:`subprocess.Popen.returncode` gives them
  (``-9``: SIGKILL).

The zygote never starts a thread pool, a process group or CUDA, so its forks start clean. It
exits when the driver closes its socket or dies. Its workers watch the driver (a pidfd), not
the zygote: a zygote that is stopped or fails leaves the workers of running pools alone.
"""

import signal
import sys

if __name__ == "__main__":
    # Before any import: a Ctrl-C that reaches the whole process group is the driver's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from distmlip.worker import exit_process, worker_main
    from distmlip.zygote_server import serve

    child = serve(int(sys.argv[1]), pdeathsig=sys.argv[2:] != ["no-pdeathsig"])
    if child is not None:  # a forked worker, out of the zygote's loop: serve the driver
        worker_main(child.connection, driver_pid=child.driver_pid)
    exit_process(0)
