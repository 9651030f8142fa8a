"""std_array10_recv / std_bsread_recv: a stream of images into ``<det>-image`` (SPEC section 6).

N sockets (PULL or SUB) connect to one stream address; every message is decoded, checked against
the config (shape and dtype), copied into the slot of its frame/pulse id and announced with one
ImageMetadata. A message that does not match the config is counted ``mismatch`` and logged, never
written: a wrong image in the ring would be handed on as good by everyone downstream.

Order: N PULL connections share one stream (the sender deals its messages out in turn, and
skips a connection whose queue is full), so each connection holds part of the images, in id
order, and they arrive interleaved. Read one socket empty after the other, 3000 images came out
with 6 to 700 "ids went back" and 3,000 to 170,000 false ``gaps`` at every reader; read in turn,
one each, still 31 and 1209 when one connection's queue had fallen behind. So the connections
are merged: each has its next message decoded and waiting, and the lowest id of those is
written next. A connection with nothing waiting cannot say its next id is not lower: when the
lowest waiting id does not follow the last written (more than the stream's step above it) and
a connection with nothing waiting is behind it (its last id too), the merge waits for that
connection. A sender far ahead fills the connections' TCP windows, and one of them then stays
silent for up to 190 ms (seen here: about Linux's least TCP retransmission timeout, 200 ms)
while the others deliver thousands of images: written past after 10 ms, 20000 images came out
with 9 to 700 "ids went back". So it waits up to ``LAG_WAIT_BUSY`` for a connection that has had
something since the receiver was last idle while the others have more queued, ``LAG_WAIT``
otherwise (a slow stream, an id the detector skipped, a connection silent since before the
burst: one the sender never deals to added 1 s to the first image of every burst); one that
stays silent is not waited for again until it has something or the receiver was idle.

A connection whose ids go back (a sender that began its ids again) is in the next run; one
that goes on above the ids written goes on in their run. A message of an old run passed over
by the new run's for more than the window goes then (ids that went back), never held until
the new run reaches its id. The metadata messages also pass through ``InOrder``: the pixels go
into their slot at once, the message waits until the images before it are published, for at
most ``REORDER_PER_CONNECTION`` messages per connection and half a ring of ids. Ids that step
(a pulse id stepping by 100, of which a ring of 1000 slots holds 10) follow one another by their
step, learnt from the last ``STEP_HISTORY`` ids released: held for a window of 16, each went out
just before its slot was written again, and readers got 35 of 3000. Nothing waits longer than
the receiver has something to read: when no connection has had anything for ``IDLE_GRACE`` s,
every held message goes.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import zmq

from stddaq.bus.publisher import ImagePublisher, image_metadata
from stddaq.config import DetectorConfig
from stddaq.errors import UsageError
from stddaq.formats import FormatError, array10, bsread
from stddaq.net import allow_ipv6
from stddaq.protocol import GFImageMetadata, PcoImageMetadata
from stddaq.services.base import ArgumentParser, Service, positive_int, service_main

log = logging.getLogger(__name__)

FORMATS = ("array-1.0", "bsread")
SOCKET_TYPES = {"pull": zmq.PULL, "sub": zmq.SUB}
RECEIVER_COUNTERS = ("invalid", "mismatch", "lost")


class Mismatch(Exception):
    """A well-formed image that is not of the config's shape or type (counted ``mismatch``)."""


def decode_message(stream_type: str, parts: list, config: DetectorConfig) -> tuple[int, np.ndarray, dict]:
    """(image id, pixels, extra) of one message for ``config``'s buffer: FormatError if it is not
    one of ``stream_type``, Mismatch if its image is not of the config's shape and type (bsread:
    told by its data header, before anything is decompressed: a few hundred bytes claiming
    131072x131072 pixels ended the receiver, or its memory). A GigaFRoST's own array-1.0 header
    fields go into extra["gf"] (for the services after it, a std_delay_filter), what was wrong
    with them into extra["problems"]."""
    if stream_type == "array-1.0":
        header, pixels = array10.decode(parts)
        check_against_config(config, header["frame"], pixels.shape, pixels.dtype)
        if config.detector_type != "gigafrost":
            return header["frame"], pixels, {}
        gf, problems = array10.gigafrost_fields(header)
        return header["frame"], pixels, {"gf": gf, "problems": problems} if gf else {}
    main, channel, pixels = bsread.decode(
        parts, check=lambda pulse_id, channel: check_against_config(config, pulse_id, channel.shape, channel.dtype))
    stamp = main.get("global_timestamp") or {}
    return main["pulse_id"], pixels, {"name": channel.name, "sec": stamp.get("sec", 0), "ns": stamp.get("ns", 0)}


