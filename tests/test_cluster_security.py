"""Who can use a launched job's control channel: only its ranks.

The job's TCP store has no access control. These tests attack a real torchrun job the way
anyone who can reach ``MASTER_PORT`` could: plant a pickle where the ranks look for rank 0's
address, read what rank 0 publishes, connect to rank 0 and send pickles with and without a
guessed key. Nothing may run in any rank, and the job must still give one process's numbers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, answer_challenge

import numpy as np
import pytest
from ase.build import bulk
from multinode import Job, environment

from distmlip import DistributedCalculator

pytestmark = pytest.mark.slow  # pools of model-family workers or long runs


class _Payload:
    """Unpickling this creates ``path``: proof that someone's pickle ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


SCRIPT = """
import json, os, sys, time
from ase.build import bulk
from distmlip import DistributedCalculator
rank = os.environ["RANK"]


def wait_for(name):  # the intruder's progress, so the order holds however loaded the machine
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(os.environ["INTRUDER_DIR"], name)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)


if rank == "0":
    wait_for("planted")  # the intruder plants its pickle before rank 0 publishes
if rank == "3":
    wait_for("done")  # rank 0 keeps listening meanwhile: the intruder's connections reach it
atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
atoms.rattle(0.1, seed=3)
calc = DistributedCalculator("reference", dtype="float64", timeout=120)
atoms.calc = calc
json.dump({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()},
          sys.stdout)
calc.close()
"""


class Intruder(threading.Thread):
    """Someone on this machine who knows MASTER_PORT (not the job's secret)."""

    def __init__(self, port: int, marker: str, progress: str):
        super().__init__(daemon=True)
        self.port, self.marker, self.progress = port, marker, progress
        self.key = "distmlip/none.0/driver"  # torchrun's static rendezvous: predictable
        self.planted = False
        self.record: bytes | None = None
        self.attempts: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._attack()
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            for name in ("planted", "done"):  # never leave a rank waiting
                open(os.path.join(self.progress, name), "w").close()

    def _store(self):
        import datetime

        from torch.distributed import TCPStore

        deadline = time.monotonic() + 120
        while True:  # the agent of node 0 starts the store; keep knocking until it is there
            try:
                return TCPStore(
                    "127.0.0.1",
                    self.port,
                    is_master=False,
                    timeout=datetime.timedelta(seconds=2),
                    wait_for_workers=False,
                )
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _attack(self) -> None:
        store = self._store()
        evil = pickle.dumps(_Payload(self.marker))
        # (b) plant a pickle where the ranks look for rank 0's address, before rank 0 writes it
        self.planted = store.compare_set(self.key, "", evil) == evil
        open(os.path.join(self.progress, "planted"), "w").close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            value = store.get(self.key)
            if value != evil:
                self.record = value
                break
            time.sleep(0.05)
        else:
            raise AssertionError("rank 0 never published its record")
        endpoints = json.loads(self.record)["endpoints"]
        host, port = endpoints[0]
        # (a1) a pickle straight away, as the answer to rank 0's challenge
        connection = _dial(host, port)
        connection.recv_bytes(256)  # the challenge
        connection.send_bytes(evil)
        self.attempts.append(_read_reply(connection))
        connection.close()
        # (a2) answer with the best guess of a key what the store holds, then a pickle hello
        for guess in (self.record, bytes.fromhex(json.loads(self.record)["mac"])):
            connection = _dial(host, port)
            try:
                answer_challenge(connection, guess)
                self.attempts.append("authenticated!")
            except Exception as error:
                self.attempts.append(f"refused: {type(error).__name__}")
            try:
                connection.send(("hello", 1, _Payload(self.marker)))
                connection.send_bytes(evil)
            except OSError:
                pass
            connection.close()


def _dial(host: str, port: int) -> Connection:
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)  # Connection reads a blocking descriptor
    return Connection(sock.detach())


def _read_reply(connection: Connection) -> str:
    try:
        return f"reply {connection.recv_bytes(256)!r}"
    except (EOFError, OSError) as error:
        return f"closed ({type(error).__name__})"


