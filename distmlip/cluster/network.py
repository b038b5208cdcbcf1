"""Sockets of a launched job's control channel: which interface rank 0 listens on, keep-alive.

Rank 0 listens only on the interface the job uses (not on every interface of the machine): the
one named by ``DISTMLIP_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, else
loopback when ``MASTER_ADDR`` is this machine's loopback (every rank is here), else the one
that routes to ``MASTER_ADDR``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from multiprocessing.connection import Connection

__all__ = ["INTERFACE_ENVIRONMENT", "interfaces_named", "keepalive", "listen", "job_addresses"]

INTERFACE_ENVIRONMENT = "DISTMLIP_SOCKET_IFNAME"
"""Network interface rank 0 listens on (default: ``GLOO_SOCKET_IFNAME``, then
``NCCL_SOCKET_IFNAME``, then the one that routes to ``MASTER_ADDR``)."""


def keepalive(sock: socket.socket, timeout: float) -> None:
    """Notice a peer whose machine or network vanished (no FIN): idle, by keep-alive probes
    within ~30 s; with data unacknowledged, after ``timeout`` s (``TCP_USER_TIMEOUT``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", 15),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(timeout * 1000)),
    )
    for option, value in options:
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def interfaces_named(spec: str, names) -> list[str]:
    """The interfaces an ``NCCL_SOCKET_IFNAME``-style value selects: comma-separated name
    prefixes, ``=`` for exact names, ``^`` to exclude (``^lo,docker``: all but those)."""
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    wanted = [name for name in spec.lstrip("=").split(",") if name]

    def named(interface: str) -> bool:
        return any(interface == w if exact else interface.startswith(w) for w in wanted)

    return [interface for interface in sorted(names) if named(interface) != exclude]


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def job_addresses(master_addr: str, master_port: int, spans_machines: bool) -> list[str]:
    """The IPv4 addresses rank 0 listens on, best first.

    ``spans_machines``: the launcher says other machines take part (``WORLD_SIZE`` greater
    than ``LOCAL_WORLD_SIZE``); used only where the route is loopback although
    ``MASTER_ADDR`` is a name (a host name that resolves to 127.0.1.1 here, but to the real
    address on the other machines): then every non-loopback address.

    Raises:
        ValueError: an interface variable selects no interface with an IPv4 address.
    """
    import psutil

    interfaces = psutil.net_if_addrs()
    for variable in (INTERFACE_ENVIRONMENT, "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        spec = os.environ.get(variable, "")
        if not spec:
            continue
        chosen = interfaces_named(spec, interfaces)
        addresses = [
            a.address for name in chosen for a in interfaces[name] if a.family == socket.AF_INET
        ]
        if not addresses:
            raise ValueError(
                f"{variable}={spec!r} selects no network interface with an IPv4 address here; "
                f"this machine has {', '.join(sorted(interfaces))}"
            )
        return sorted(addresses, key=_loopback)
    if _loopback(master_addr):
        return ["127.0.0.1"]
    try:  # the interface that routes to the store's host (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(master_addr), master_port))
            routed = probe.getsockname()[0]
    except OSError:
        routed = None
    if routed is not None and not (_loopback(routed) and spans_machines):
        return [routed]
    every = [
        a.address
        for values in interfaces.values()
        for a in values
        if a.family == socket.AF_INET and not _loopback(a.address)
    ]
    return list(dict.fromkeys(every)) + ["127.0.0.1"]


def listen(addresses: list[str], backlog: int) -> list[socket.socket]:
    """One listening socket on each of ``addresses`` (each on a port of its own)."""
    sockets = []
    try:
        for address in addresses:
            sockets.append(socket.create_server((address, 0), backlog=backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def io_timeout(connection: Connection, send: float, receive: float = 0.0) -> None:
    """Bound every blocking write (``send`` s) and read (``receive`` s) on ``connection``'s
    socket (0: no bound): a peer that stopped reading then raises ``OSError`` in
    ``connection.send`` instead of blocking the driver forever once the buffers are full."""
    with socket.socket(fileno=os.dup(connection.fileno())) as sock:
        for option, seconds in ((socket.SO_SNDTIMEO, send), (socket.SO_RCVTIMEO, receive)):
            whole = int(seconds)
            value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, option, value)


ABORTED_CONNECTIONS: list[Connection] = []
"""Sockets of remote ranks told to abort, kept open until this process exits: each rank waits
for this end to close before it exits, so the driver's error line comes first and its
launcher sees rank 0 fail first (the root cause), not a rank that merely followed it."""