def check_against_config(config: DetectorConfig, image_id: int, shape: tuple, dtype: np.dtype) -> None:
    """Mismatch, saying why, if an image of ``shape`` and ``dtype`` cannot go into this config's buffer."""
    if tuple(shape) != config.shape:
        raise Mismatch(f"image {image_id}: shape {list(shape)} is not the config's {list(config.shape)}")
    if dtype != config.dtype:
        raise Mismatch(f"image {image_id}: type {np.dtype(dtype).name} is not the config's {config.dtype.name}")


#: connections of a PULL receiver unless -n says otherwise
DEFAULT_PULL_CONNECTIONS = 4
#: the most -n may ask for (5000 ended in "Too many open files": a ZMQ context has 1023 sockets)
MAX_CONNECTIONS = 256
#: per connection, how many images a PULL receiver holds back at most to publish them in id order
REORDER_PER_CONNECTION = 4
#: seconds the connections must all stay empty before the held messages go (module docstring)
IDLE_GRACE = 0.002
#: seconds the merge waits for a connection behind the others before it writes past it (module docstring),
#: in a slow stream and while the others have more queued
LAG_WAIT = 0.01
LAG_WAIT_BUSY = 1.0
#: released ids whose steps give the stream's own step (module docstring)
STEP_HISTORY = 8
#: at stop, seconds spent at most writing what the connections' queues still hold (it reached us)
CLOSE_DRAIN = 0.5


class _Head(NamedTuple):
    """A connection's next message, decoded, waiting to be written (see StreamReceiver._step)."""

    image_id: int
    pixels: np.ndarray
    extra: dict
    parts: list  # keep the pixels' memory
    seq: int  # messages decoded before it: its age