def test_store_attacks_run_nothing_and_the_job_gives_the_right_numbers(tmp_path):
    marker = tmp_path / "pwned"
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    cwds = [tmp_path / "node0", tmp_path / "node1"]
    for cwd in cwds:
        cwd.mkdir()
    progress = tmp_path / "intruder"
    progress.mkdir()
    env = environment(INTRUDER_DIR=str(progress))
    job = Job.start([[str(script)], [str(script)]], cwds, module=False, env=env)
    intruder = Intruder(job.port, str(marker), str(progress))
    intruder.start()
    job.wait(300)
    intruder.join(30)
    assert intruder.error is None, repr(intruder.error)
    assert intruder.planted, "the pickle was not planted before rank 0 published"
    assert not marker.exists(), "an intruder's pickle ran in the job"
    node0, node1 = job.nodes
    assert node0.process.returncode == 0 and node1.process.returncode == 0, job.errors()
    assert not job.left_behind()

    # What rank 0 published holds no key: only where to connect, a nonce and a MAC.
    record = json.loads(intruder.record)
    assert sorted(record) == ["endpoints", "mac", "nonce"]
    assert all(host == "127.0.0.1" for host, _ in record["endpoints"])
    assert intruder.attempts[0].startswith("reply b'#FAILURE#'"), intruder.attempts
    assert intruder.attempts[1:] == ["refused: AuthenticationError"] * 2, intruder.attempts
    dropped = [line for line in node0.stderr.splitlines() if "dropped a connection" in line]
    assert len(dropped) == 3, node0.stderr
    assert all("from 127.0.0.1:" in line and "authentication failed" in line for line in dropped)

    ours = json.loads(node0.stdout)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=3)
    with DistributedCalculator("reference", nprocs=1, dtype="float64") as calc:
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert abs(ours["energy"] - energy) <= 1e-10 * abs(energy)
    assert np.max(np.abs(np.asarray(ours["forces"]) - forces)) <= 1e-10 * np.max(np.abs(forces))


def test_the_keys_of_a_record_do_not_open_another_records_connections():
    """A record replayed from an earlier job of the same name (same secret) carries an old
    nonce: its key cannot answer this job's challenges (no relay through an old record)."""
    from distmlip.cluster.secret import JobKeys

    keys = JobKeys(b"s" * 32, "distmlip/none.0")
    old, old_nonce = keys.record([("127.0.0.1", 1000)])
    new, new_nonce = keys.record([("127.0.0.1", 1000)])
    assert keys.open_record(old) == ([("127.0.0.1", 1000)], old_nonce)
    assert old_nonce != new_nonce and keys.authkey(old_nonce) != keys.authkey(new_nonce)
    # Another job's name or another secret: the same bytes are not this job's record.
    assert JobKeys(b"s" * 32, "distmlip/other.0").open_record(new) is None
    assert JobKeys(b"t" * 32, "distmlip/none.0").open_record(new) is None
    # Altered endpoints (an intruder's own listener) break the MAC.
    forged = json.loads(new)
    forged["endpoints"] = [["10.9.9.9", 4444]]
    assert keys.open_record(json.dumps(forged).encode()) is None
    for garbage in (b"", b"\x80\x04K\x01.", b"{}", b'{"endpoints": 1, "nonce": 2, "mac": "zz"}'):
        assert keys.open_record(garbage) is None
    # The key is not something computable from the record alone.
    record = json.loads(new)
    mac = bytes.fromhex(record["mac"])
    assert keys.authkey(new_nonce) not in (mac, new, hmac.new(mac, b"", hashlib.sha256).digest())


