"""Read a live stream (array-1.0 or bsread, told apart by each message's htype) as (header, pixels).

    from stddaq.client import LiveStreamClient
    with LiveStreamClient("tcp://daq-host:9100", timeout=5) as stream:
        for header, image in stream:          # ends after 5 s without a message
            print(header["frame"], image.shape, image.dtype)

``header`` is the array-1.0 header dict, or for bsread the main header dict with two keys added:
``"frame"`` (= pulse_id, so both formats are read alike) and ``"channel"`` (the data header's
channel dict). ``image`` is a (height, width) numpy array. ``stats`` counts ``received``, ``gaps``
(ids skipped between two received messages: a periodic or batch stream skips them on purpose,
else the sender or the network dropped them) and
``invalid`` (messages that were not either format); ``last_error`` says why the last one was.

Imports only numpy, pyzmq and stddaq.formats, so it installs on a laptop without HDF5.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import zmq

from stddaq.formats import FormatError, array10, bsread, check_stream_address
from stddaq.net import allow_ipv6

SOCKET_TYPES = {"sub": zmq.SUB, "pull": zmq.PULL}


def image_id(header: dict) -> int:
    """The image id of a header of either format."""
    return header["frame"] if "frame" in header else header["pulse_id"]


def decode(parts: list) -> tuple[dict, np.ndarray]:
    """(header, pixels) of one message of either format; FormatError names what is wrong."""
    if not parts:
        raise FormatError("empty message")
    try:
        htype = json.loads(bytes(parts[0])).get("htype")
    except (ValueError, AttributeError, RecursionError):
        raise FormatError("first message part is not a JSON header object") from None
    if htype == array10.HTYPE:
        return array10.decode(parts)
    if htype == bsread.MAIN_HTYPE:
        main, channel, pixels = bsread.decode(parts)
        main["frame"] = main["pulse_id"]
        channel_dict = asdict(channel)
        channel_dict["shape"] = [channel.shape[1], channel.shape[0]]  # as on the wire: width first
        main["channel"] = channel_dict
        return main, pixels
    raise FormatError(f"htype {htype!r} is neither {array10.HTYPE!r} nor {bsread.MAIN_HTYPE!r}")


class LiveStreamClient:
    """One SUB (or PULL) connection to a stream; ``receive(timeout)`` or iterate."""

    def __init__(self, address: str, *, timeout: float | None = 10.0, socket_type: str = "sub",
                 ctx: zmq.Context | None = None, rcvhwm: int = 1000) -> None:
        if socket_type not in SOCKET_TYPES:
            raise ValueError(f"socket_type {socket_type!r} is not allowed (allowed: {', '.join(SOCKET_TYPES)})")
        if address.startswith("tcp://"):
            check_stream_address(address)
        self.address = address
        self.timeout = timeout
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self.socket = self._ctx.socket(SOCKET_TYPES[socket_type])
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        if socket_type == "sub":
            self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        allow_ipv6(self.socket, address)
        self.socket.connect(address)
        self.stats = {"received": 0, "gaps": 0, "invalid": 0}
        self.last_error: str | None = None
        self.last_id: int | None = None

    def receive(self, timeout: float | None = None) -> tuple[dict, np.ndarray] | None:
        """The next good message, or None after ``timeout`` seconds (default: the client's) without one."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = self.socket
        if sock is None:
            raise RuntimeError(f"this LiveStreamClient of {self.address} is closed: make a new one to read again")
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not sock.poll(None if remaining is None else remaining * 1000):
                return None
            parts = sock.recv_multipart(copy=False)
            try:
                header, pixels = decode([p.buffer for p in parts])
            except Exception as exc:  # noqa: BLE001 - FormatError, or what the format checks missed: one message
                self.stats["invalid"] += 1
                self.last_error = str(exc) if isinstance(exc, FormatError) else f"{type(exc).__name__}: {exc}"
                continue
            frame = image_id(header)
            if self.last_id is not None and frame > self.last_id + 1:
                self.stats["gaps"] += frame - self.last_id - 1
            self.last_id = frame
            self.stats["received"] += 1
            return header, pixels

    def __iter__(self) -> Iterator[tuple[dict, np.ndarray]]:
        """Messages until ``timeout`` seconds pass without one (forever with timeout=None)."""
        while (message := self.receive()) is not None:
            yield message

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> LiveStreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _steps(previous: int | None, ids: list[int], most: int = 3) -> str:
    """`` steps=+10 x99,+1 x2``: how the ids stepped (from ``previous``, the id before them), the
    ``most`` frequent steps first."""
    from collections import Counter

    chain = ([] if previous is None else [previous]) + ids
    counts = Counter(b - a for a, b in zip(chain, chain[1:], strict=False))
    return " steps=" + ",".join(f"{step:+d} x{n}" for step, n in counts.most_common(most))


def watch(address: str, *, duration: float | None = None, socket_type: str = "sub", interval: float = 1.0,
          out=None, clock=time.monotonic) -> int:
    """`stddaq watch`: print once per ``interval`` the ids received, the rate and the gaps.

    One line per interval: ``frames=N rate_hz=R ids=FIRST..LAST gaps=G shape=[H, W] type=T``, or
    ``frames=0 (no messages)``; messages that came but could not be read add ``invalid=K (last:
    why)``. Where ids did not all follow each other, ``steps=+S xK,...`` says how they stepped
    (the most frequent first): a periodic stream (``-p 1:10``) steps +10 each time and a batch one
    a regular pattern, a stream losing images at random steps irregularly. Returns the number of
    messages received.
    """
    import sys

    out = out or sys.stdout
    total = 0
    with LiveStreamClient(address, timeout=None, socket_type=socket_type) as client:
        start = clock()
        end = None if duration is None else start + duration
        period = 0
        while end is None or clock() < end:
            period += 1
            period_start = start + (period - 1) * interval
            period_end = start + period * interval if end is None else min(start + period * interval, end)
            ids: list[int] = []
            gaps_before, invalid_before = client.stats["gaps"], client.stats["invalid"]
            previous_id = client.last_id
            last = None
            while (remaining := period_end - clock()) > 0:
                message = client.receive(timeout=max(remaining, 0.001))
                if message is not None:
                    last = message
                    ids.append(image_id(message[0]))
            invalid = client.stats["invalid"] - invalid_before
            # messages that came but could not be read are said, with why (else "no messages" misleads)
            unread = f" invalid={invalid} (last: {client.last_error})" if invalid else ""
            if last is not None:
                _, pixels = last
                gaps = client.stats["gaps"] - gaps_before
                print(f"frames={len(ids)} rate_hz={len(ids) / (period_end - period_start):.1f} ids={ids[0]}..{ids[-1]} "
                      f"gaps={gaps}{_steps(previous_id, ids) if gaps else ''} shape={list(pixels.shape)} "
                      f"type={pixels.dtype.name}{unread}", file=out, flush=True)
            elif invalid:
                print(f"frames=0{unread}", file=out, flush=True)
            else:
                print(f"frames=0 (no messages from {address})", file=out, flush=True)
            total += len(ids)
    return total
