"""ImagePublisher: the one writer of a bus channel (slots first, then the metadata message)."""

from __future__ import annotations

import logging
import time

import numpy as np
import zmq

from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
from stddaq.bus.sockets import bind, unlink_ipc
from stddaq.config import DetectorConfig
from stddaq.errors import BusError
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, ImageMetadataStatus, protocol_dtype

log = logging.getLogger(__name__)

#: Metadata messages are ~30 bytes: a deep queue costs little and lets a briefly slow reader catch
#: up instead of silently missing messages (a reader that falls far behind loses slots anyway,
#: and the overwrite guard tells it so).
METADATA_HWM = 100_000
#: seconds a stopping producer gives a reader that was slow for a moment (not scheduled, busy)
#: to take what is queued for it: the connection stays open that long while a subscriber is
#: connected (``hold_for_readers``), then the socket closes with that linger. Before, with 0, a
#: reader lost the last images silently (the tail of a run: no gap after them).
CLOSE_LINGER = 0.5


def image_metadata(config: DetectorConfig, image_id: int = 0) -> ImageMetadata:
    """An ImageMetadata for a raw, good image of ``config``'s shape and dtype."""
    return ImageMetadata(
        image_id=image_id,
        height=config.image_pixel_height,
        width=config.image_pixel_width,
        size=config.image_pixel_height * config.image_pixel_width * config.dtype.itemsize,
        dtype=protocol_dtype(config.dtype),
        status=ImageMetadataStatus.good_image,
        compression=ImageMetadataCompression.none,
    )