def test_rank_0_drops_a_peer_with_the_wrong_key_and_accepts_the_right_one(monkeypatch, capsys):
    """In one process: rank 0's rendezvous with an intruder holding another secret, then a
    genuine rank; the intruder is logged and dropped and the genuine rank accepted."""
    from distmlip.cluster.secret import JobKeys
    from distmlip.cluster.serve import _connect
    from distmlip.cluster.store import job_store

    driver, endpoints, right_key = _driver(monkeypatch)
    raw = job_store(driver.launch, 10).get(f"{driver.launch.prefix}/driver")
    assert JobKeys(b"wrong-" + b"y" * 20, driver.launch.prefix).open_record(raw) is None
    nonce = json.loads(raw)["nonce"]  # all an intruder can read; the key needs the secret
    wrong_key = JobKeys(b"wrong-" + b"y" * 20, driver.launch.prefix).authkey(nonce)
    outcome: dict = {}

    def ranks() -> None:
        try:
            _connect(endpoints, wrong_key, 5.0)
        except RuntimeError as error:
            outcome["intruder"] = str(error)
        connection = _connect(endpoints, right_key, 5.0)
        connection.send(("hello", 1, {"identity": {}, "settings": {}, "host": "h", "pid": 1}))
        outcome["rank"] = connection

    thread = threading.Thread(target=ranks)
    thread.start()
    accepted = driver.accept({}, {})
    thread.join(30)
    assert sorted(accepted) == [1]
    assert "authentication failed" in outcome["intruder"]
    assert driver.dropped == 1
    err = capsys.readouterr().err
    assert err.count("distmlip: warning: dropped a connection to rank 0 from 127.0.0.1:") == 1
    outcome["rank"].close()
    accepted[1][0].close()


def _rank_0_of_two(port: int):
    """The launch of rank 0 of a 2-rank torchrun job on loopback (store at ``port``)."""
    from distmlip.cluster.launch import detect_launch

    return detect_launch(
        {
            "RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": "security-test",
        }
    )


def _driver(monkeypatch, secret="right-0123456789abcdef"):
    """Rank 0's rendezvous of a 2-rank job on loopback, and the genuine rank's keys."""
    from multinode import free_port

    from distmlip.cluster.rendezvous import DriverRendezvous
    from distmlip.cluster.secret import JobKeys
    from distmlip.cluster.store import job_store

    monkeypatch.setenv("DISTMLIP_SECRET", secret)
    launch = _rank_0_of_two(free_port())
    driver = DriverRendezvous(launch, timeout=30)
    raw = job_store(launch, 10).get(f"{launch.prefix}/driver")
    keys = JobKeys(secret.encode(), launch.prefix)
    endpoints, nonce = keys.open_record(raw)
    return driver, endpoints, keys.authkey(nonce)


def _genuine_rank(endpoints, authkey, outcome: dict, delay: float = 0.0) -> threading.Thread:
    from distmlip.cluster.serve import _connect

    def rank() -> None:
        time.sleep(delay)
        connection = _connect(endpoints, authkey, 5.0)
        connection.send(("hello", 1, {"identity": {}, "settings": {}, "host": "h", "pid": 1}))
        outcome["rank"] = connection

    thread = threading.Thread(target=rank, daemon=True)
    thread.start()
    return thread


