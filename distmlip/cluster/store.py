"""The job's TCP store (torchrun's agent store, or the one rank 0 hosts under srun): connecting
with a bound wait, hosting it, and the failures ranks post there.

The store has no access control (anyone who reaches ``MASTER_PORT`` can read and write it), so
what is read from it is text, shown bounded and printable, never unpickled; a failure posted
there by anyone stops the job (a denial of service the docs name; nothing runs, no number
changes).
"""

from __future__ import annotations

import datetime
import time

from distmlip.cluster.launch import Launch
from distmlip.messages import STARTUP_TIMEOUT

__all__ = [
    "job_store",
    "host_store",
    "report_failure",
    "failures",
    "await_rank_0",
    "present",
    "JobEnded",
]


class JobEnded(RuntimeError):
    """Another rank failed to start, or rank 0 refused this one: nothing more to report."""


_HOSTED: dict = {}
"""The store this process hosts (rank 0 under srun), by job: one server per process."""


def job_store(launch: Launch, timeout: float, host: bool = False):
    """A client of the job's TCP store, or (``host``) the store itself, kept for the process's
    lifetime so that the other ranks can post and read while rank 0 works."""
    from torch.distributed import TCPStore

    where = f"{launch.master_addr}:{launch.master_port}"
    if host or launch.job in _HOSTED:
        if launch.job not in _HOSTED:
            try:
                _HOSTED[launch.job] = TCPStore(
                    launch.master_addr,
                    launch.master_port,
                    is_master=True,
                    timeout=datetime.timedelta(seconds=timeout),
                    wait_for_workers=False,
                )
            except Exception as error:
                if "EADDRINUSE" not in str(error) and "in use" not in str(error):
                    raise
                raise ValueError(
                    f"MASTER_PORT={launch.master_port} is in use on this machine (another job "
                    "or program): give each job its own, e.g. "
                    "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))"
                ) from None
        return _HOSTED[launch.job]

    def connect():
        return TCPStore(
            launch.master_addr,
            launch.master_port,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )

    # TCPStore's own timeout does not bound a handshake with a listener that is not a store.
    return _within(connect, timeout + 5.0, f"connecting to the job's store at {where}")


def _within(function, seconds: float, what: str):
    """``function()``, or RuntimeError if it has not returned within ``seconds``."""
    import threading

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, name="distmlip-store", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RuntimeError(
            f"{what}: no answer within {seconds:.0f} s; is another program listening on "
            "MASTER_PORT?"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def host_store(launch: Launch) -> None:
    """On rank 0 of an srun job, start the job's store now, before reading any input, so the
    other ranks hear at once if rank 0 fails (torchrun's agent hosts it already)."""
    if launch.rank == 0 and launch.host_store:
        job_store(launch, STARTUP_TIMEOUT, host=True)


def report_failure(launch: Launch, message: str) -> None:
    """Tell the other ranks (through the store) that this rank failed before it could serve,
    so they stop at once instead of waiting for it. Best effort: a few seconds at most."""
    try:
        store = job_store(launch, 5.0)
        store.set(f"{launch.prefix}/failed/{launch.rank}", message)
        store.add(f"{launch.prefix}/failures", 1)
    except Exception:  # the store is gone: the job is ending anyway
        pass


def failures(store, launch: Launch) -> str | None:
    """The first failure another rank posted, as ``rank R: message``, or None."""
    if store.add(f"{launch.prefix}/failures", 0) == 0:
        return None
    for rank in range(launch.world_size):
        key = f"{launch.prefix}/failed/{rank}"
        if store.check([key]):
            # Anyone who reaches the store can write here: text only, printable, bounded.
            text = store.get(key).decode(errors="replace")[:500]
            text = "".join(c if c.isprintable() else "?" for c in text)
            return f"rank {rank} failed to start: {text}"
    return None


def await_rank_0(store, launch: Launch, seconds: float) -> None:
    """After another rank's failure: wait (at most ``seconds``) until rank 0 has reported
    its own (it prints the job's error line first, then posts) or its store is gone. A
    serving rank that exited at once could have its launcher stop rank 0 (torchrun ends a
    node's other ranks when one fails) before rank 0 printed why the job ended."""
    deadline = time.monotonic() + seconds
    key = f"{launch.prefix}/failed/0"
    while time.monotonic() < deadline:
        try:
            if store.check([key]):
                return
        except Exception:  # the store is gone with rank 0's process
            return
        time.sleep(0.1)


def present(store, key: str, launch: Launch) -> bool:
    try:
        return store.check([key])
    except Exception:  # the store's host (rank 0's machine) ended or is unreachable
        raise JobEnded(
            f"lost the job's store at {launch.master_addr}:{launch.master_port}: rank 0 ended "
            "or its machine is unreachable (rank 0's message says why)"
        ) from None
