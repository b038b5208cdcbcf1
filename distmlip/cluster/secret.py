"""The secret the ranks of a torchrun/SLURM job share, and what is derived from it.

The job's TCP store (``MASTER_ADDR:MASTER_PORT``) has no access control: anyone who can reach
that port can read and write it. So nothing secret is put there, and nothing read from it is
trusted unless it carries a MAC made with a secret that only the job's ranks hold:

* ``DISTMLIP_SECRET`` in the ranks' environment (torchrun and srun pass the environment on;
  ``/proc/PID/environ`` is readable by the same user only), or else
* a user-only file, ``$XDG_CONFIG_HOME/distmlip/job-secret`` (``~/.config/...``), created with
  a random secret at first use (mode 0600 in a 0700 directory). Where the home directory is
  shared between the machines (most clusters), every rank finds the same one.

From the secret and the job's name, rank 0 signs the record that tells the other ranks where
to connect (its addresses, ports and a fresh nonce); both sides of every connection prove
with a challenge–response that they hold the key derived from the secret, the job and that
nonce, before anything is unpickled. An old record replayed from an earlier job carries an old
nonce, so its key does not open this job's connections.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path

__all__ = ["SECRET_ENVIRONMENT", "JobKeys", "job_secret", "secret_file"]

SECRET_ENVIRONMENT = "DISTMLIP_SECRET"
MIN_SECRET_CHARACTERS = 16
NEW_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))'"


def secret_file(environ=None) -> Path:
    """Where the user-only secret lives (``$XDG_CONFIG_HOME/distmlip/job-secret``)."""
    environ = os.environ if environ is None else environ
    config = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "distmlip" / "job-secret"


def job_secret(environ=None) -> bytes:
    """The job's shared secret: ``DISTMLIP_SECRET``, else the user-only file (made if absent).

    Raises:
        ValueError: the variable is too short, the file is readable by others or not the
            user's, or neither can be had (no writable configuration directory).
    """
    environ = os.environ if environ is None else environ
    given = environ.get(SECRET_ENVIRONMENT)
    if given is not None:
        # The signed record and key check in the public store let anyone test guesses
        # offline: refuse what is short or made of few distinct characters ("aaaa...").
        if len(given.strip()) < MIN_SECRET_CHARACTERS or len(set(given.strip())) < 8:
            raise ValueError(
                f"{SECRET_ENVIRONMENT} is shorter than {MIN_SECRET_CHARACTERS} characters or "
                f"has fewer than 8 different ones, too easy to guess; make one with: "
                f"export {SECRET_ENVIRONMENT}=$({NEW_SECRET})"
            )
        return given.strip().encode()
    path = secret_file(environ)
    try:
        if not path.exists():
            _create(path)
        return _read_private(path)
    except OSError as error:
        raise ValueError(
            f"a launched job needs a secret its ranks share and no one else can read: "
            f"{path} cannot be used ({error.strerror or error}); set {SECRET_ENVIRONMENT} to "
            f"the same value on every node: export {SECRET_ENVIRONMENT}=$({NEW_SECRET})"
        ) from None


def _create(path: Path) -> None:
    """A new random secret at ``path``, atomically: ranks starting together on one machine
    (or on machines sharing the home directory) all end up reading the same file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        try:
            os.link(temporary, path)  # fails if another rank made it first: theirs is used
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)


def _read_private(path: Path) -> bytes:
    status = path.stat()
    if status.st_uid != os.getuid() or stat.S_IMODE(status.st_mode) & 0o077:
        raise ValueError(
            f"{path} can be read or written by other users (mode "
            f"{stat.S_IMODE(status.st_mode):o}, owner uid {status.st_uid}): it must be yours "
            f"alone: chmod 600 {path}"
        )
    text = path.read_text().strip()
    if len(text) < MIN_SECRET_CHARACTERS:
        raise ValueError(
            f"{path} holds fewer than {MIN_SECRET_CHARACTERS} characters; delete it (a new "
            "one is made) or write a longer secret into it"
        )
    return text.encode()


class JobKeys:
    """Keys of one job (``prefix``: its keys in the store), derived from the shared secret."""

    def __init__(self, secret: bytes, prefix: str):
        self._secret, self.prefix = secret, prefix

    def _mac(self, purpose: str, message: bytes) -> bytes:
        label = f"distmlip\0{purpose}\0{self.prefix}\0".encode()
        return hmac.new(self._secret, label + message, hashlib.sha256).digest()

    def authkey(self, nonce: str) -> bytes:
        """The key both ends of a connection prove they hold (``multiprocessing``'s
        challenge–response), for the record with this ``nonce``."""
        return self._mac("connection", nonce.encode())

    def check(self) -> str:
        """A value ranks post so that rank 0 sees at once a rank with another secret (a MAC of
        nothing: it tells an outsider nothing about the secret or the other keys)."""
        return self._mac("check", b"").hex()[:32]

    def record(self, endpoints: list[tuple[str, int]]) -> tuple[bytes, str]:
        """Rank 0's signed record of where to connect (JSON), and its nonce."""
        nonce = secrets.token_hex(16)
        body = {"endpoints": [[host, int(port)] for host, port in endpoints], "nonce": nonce}
        mac = self._mac("record", _canonical(body)).hex()
        return json.dumps({**body, "mac": mac}).encode(), nonce

    def open_record(self, raw: bytes) -> tuple[list[tuple[str, int]], str] | None:
        """The endpoints and nonce of a record signed with this job's key; None for anything
        else (planted, from another job or secret, garbage). Parsed as JSON, never unpickled."""
        try:
            value = json.loads(raw.decode())
            body = {"endpoints": value["endpoints"], "nonce": value["nonce"]}
            given = bytes.fromhex(value["mac"])
            endpoints = [(str(host), int(port)) for host, port in body["endpoints"]]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        if not isinstance(body["nonce"], str) or not endpoints:
            return None
        if not hmac.compare_digest(given, self._mac("record", _canonical(body))):
            return None
        return endpoints, body["nonce"]


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