def test_a_record_with_any_byte_of_its_mac_altered_or_cut_is_refused():
    from distmlip.cluster.secret import JobKeys

    keys = JobKeys(b"s" * 32, "distmlip/none.0")
    raw, _ = keys.record([("127.0.0.1", 1000)])
    record = json.loads(raw)
    mac = bytes.fromhex(record["mac"])
    for index in (0, len(mac) // 2, len(mac) - 1):
        altered = bytearray(mac)
        altered[index] ^= 0x01
        forged = {**record, "mac": altered.hex()}
        assert keys.open_record(json.dumps(forged).encode()) is None, index
    for cut in (mac[:2], mac[:16], mac[:-1], b""):
        assert keys.open_record(json.dumps({**record, "mac": cut.hex()}).encode()) is None


def test_a_rank_refuses_a_listener_that_cannot_prove_it_holds_the_key():
    """Someone who took rank 0's port (or a stale record's) and welcomes any answer: the rank
    must not go on to send its hello (a pickle) or read what comes back."""
    from multiprocessing.connection import CHALLENGE, WELCOME

    from distmlip.cluster.serve import _connect

    seen: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def impostor() -> None:
            sock, _ = server.accept()
            connection = Connection(sock.detach())
            try:
                connection.send_bytes(CHALLENGE + b"x" * 20)
                connection.recv_bytes(256)  # whatever the rank answers: welcome
                connection.send_bytes(WELCOME)
                seen["challenge"] = connection.recv_bytes(256)  # the rank's own challenge
                connection.send_bytes(b"\0" * 16)  # cannot answer it
                seen["after"] = connection.recv_bytes(256)
                seen["more"] = connection.poll(2.0) and connection.recv_bytes(1 << 20)
            except (EOFError, OSError):
                pass
            finally:
                connection.close()

        thread = threading.Thread(target=impostor, daemon=True)
        thread.start()
        with pytest.raises(RuntimeError, match="authentication failed"):
            _connect([("127.0.0.1", port)], b"k" * 32, 5.0)
        thread.join(10)
    assert seen.get("challenge", b"").startswith(CHALLENGE), seen
    assert seen.get("after") == b"#FAILURE#" and not seen.get("more"), seen


def test_rank_0_proves_it_holds_the_key_before_it_reads_a_hello(monkeypatch):
    """A rank's side done by hand: answer rank 0's challenge, then make rank 0 answer one."""
    from multiprocessing.connection import deliver_challenge

    driver, endpoints, authkey = _driver(monkeypatch)
    outcome: dict = {}

    def rank() -> None:
        connection = _dial(*endpoints[0])
        try:
            answer_challenge(connection, authkey)
            deliver_challenge(connection, authkey)  # raises unless rank 0 answers it
            connection.send(("hello", 1, {"identity": {}, "settings": {}, "host": "h", "pid": 1}))
            outcome["rank"] = connection
        except BaseException as error:  # reported by the test
            outcome["error"] = error
            connection.close()

    def accept() -> None:
        outcome["accepted"] = driver.accept({}, {})

    threads = [threading.Thread(target=work, daemon=True) for work in (rank, accept)]
    for thread in threads:
        thread.start()
    threads[0].join(30)
    assert "error" not in outcome, outcome
    threads[1].join(30)
    accepted = outcome["accepted"]
    assert sorted(accepted) == [1] and driver.dropped == 0
    outcome["rank"].close()
    accepted[1][0].close()


def test_rank_0_drops_a_silent_connection_and_goes_on(monkeypatch, capsys):
    """A peer that connects and says nothing (a port scanner, a frozen process) is dropped
    after the handshake's timeout: it does not hold up the job."""
    import distmlip.cluster.rendezvous as rendezvous

    monkeypatch.setattr(rendezvous, "HANDSHAKE_TIMEOUT", 1.0)
    driver, endpoints, authkey = _driver(monkeypatch)
    silent = socket.create_connection(endpoints[0], timeout=10)
    outcome: dict = {}
    rank = _genuine_rank(endpoints, authkey, outcome, delay=2.5)  # once the silent one is gone

    def accept() -> None:
        outcome["accepted"] = driver.accept({}, {})

    driver_thread = threading.Thread(target=accept, daemon=True)
    driver_thread.start()
    driver_thread.join(15)
    held_up = driver_thread.is_alive()
    silent.close()
    rank.join(10)
    assert not held_up, "rank 0 is still waiting on a peer that says nothing"
    accepted = outcome["accepted"]
    assert sorted(accepted) == [1] and driver.dropped == 1
    assert "dropped a connection to rank 0 from 127.0.0.1:" in capsys.readouterr().err
    outcome["rank"].close()
    accepted[1][0].close()


def test_rank_0_publishes_exactly_where_it_listens(monkeypatch):
    driver, endpoints, _ = _driver(monkeypatch)
    try:
        bound = [tuple(sock.getsockname()[:2]) for sock in driver.listeners]
        assert [tuple(e) for e in endpoints] == bound
        assert all(host == "127.0.0.1" for host, _ in bound), bound
    finally:
        for sock in driver.listeners:
            sock.close()


def test_a_failure_posted_in_the_store_is_shown_bounded_and_printable():
    """Anyone can write the store: what is shown of a posted failure cannot drive the terminal
    (escape sequences, carriage returns, new lines) nor flood it."""
    from distmlip.cluster.store import failures

    launch = _rank_0_of_two(1)
    posted = {f"{launch.prefix}/failed/1": b"\x1b[2J\x1b]0;owned\x07bad\rline\nnext" + b"x" * 5000}

    class Store:
        def add(self, key, amount):
            return 1

        def check(self, keys):
            return all(key in posted for key in keys)

        def get(self, key):
            return posted[key]

    shown = failures(Store(), launch)
    assert shown.startswith("rank 1 failed to start: ")
    assert shown.isprintable(), repr(shown[:80])
    assert len(shown) <= 600, len(shown)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run with pytest")
