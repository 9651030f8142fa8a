"""ZeroMQ address helpers shared by the services and the client (light: zmq only, so the client
can use them without importing the bus, the services or their configuration)."""

from __future__ import annotations

import zmq


def allow_ipv6(sock: zmq.Socket, address: str) -> None:
    """Let ``sock`` bind or connect to a ``tcp://[IPv6]:PORT`` address: libzmq refuses one with
    "No such device" unless its socket has ZMQ_IPV6 set."""
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
