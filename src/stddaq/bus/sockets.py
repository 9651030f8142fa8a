"""Binding helpers shared by every service that binds a ZeroMQ endpoint.

libzmq does not remove the socket file of an ``ipc://`` endpoint when the socket closes, so the
binder removes it itself: a name under /tmp belongs to whoever bound it.
"""

from __future__ import annotations

import errno
import os
import socket

import zmq

from stddaq.errors import BusError
from stddaq.net import allow_ipv6


def ipc_in_use(address: str) -> bool:
    """True if a process listens on the socket file of an ``ipc://`` address (or path): a
    connect succeeds. A file left by a process that is gone refuses the connect: not in use."""
    path = address.removeprefix("ipc://")
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def bind(sock: zmq.Socket, address: str, what: str) -> str:
    """Bind ``sock`` and return the address actually bound (``tcp://host:*`` resolved).

    An ``ipc://`` address another process listens on is refused: libzmq would silently take
    the name over (and remove it on close), cutting that process off from its peers for good."""
    if address.startswith("ipc://") and ipc_in_use(address):
        raise BusError(f"cannot bind {what} at {address}: another process listens there (is a service of this "
                       "detector already running?)")
    allow_ipv6(sock, address)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        if address.startswith("tcp://") and exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
            # not a config error (exit 2): under `stddaq up` that stops the whole deployment, and a
            # name that did not resolve for a moment, or an address gone in a link flap, may come back
            # (`up` refuses a host that is none of these before it starts anything)
            host = address.removeprefix("tcp://").rpartition(":")[0]
            raise BusError(f"cannot bind {what} at {address}: {host!r} is no interface, address or resolvable "
                           "name of this machine (a service listens on its own host: use *, an interface "
                           f"name such as eth0, or one of this machine's addresses) ({exc.strerror})") from None
        raise BusError(f"cannot bind {what} at {address}: {exc.strerror}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def unlink_ipc(address: str) -> None:
    """Remove the socket file of an ``ipc://`` address (after the socket is closed)."""
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://"):])
        except FileNotFoundError:
            pass