class InOrder:
    """Metadata messages of images written out of order, handed back in id order (module docstring).
    A message is whatever the caller holds for an image (the receiver: its id and metadata bytes).

    ``before(image_id)`` gives the messages that must go before ``image_id``'s slot is written:
    a held image in the same slot (the same id again, or one a ring apart), or every held one
    when ids went back (a new run, or a straggler after its turn was given up). ``add(image_id,
    message)`` holds the message and gives those now in order: the next id, or the lowest while
    more than ``window`` are held (an id that does not come is skipped). ``drain()`` gives all.
    A window of 0 holds nothing.

    After the ids went back (a sender that began its ids again while its old run's last images
    were still being merged: they come after the new run's first ones), nothing at or above
    where they were is held for more than ``2 * window`` further images: it goes then, out of
    order, while its slot still holds its pixels (in a steady stream the window alone rules).
    Held until the new run reached its id, it went out just before the new image of that id
    took its slot, and readers got the new pixels under its metadata (the overwrite guard
    cannot tell: the same id). A held image of the same id as the one about to be
    written is not given for that reason: its id goes to ``lost`` (the receiver counts it)."""

    def __init__(self, window: int, n_slots: int) -> None:
        self.window = window
        self.n_slots = n_slots
        self._ids: list[int] = []  # heap of the held ids
        self._messages: dict[int, object] = {}
        self._slots: dict[int, int] = {}  # slot -> held id
        self._next: int | None = None  # the id that may go next without waiting
        self.lost: list[int] = []  # held ids given up (see the class docstring), for the receiver to count
        self._added = 0  # messages added so far
        self._went_back: int | None = None  # where the ids were when they last went back (see add)
        self._order: deque[tuple[int, int, object]] = deque()  # (id, when added, message) held, oldest first
        self._steps: deque[int] = deque(maxlen=STEP_HISTORY)  # between the last ids released in order
        #: ids a held message stays behind the newest at most: half a ring left to read it in
        self.max_distance = max(1, n_slots // 2)

    @property
    def step(self) -> int:
        """The stream's step: the smallest of the last STEP_HISTORY steps between ids released (1
        until there are that many: a gap at the start is not a step)."""
        steps = self._steps
        return min(steps) if len(steps) == STEP_HISTORY else 1

    def follows(self, image_id: int) -> bool:
        """Whether ``image_id`` is the next id of the stream (within its step of the last released)."""
        return self._next is not None and self._next <= image_id < self._next + self.step

    def __len__(self) -> int:
        return len(self._ids)

    def before(self, image_id: int) -> list:
        if not self._ids:
            return []
        if self._next is not None and image_id < self._next:
            last = self._ids and max(self._ids)
        else:
            last = self._slots.get(image_id % self.n_slots)
            if last is None:
                return []
        if image_id in self._messages:  # the same id again: its slot is rewritten now
            self.lost.append(image_id)
            self._take(image_id)
        out = []
        while self._ids and self._ids[0] <= last:
            out.append(self._pop())
        return out

    def add(self, image_id: int, message: object) -> list:
        if self.window == 0 or (self._next is not None and image_id < self._next):
            if self._next is not None and image_id < self._next:  # ids went back: ids from here on may be
                self._went_back = self._next  # an old run's last images, merged after the new run's first
            self._next = image_id + 1
            return [message]
        heapq.heappush(self._ids, image_id)
        self._messages[image_id] = message
        self._slots[image_id % self.n_slots] = image_id
        self._added += 1
        self._order.append((image_id, self._added, message))
        out = []
        ids, follows, window, oldest_kept = self._ids, self.follows, self.window, image_id - self.max_distance
        while ids and (follows(ids[0]) or len(ids) > window or ids[0] <= oldest_kept):
            out.append(self._pop())
        order, mark, messages = self._order, self._went_back, self._messages
        while order and messages.get(order[0][0]) is not order[0][2]:
            order.popleft()  # gone already
        if mark is not None:
            for held, when, kept in list(order):  # oldest first
                if self._added - when < 2 * self.window:
                    break
                if held >= mark and messages.get(held) is kept:  # an old run's, held two windows: it goes
                    out.append(self._pop() if held == self._ids[0] else self._take(held))
            if self._next is not None and self._next > mark + 2 * self.window:
                self._went_back = None  # the new run is well past where the old one was
        if len(order) > 4 * self.window:  # entries of messages gone behind one still held
            self._order = deque(entry for entry in order if messages.get(entry[0]) is entry[2])
        return out

    def drain(self) -> list:
        self._order.clear()
        return [self._pop() for _ in range(len(self._ids))]

    def _pop(self) -> object:
        image_id = heapq.heappop(self._ids)
        del self._slots[image_id % self.n_slots]
        if self._next is not None and image_id >= self._next:
            self._steps.append(image_id - self._next + 1)
        self._next = image_id + 1
        return self._messages.pop(image_id)

    def _take(self, image_id: int) -> object:
        """A held message out of order (the next id to wait for stays)."""
        self._ids.remove(image_id)
        heapq.heapify(self._ids)
        del self._slots[image_id % self.n_slots]
        return self._messages.pop(image_id)


class StreamReceiver(Service):
    """Connects ``n_connections`` sockets to ``address`` and writes what arrives into ``<det>-image``.

    PULL connections share the images between them (default 4). A SUB receiver connects one:
    every SUB connection to a publisher gets every image, so N of them would write and publish
    each image N times (a writer downstream would record every id N times, and a reader could
    count an image lost while its next copy is written over it); asking for more is told so."""

    def __init__(self, config: DetectorConfig, address: str, *, stream_type: str = "array-1.0",
                 n_connections: int | None = None, socket_type: str = "pull", suffix: str = "image", **kw) -> None:
        self.name = "std_array10_recv" if stream_type == "array-1.0" else "std_bsread_recv"
        super().__init__(config, **kw)
        if stream_type not in FORMATS:
            raise UsageError(f"stream type {stream_type!r} is not allowed (allowed: {', '.join(FORMATS)})")
        if socket_type not in SOCKET_TYPES:
            raise UsageError(f"-t/--type {socket_type!r} is not allowed (allowed: {', '.join(SOCKET_TYPES)})")
        if n_connections is not None and not 0 < n_connections <= MAX_CONNECTIONS:
            raise UsageError(f"-n {n_connections} is not allowed: must be 1..{MAX_CONNECTIONS} connections")
        self.asked_connections = n_connections
        self.address = address
        self.stream_type = stream_type
        self.n_connections = 1 if socket_type == "sub" else n_connections or DEFAULT_PULL_CONNECTIONS
        self.socket_type = socket_type
        self.suffix = suffix
        self.sockets: list[zmq.Socket] = []
        self._heads: list[_Head | None] = []  # per connection: its next message, not written yet (see _step)
        self._last: list[int | None] = []  # per connection: the id of its last message (its ids rise in a run)
        self._runs: list[int] = []  # per connection: how often its ids went back (the run it is in)
        self._stalled: list[bool] = []  # per connection: waited for, had nothing: not waited for again until it has
        self._active: list[bool] = []  # per connection: had something since the receiver was last idle
        self._written: int | None = None  # the id the merge wrote last
        self._written_run = 0  # the run of the connection it took the last id from in id order
        self._received = 0  # messages decoded so far: a head's age
        self.publisher: ImagePublisher | None = None
        window = min(REORDER_PER_CONNECTION * self.n_connections, config.n_slots // 4) if self.n_connections > 1 else 0
        self.in_order = InOrder(window, config.n_slots)
        self.counters.declare(*RECEIVER_COUNTERS)

    def _start(self) -> None:
        self.publisher = ImagePublisher(self.config, self.suffix, ctx=self.ctx).open()
        self.endpoints = {"metadata": self.publisher.address, "stream": self.address}
        self._poller = zmq.Poller()
        for _ in range(self.n_connections):
            sock = self.ctx.socket(SOCKET_TYPES[self.socket_type])
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100)
            if self.socket_type == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            self.sockets.append(sock)
            self._heads.append(None)
            self._last.append(None)
            self._runs.append(0)
            self._stalled.append(False)
            self._active.append(False)
            allow_ipv6(sock, self.address)
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                raise UsageError(f"cannot connect to stream address {self.address!r}: {exc.strerror}") from None
            self._poller.register(sock, zmq.POLLIN)
        self._metadata = image_metadata(self.config)
        log.info("receiving %s from %s (%d %s connections) into %s", self.stream_type, self.address,
                 self.n_connections, self.socket_type, self.publisher.layout.name)
        if self.socket_type == "sub" and (self.asked_connections or 1) > 1:
            log.warning("-n %d ignored with -t sub: one SUB connection is made, because each SUB connection to a "
                        "publisher gets every image, so %d would write and publish each image %d times; -n shares "
                        "the images between connections only with -t pull", self.asked_connections,
                        self.asked_connections, self.asked_connections)

    def _close(self) -> None:
        try:
            if self.publisher is not None:
                # what was taken in goes out: what the connections' queues hold (it reached this
                # process: up to CLOSE_DRAIN s of it), merged as ever, then the held messages
                deadline = self.clock() + CLOSE_DRAIN
                while self.clock() < deadline:
                    self._refill(self._heads)
                    if self._write_next(self._heads) is False and not self._poller.poll(IDLE_GRACE * 1000):
                        break
                while self._write_next(self._heads, wait=False):  # a sender still sending: what is decoded goes too
                    pass
                self._send(self.in_order.drain())
                left = self._count_left()
                if left:
                    self.counters.add("lost", left)
                    log.warning("%s: %d message(s) that had reached this receiver were not written: it stopped "
                                "after %.1f s of writing what its connections held (the sender was still sending)",
                                self.address, left, CLOSE_DRAIN)
        finally:
            for sock in self.sockets:
                sock.close(0)
            self.sockets.clear()
            if self.publisher is not None:
                self.publisher.close_for_readers()
                self.publisher = None

    def _count_left(self, limit: int = 1_000_000) -> int:
        """Messages still queued in the connections (taken off, not decoded, to be counted), until
        none comes for IDLE_GRACE s (at most 0.1 s: a sender may still be sending): a connection
        whose queue was full gets the rest of what its socket holds only as the queue empties
        (counting up to Again alone missed a few)."""
        left = 0
        deadline = self.clock() + 0.1
        while left < limit:
            before = left
            for sock in self.sockets:
                while left < limit:
                    try:
                        sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    left += 1
            if (left == before and not self._poller.poll(IDLE_GRACE * 1000)) or self.clock() >= deadline:
                break
        return left

    def _step(self) -> bool:
        """Merge the connections by id for up to 50 ms (module docstring); when none has had
        anything for IDLE_GRACE s, the held messages go."""
        deadline = self.clock() + 0.05
        poller, in_order, heads = self._poller, self.in_order, self._heads
        if not any(heads) and not poller.poll(100 if not in_order else IDLE_GRACE * 1000):
            self._idle()
            return True
        while True:
            self._refill(heads)
            written = self._write_next(heads)
            if written is False:
                if in_order and poller.poll(IDLE_GRACE * 1000):
                    continue
                self._idle()
                return True
            if self.clock() >= deadline:
                return True

    def _idle(self) -> None:
        """Nothing to read: the held messages go, and a connection given up for having had nothing
        is waited for again (the next images may be dealt out to it: a probe image before a run
        made three of four connections given up, and the run's first ids then went back)."""
        self._send(self.in_order.drain())
        self._stalled = [False] * len(self._stalled)
        self._active = [False] * len(self._active)

    def _write_next(self, heads: list, wait: bool = True) -> bool | None:
        """Write the waiting message that goes next (module docstring); False if none waits, None if
        none was written because a connection behind the others got something (refill and ask again)."""
        waiting = [index for index, head in enumerate(heads) if head is not None]
        if not waiting:
            return False
        first = min(waiting, key=lambda index: heads[index].image_id)
        oldest = min(waiting, key=lambda index: heads[index].seq)
        runs = self._runs
        if runs[oldest] < runs[first] and self._received - heads[oldest].seq > self.in_order.window:
            first = oldest  # an old run's image passed over by the new run's (its ids went back): it goes
        else:
            if wait:
                behind = self._behind(heads, first)
                if behind:
                    if zmq.select([self.sockets[index] for index in behind], [], [], self._lag_wait(heads, behind))[0]:
                        return None
                    for index in behind:
                        self._stalled[index] = True
            if self._written is not None and heads[first].image_id > self._written:
                runs[first] = max(runs[first], self._written_run)  # it goes on from the run written
            self._written_run = runs[first]
        head, heads[first] = heads[first], None
        self._write(head.image_id, head.pixels, head.extra)
        self._written = head.image_id
        return True

    def _lag_wait(self, heads: list, behind: list[int]) -> float:
        """How long to wait for the connections ``behind``: long while the others have more queued
        and one of them has had something since the receiver was last idle (the sender is ahead: a
        connection it filled can stay silent for about 200 ms); short otherwise: a slow stream (its
        next image is the one to wait for), or connections silent since before the burst began
        (a new one, one the sender has not reconnected yet after a restart, one that never gets
        anything: waited for 1 s, that added 1 s to the first image of every burst)."""
        if any(self._active[index] for index in behind):
            for index, head in enumerate(heads):
                if head is not None and self.sockets[index].getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return LAG_WAIT_BUSY
        return LAG_WAIT

    def _behind(self, heads: list, first: int) -> list[int]:
        """The connections with nothing waiting whose next id may still be below the one at ``first``:
        one still in the run before (a new run's first ids come after the old run's last), one
        whose last id and the last written are more than a step below it, one that has had nothing
        yet while nothing was written or the last written is more than a step below it (a new
        stream's, or run's, first ids are dealt out to every connection) (module docstring)."""
        image_id, run, written = heads[first].image_id, self._runs[first], self._written
        step, last, runs, stalled = self.in_order.step, self._last, self._runs, self._stalled
        behind = []
        for index, head in enumerate(heads):
            if head is None and not stalled[index]:
                seen = [known for known in (last[index], written) if known is not None]  # ids it is past
                if runs[index] < run or not seen or max(seen) + step < image_id:
                    behind.append(index)
        return behind

    def _refill(self, heads: list) -> None:
        """Give each connection without a waiting message its next usable one, decoded (or None)."""
        for index, sock in enumerate(self.sockets):
            while heads[index] is None:
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                decoded = self._decode([p.buffer for p in parts])
                if decoded is not None:
                    self._received += 1
                    heads[index] = _Head(*decoded, parts, self._received)
                    last, image_id = self._last[index], decoded[0]
                    if last is None:  # its first: of the run written, or of the next if below its ids
                        written = self._written
                        self._runs[index] = (self._written_run + 1 if written is not None and image_id < written
                                             else max(self._runs))
                    elif image_id <= last:
                        self._runs[index] += 1
                    self._last[index] = image_id
                    self._stalled[index] = False
                    self._active[index] = True

    def _send(self, messages: list[tuple[int, bytes]]) -> None:
        send = self.publisher.send
        for image_id, message in messages:
            send(message, image_id)

    def handle(self, parts: list) -> bool:
        """Write one message into the buffer; False (and counted) if it is not usable."""
        decoded = self._decode(parts)
        if decoded is None:
            return False
        self._write(*decoded)
        return True

    def _decode(self, parts: list) -> tuple[int, np.ndarray, dict] | None:
        """(image id, pixels, extra) of a usable message; None (counted, logged) otherwise."""
        try:
            return decode_message(self.stream_type, parts, self.config)
        except Mismatch as exc:
            self._reject("mismatch", str(exc))
        except FormatError as exc:
            self._reject("invalid", str(exc))
        except Exception as exc:  # noqa: BLE001 - what the format checks missed: still one bad message
            self._reject("invalid", f"undecodable {self.stream_type} message: {type(exc).__name__}: {exc}")
        return None

    def _write(self, image_id: int, pixels: np.ndarray, extra: dict) -> bool:
        metadata = self._metadata
        try:  # the formats check these values; a value they let through must not stop the receiver
            metadata.image_id = image_id
            if "gf" in extra:
                metadata.gf.CopyFrom(GFImageMetadata(**extra["gf"]))
                for problem in extra["problems"]:  # the image is good: only that field is left out
                    self.counters.warn("gf", log, "%s: image %d: %s; left out of its metadata", self.address,
                                       image_id, problem)
            elif metadata.HasField("gf"):  # the message before had them; this one has not
                metadata.ClearField("gf")
            if "name" in extra and self.config.detector_type == "pco":
                metadata.pco.CopyFrom(PcoImageMetadata(global_timestamp_sec=extra["sec"],
                                                       global_timestamp_ns=extra["ns"], bsread_name=extra["name"]))
        except (ValueError, TypeError, OverflowError) as exc:
            self._reject("invalid", f"image {image_id}: its metadata cannot be stored: {exc}")
            return False
        in_order = self.in_order
        self._send(in_order.before(image_id))
        for lost in in_order.lost:
            self._reject("lost", f"image {lost} of the sender's run before was held back for its order, and its slot "
                                 f"is taken by the new run's image {lost} (the sender began its ids again)")
        in_order.lost.clear()
        self._send(in_order.add(image_id, (image_id, self.publisher.write_image(metadata, pixels))))
        self.counters.processed(pixels.nbytes)
        return True

    def _reject(self, counter: str, message: str) -> None:
        self.counters.add(counter)
        self.last_error = message
        self.counters.warn(counter, log, "%s: not written: %s", self.address, message)


def build_parser(stream_type: str) -> ArgumentParser:
    article = "an" if stream_type[0] in "aeiou" else "a"
    parser = ArgumentParser(description=f"Receive {article} {stream_type} stream into the <detector>-image bus channel.")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("stream_address", help="address of the stream to connect to, e.g. tcp://host:9100")
    parser.add_argument("-n", "--n_connections", type=positive_int, default=None,
                        help=f"parallel PULL connections, 1..{MAX_CONNECTIONS} (default {DEFAULT_PULL_CONNECTIONS}; "
                             "-t sub makes one)")
    parser.add_argument("-t", "--type", default="pull", help="socket type: pull (default) or sub")
    return parser


def _main(stream_type: str, prog: str, argv: Sequence[str] | None) -> int:
    return service_main(prog, build_parser(stream_type), lambda config, a: StreamReceiver(
        config, a.stream_address, stream_type=stream_type, n_connections=a.n_connections, socket_type=a.type), argv)


def main_array10(argv: Sequence[str] | None = None) -> int:
    return _main("array-1.0", "std_array10_recv", argv)


def main_bsread(argv: Sequence[str] | None = None) -> int:
    return _main("bsread", "std_bsread_recv", argv)


if __name__ == "__main__":
    import sys

    # python -m stddaq.services.receiver array-1.0|bsread detector.json address [options]
    if len(sys.argv) < 2 or sys.argv[1] not in FORMATS:
        print(f"usage: python -m stddaq.services.receiver {{{'|'.join(FORMATS)}}} detector.json stream_address "
              "[-n N] [-t pull|sub]", file=sys.stderr)
        raise SystemExit(2)
    fmt = sys.argv[1]
    raise SystemExit(_main(fmt, "std_array10_recv" if fmt == "array-1.0" else "std_bsread_recv", sys.argv[2:]))