class ImagePublisher:
    """Creates ``/dev/shm/<channel>`` and binds ``ipc:///tmp/<channel>``; owns and releases both.

    Write an image either with ``publish_image(metadata, pixels)`` (one copy into the slot), or
    in place: ``slot = begin(image_id)``, fill ``slot``, ``publish(metadata)``. ``publish_image``
    is ``write_image`` (the copy; returns the message) then ``send``, for a caller that sends
    the messages of several images in another order than it wrote them.

    Each message belongs to a **run**: the first is run 1, and the run goes up by one at every
    message whose id is not above the one sent before (the writer began its ids again). The run
    is stamped on the image's slot just before its message goes (``RamBuffer.stamp``); readers
    count runs the same way in the messages they get, so the same id of another run is never
    taken for theirs.
    """

    def __init__(self, config: DetectorConfig, suffix: str = "image", *, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.suffix = suffix
        self.layout = BufferLayout.of(config, suffix)
        self.address = config.ipc_address(suffix)
        self._ctx = ctx
        self._own_ctx = ctx is None
        self.buffer: RamBuffer | None = None
        self.socket: zmq.Socket | None = None
        self._subscribers = 0
        self._bound = False
        self._slot_n_bytes = self.layout.slot_n_bytes
        self.run = 1  # of the next message, unless its id goes back (a new buffer begins at 1)
        self._last_sent = -1  # no message yet: the first id is never "back"

    def open(self) -> ImagePublisher:
        self.buffer = RamBuffer.create(self.layout)
        self.run, self._last_sent = 1, -1
        try:
            ctx = self._ctx or zmq.Context()
            self._ctx = ctx
            sock = ctx.socket(zmq.XPUB)  # a PUB that also tells us who subscribed
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, METADATA_HWM)
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)
            self.socket = sock
            bind(sock, self.address, "the metadata socket")
            self._bound = True
        except BaseException:
            self.close()
            raise
        log.debug("publishing %s (%d slots of %d bytes)", self.address, self.layout.n_slots, self.layout.slot_n_bytes)
        return self

    # ------------------------------------------------------------------ writing
    def begin(self, image_id: int) -> np.ndarray:
        """The whole slot of ``image_id`` as writable uint8, marked as being written."""
        buffer = self.buffer
        buffer.begin_write(image_id)
        return buffer.slot_bytes(image_id)

    def publish(self, metadata: ImageMetadata) -> None:
        """Mark the slot complete and send the metadata (after the data, never before)."""
        if metadata.size > self._slot_n_bytes:
            raise BusError(f"image {metadata.image_id}: size {metadata.size} does not fit a slot of "
                           f"{self.layout.slot_n_bytes} bytes on {self.layout.name}")
        image_id = metadata.image_id
        self.buffer.end_write(image_id)
        self._stamp(image_id)
        self.socket.send(metadata.SerializeToString())

    def _stamp(self, image_id: int) -> None:
        if image_id <= self._last_sent:
            self.run += 1
        self._last_sent = image_id
        self.buffer.stamp(image_id, self.run)

    def publish_image(self, metadata: ImageMetadata, pixels: np.ndarray | bytes | memoryview) -> None:
        """Copy ``pixels`` into the slot of ``metadata.image_id`` and publish; sets ``size``."""
        self.send(self.write_image(metadata, pixels), metadata.image_id)

    def write_image(self, metadata: ImageMetadata, pixels: np.ndarray | bytes | memoryview) -> bytes:
        """Copy ``pixels`` into the slot of ``metadata.image_id`` and mark it complete; sets ``size``.
        Returns the metadata message, for ``send`` (now or a little later, never before this)."""
        raw = np.frombuffer(pixels, dtype=np.uint8) if not isinstance(pixels, np.ndarray) else pixels.reshape(-1).view(np.uint8)
        if raw.nbytes > self.layout.slot_n_bytes:
            raise BusError(f"image {metadata.image_id}: {raw.nbytes} bytes do not fit a slot of "
                           f"{self.layout.slot_n_bytes} bytes on {self.layout.name}")
        slot = self.begin(metadata.image_id)
        slot[:raw.nbytes] = raw
        metadata.size = raw.nbytes
        self.buffer.end_write(metadata.image_id)
        return metadata.SerializeToString()

    def send(self, message: bytes, image_id: int) -> None:
        """Send the metadata message ``write_image`` made for ``image_id``."""
        self._stamp(image_id)
        self.socket.send(message)

    # ------------------------------------------------------------------ subscribers
    def subscriber_count(self) -> int:
        """Subscribers connected now (reads the XPUB subscription messages that arrived)."""
        while self.socket.poll(0, zmq.POLLIN):
            msg = self.socket.recv()
            if msg[:1] == b"\x01":
                self._subscribers += 1
            elif msg[:1] == b"\x00":
                self._subscribers = max(0, self._subscribers - 1)
        return self._subscribers

    def wait_for_subscribers(self, n: int, timeout: float) -> bool:
        """Block until ``n`` subscribers are connected, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.subscriber_count() < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.socket.poll(min(remaining, 0.1) * 1000, zmq.POLLIN)
        return True

    # ------------------------------------------------------------------ lifetime
    def hold_for_readers(self, seconds: float) -> None:
        """Keep the connection open up to ``seconds`` while a subscriber is connected, before a
        close: libzmq drops what a reader has not taken off the connection when it closes (its
        queue was full: the reader was busy), even with a linger."""
        deadline = time.monotonic() + seconds
        while self.socket is not None and self.subscriber_count() > 0 and time.monotonic() < deadline:
            time.sleep(0.01)

    def close_for_readers(self) -> None:
        """The close of a producer that stops while its readers go on (a stage, a receiver): what
        is queued for a reader slow for a moment still reaches it (CLOSE_LINGER)."""
        self.hold_for_readers(CLOSE_LINGER)
        self.close(linger=CLOSE_LINGER)

    def close(self, linger: float = 0.0) -> None:
        """Flush queued metadata for up to ``linger`` seconds, then release socket and shm."""
        if self.socket is not None:
            self.socket.close(int(linger * 1000))
            self.socket = None
            if self._bound:
                unlink_ipc(self.address)
                self._bound = False
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def __enter__(self) -> ImagePublisher:
        return self.open() if self.buffer is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
