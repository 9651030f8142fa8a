"""Binding helpers shared by every service that binds a ZeroMQ endpoint.

libzmq does not remove the socket file of an ``ipc://`` endpoint when the socket closes, so the
binder removes it itself: a name under /tmp belongs to whoever bound it.
"""

from __future__ import annotations

import os

import zmq

from stddaq.errors import BusError


def bind(sock: zmq.Socket, address: str, what: str) -> str:
    """Bind ``sock`` and return the address actually bound (``tcp://host:*`` resolved)."""
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise BusError(f"cannot bind {what} at {address}: {exc.strerror}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def unlink_ipc(address: str) -> None:
    """Remove the socket file of an ``ipc://`` address (after the socket is closed)."""
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://"):])
        except FileNotFoundError:
            pass
