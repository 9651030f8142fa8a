"""std_live_stream: images of a bus channel to any number of TCP subscribers (SPEC section 5).

Selection (which images go out) is the pure ``Selector``; the per-image encoding is
``LiveStream.encode`` on (metadata, pixels); the loop around them reads the bus, counts and sends.

Why every image is copied before it is sent: ZeroMQ sends asynchronously, and a zero-copy send
of a slot view would leave the slot referenced by a subscriber's queue until that subscriber
reads it (a slow one, for seconds), while the writer reuses the slot after ``n_slots`` images.
The overwrite guard can tell that a slot changed, but only at a moment we choose: nobody checks
at the moment ZeroMQ finally copies the bytes to the wire, so a torn image would go out. Tracking
the send (``track=True``) would not help either: we would have to wait for the slowest subscriber
before reusing anything, which is what a slow subscriber must never cause. So: copy (or compress,
or decompress, which also makes new bytes), then check the guard; an image overwritten meanwhile
is counted ``dropped_torn`` and not sent. The copy costs one memcpy, small next to TCP.

Slow subscribers: the output is an XPUB with ``XPUB_NODROP`` set, sent without blocking. When a
subscriber's queue is full (it is slow or stuck), that send fails at once; it is sent again in
lossy mode, so every subscriber that has room gets it. Nothing ever waits for a subscriber.

What ``dropped_hwm`` counts: the times a subscriber's queue was found full, not images. libzmq
takes a queue the lossy send found full out of its sending set until its reader has taken part of
it: the images sent meanwhile do not reach that subscriber, and libzmq neither refuses them nor
says how many they were (a review measured 1252 images missed by a subscriber stopped for 4 s,
with ``dropped_hwm`` 1). A subscriber sees what it missed as ids missing in its stream
(``LiveStreamClient.stats["gaps"]``, ``stddaq watch``); the stream itself cannot count them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from stddaq.bus.sockets import bind
from stddaq.bus.subscriber import ImageSubscriber
from stddaq.config import DetectorConfig
from stddaq.errors import BufferMissingError, BusError, UsageError
from stddaq.formats import FormatError, check_stream_address
from stddaq.formats.array10 import Array10Encoder
from stddaq.formats.bsread import BsreadEncoder
from stddaq.formats.compression import CodecError, bitshuffle_lz4_encode, check_chunk, decode
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, numpy_dtype
from stddaq.services.base import MAX_C_INT, ArgumentParser, Service, c_int_count, service_main

log = logging.getLogger(__name__)

FORMATS = ("array-1.0", "bsread")
MODES = ("forward", "periodic", "batch")
#: Bytes a subscriber's queue may hold before images are dropped for it (beyond what TCP buffers):
#: a stuck subscriber must not make the service hold gigabytes of 8 MB images.
QUEUE_BYTES = 64 * 1024 * 1024
MAX_HWM = 1000
#: Below this size a copying send is cheaper than pyzmq's zero-copy bookkeeping (measured here: a
#: zero-copy send costs ~20 us through pyzmq's garbage-collector thread, a memcpy of 256 KiB as much).
ZERO_COPY_MIN_BYTES = 256 * 1024
#: Why a selected image was not sent. Images overwritten before the live stream read them are
#: the subscriber's ``lost``, in the same stats line (counted before selection).
DROP_REASONS = ("dropped_torn", "dropped_hwm", "dropped_dtype", "dropped_decode", "dropped_format")
_H5BSLZ4 = int(ImageMetadataCompression.h5bitshuffle_lz4)
_NONE = int(ImageMetadataCompression.none)


# ---------------------------------------------------------------- selection
@dataclass(frozen=True)
class Mode:
    """How images are selected: forward, or (periodic|batch) with Y of N."""

    kind: str = "forward"
    y: int = 0
    n: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "forward" else f"{self.kind} {self.y}:{self.n}"


def parse_mode(kind: str, text: str) -> Mode:
    """``Y:N`` of ``-p``/``-b``; UsageError names the option, the value and what is allowed."""
    option = {"periodic": "-p/--periodic", "batch": "-b/--batch"}[kind]
    match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", text)  # \d takes fullwidth and other digits too
    if not match:
        raise UsageError(f"{option} {text!r} is not Y:N (two integers > 0, e.g. 1:10)")
    y, n = int(match[1]), int(match[2])
    if y <= 0 or n <= 0:
        raise UsageError(f"{option} {text!r}: Y and N must both be > 0")
    if kind == "batch" and y > n:
        raise UsageError(f"{option} {text!r}: sends Y of every N images, so Y must be <= N")
    return Mode(kind, y, n)


def mode_for(config: DetectorConfig, address: str, *, forward: bool = False, periodic: str | None = None,
             batch: str | None = None) -> Mode:
    """The mode from the command line, else from ``live_stream_configs[address]``, else forward."""
    given = [name for name, value in (("-f", forward), ("-p", periodic), ("-b", batch)) if value]
    if len(given) > 1:
        raise UsageError(f"options {', '.join(given)} exclude each other: give one of -f, -p Y:N, -b Y:N")
    if forward:
        return Mode()
    if periodic is not None:
        return parse_mode("periodic", periodic)
    if batch is not None:
        return parse_mode("batch", batch)
    entry = config.live_stream_configs.get(address)
    if entry is None or entry.type == "forward":
        return Mode()
    return Mode(entry.type, *entry.config)


class Selector:
    """Decides per image whether it goes out.

    batch Y:N: ``image_id % N < Y``. periodic Y:N: N windows a second; at the first image of a window
    the next Y images that arrive are selected (the source's consecutive images). Windows follow a
    fixed schedule of 1/N s; after a pause longer than a window the schedule restarts at the next
    image, so a paused source does not cause a burst of catch-up windows.
    """

    def __init__(self, mode: Mode, clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.clock = clock
        self._period = 1.0 / mode.n if mode.kind == "periodic" else 0.0
        self._next_window = -float("inf")
        self._remaining = 0

    def select(self, image_id: int, now: float | None = None) -> bool:
        kind = self.mode.kind
        if kind == "forward":
            return True
        if kind == "batch":
            return image_id % self.mode.n < self.mode.y
        if self._remaining > 0:
            self._remaining -= 1
            return True
        now = self.clock() if now is None else now
        if now < self._next_window:
            return False
        late = now - self._next_window
        self._next_window = now + self._period if late > self._period else self._next_window + self._period
        self._remaining = self.mode.y - 1
        return True


# ---------------------------------------------------------------- the service
def default_hwm(image_n_bytes: int) -> int:
    return max(2, min(MAX_HWM, QUEUE_BYTES // max(1, image_n_bytes)))


class LiveStream(Service):
    """Reads ``<det>-<source_suffix>``, sends the selected images as array-1.0 or bsread on a PUB."""

    name = "std_live_stream"

    def __init__(self, config: DetectorConfig, address: str, *, mode: Mode = Mode(), stream_type: str = "array-1.0",
                 source_suffix: str = "image", metadata_suffix: str | None = None, hwm: int | None = None,
                 **kw) -> None:
        super().__init__(config, **kw)
        if stream_type not in FORMATS:
            raise UsageError(f"-t/--type {stream_type!r} is not allowed (allowed: {', '.join(FORMATS)})")
        try:
            check_stream_address(address, any_port=True)
        except ValueError as exc:
            raise UsageError(f"stream {exc}") from None
        config.channel(source_suffix)  # validates the suffixes before anything is created
        if metadata_suffix is not None:
            config.channel(metadata_suffix)
        self.address = address
        self.mode = mode
        self.stream_type = stream_type
        self.source_suffix = source_suffix
        self.metadata_suffix = metadata_suffix
        if hwm is not None and not 0 < hwm <= MAX_C_INT:
            raise UsageError(f"--hwm {hwm} is not allowed: must be 1..{MAX_C_INT} images")
        self.hwm = hwm or default_hwm(config.image_n_bytes)
        self.selector = Selector(mode, self.clock)
        self.subscriber: ImageSubscriber | None = None
        self.socket: zmq.Socket | None = None
        self.subscribers = 0
        self.counters.declare("selected", "sent", *DROP_REASONS)
        self._waiting_logged = False
        self._encoders: dict[tuple, Array10Encoder | BsreadEncoder] = {}
        self._default_name = f"{config.detector_name}:image"

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        sock = self.socket = self.ctx.socket(zmq.XPUB)  # kept at once: _close() closes it if the start fails
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, so they can be counted
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)
        self.endpoints = {"stream": bind(sock, self.address, "the live stream")}
        self.subscriber = ImageSubscriber(self.config, self.source_suffix, ctx=self.ctx, stats=self.counters,
                                          metadata_suffix=self.metadata_suffix).connect()
        self.endpoints["source"] = self.subscriber.address
        log.info("live stream %s of %s (%s, %s) on %s", self.stream_type, self.subscriber.layout.name, self.mode,
                 f"queue {self.hwm} images per subscriber", self.endpoints["stream"])

    def _close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.close()
            self.subscriber = None
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    # ------------------------------------------------------------------ loop
    def _step(self) -> bool:
        self._count_subscribers()
        subscriber = self.subscriber
        if subscriber.buffer is None and not self._attach():
            return True
        image = subscriber.receive(timeout=0.1)
        deadline = self.clock() + 0.05
        while image is not None:
            self._handle(image)
            if self.clock() >= deadline:
                break
            image = subscriber.receive(timeout=0)
        return True

    def _attach(self) -> bool:
        try:
            self.subscriber.attach()
        except BufferMissingError:
            if not self._waiting_logged:
                self._waiting_logged = True
                log.info("waiting for the source buffer /dev/shm/%s: start %s", self.subscriber.layout.name,
                         self.subscriber.created_by)
            self._stop.wait(0.1)
            return False
        except (BusError, OSError) as exc:  # there, but not readable with this config: said, waited out
            if str(exc) != self.last_error:
                self.last_error = str(exc)
                log.error("cannot read the source: %s; waiting for it to be re-created", exc)
            self._stop.wait(0.5)
            return False
        if self._waiting_logged:
            log.info("source buffer /dev/shm/%s found", self.subscriber.layout.name)
        return True

    def _count_subscribers(self) -> None:
        sock = self.socket
        while sock.poll(0, zmq.POLLIN):
            message = sock.recv()
            if message[:1] == b"\x01":
                self.subscribers += 1
            elif message[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    def _handle(self, image) -> None:
        metadata = image.metadata
        if not self.selector.select(metadata.image_id):
            return
        counters = self.counters
        counters.add("selected")
        data = image.data
        if metadata.compression != _NONE:
            # a compressed blob is decoded from a private copy taken while the slot still held it:
            # decoding the live slot, an overwrite between the decoder's checks and its reads could
            # lead it outside the blob, and a blob being overwritten would count as a corrupt one
            data = data.copy()
            if not image.intact():
                counters.add("dropped_torn")
                return
        try:
            parts = self.encode(metadata, data)
        except _DtypeError as exc:
            self._drop("dropped_dtype", str(exc))
            return
        except FormatError as exc:  # a metadata value the format cannot carry (a pco timestamp of 2**63)
            self._drop("dropped_format", f"image {metadata.image_id}: {exc}")
            return
        except CodecError as exc:
            self._drop("dropped_decode", f"image {metadata.image_id}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - what the checks missed costs this image, not the stream
            self._drop("dropped_decode", f"image {metadata.image_id}: cannot be sent: {type(exc).__name__}: {exc}")
            return
        if not image.intact():  # the slot changed while we copied it: never send a torn image
            counters.add("dropped_torn")
            return
        self._send(parts)
        counters.add("sent")

    def _drop(self, reason: str, message: str) -> None:
        self.counters.add(reason)
        self.last_error = message
        self.counters.warn(reason, log, "not sent: %s", message)

    def _send(self, parts: list) -> None:
        sock = self.socket
        last = len(parts) - 1
        try:
            sock.send(parts[0], zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again:
            # some subscriber's queue is full: it misses this image and those until it has read part
            # of its queue (not counted here, see the module docstring); the others get them
            self.counters.add("dropped_hwm")
            sock.setsockopt(zmq.XPUB_NODROP, 0)
            try:
                sock.send(parts[0], zmq.SNDMORE)
                for index in range(1, last + 1):
                    self._send_part(parts[index], index < last)
            finally:
                sock.setsockopt(zmq.XPUB_NODROP, 1)
            return
        for index in range(1, last + 1):
            self._send_part(parts[index], index < last)

    def _send_part(self, part, more: bool) -> None:
        flags = (zmq.SNDMORE if more else 0) | zmq.NOBLOCK
        if isinstance(part, zmq.Frame):  # already a private zmq message: handed over, no copy
            self.socket.send(part, flags, copy=False)
            return
        n_bytes = part.nbytes if isinstance(part, np.ndarray) else len(part)
        self.socket.send(part, flags, copy=n_bytes < ZERO_COPY_MIN_BYTES)

    # ------------------------------------------------------------------ per image
    def encode(self, metadata: ImageMetadata, data: np.ndarray) -> list:
        """The message parts of one image, in new memory (never a view of the slot).

        _DtypeError (a FormatError): the pixel type cannot be carried; FormatError: a metadata value
        the format cannot carry; CodecError: a compressed image does not decode.
        """
        dtype = numpy_dtype(metadata.dtype)
        shape = (metadata.height, metadata.width)
        compression = metadata.compression
        if self.stream_type == "array-1.0":
            encoder = self._encoder(Array10Encoder, shape, dtype)
            # raw pixels are copied straight into a zmq message: one memcpy, no Python buffer for
            # pyzmq to track; the caller checks the overwrite guard after this copy
            pixels = zmq.Frame(data, copy=True) if compression == _NONE else decode(metadata, data)
            return [encoder.header(metadata.image_id), pixels]
        encoder = self._encoder(BsreadEncoder, shape, dtype)
        if compression == _H5BSLZ4:  # already a filter-32008 chunk: passed through unchanged, if its
            # header says it holds this image (a blob cut short would go out as a normal message)
            check_chunk(compression, data, shape[0] * shape[1] * dtype.itemsize, dtype.itemsize)
            blob = zmq.Frame(data, copy=True)
        elif compression == _NONE:
            blob = bitshuffle_lz4_encode(data)
        else:
            blob = bitshuffle_lz4_encode(decode(metadata, data))
        if metadata.WhichOneof("image_metadata") == "pco":
            pco = metadata.pco
            name = pco.bsread_name or self._default_name
            # bsread readers take ns as the fraction of the second: a camera's ns of 10**9 or more
            # is carried into sec
            sec, ns = pco.global_timestamp_sec + pco.global_timestamp_ns // 1_000_000_000, \
                pco.global_timestamp_ns % 1_000_000_000
        else:
            name = self._default_name
            sec, ns = divmod(time.time_ns(), 1_000_000_000)
        return encoder.parts(metadata.image_id, name, sec, ns, blob)

    def _encoder(self, kind: type, shape: tuple[int, int], dtype: np.dtype):
        key = (shape, dtype.str)
        encoder = self._encoders.get(key)
        if encoder is None:
            if len(self._encoders) > 16:
                self._encoders.clear()
            try:
                encoder = kind(shape, dtype)
            except FormatError as exc:
                raise _DtypeError(str(exc)) from None
            self._encoders[key] = encoder
        return encoder


class _DtypeError(FormatError):
    """The stream format cannot carry the image's pixel type (counted dropped_dtype)."""


# ---------------------------------------------------------------- command line
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Stream images of a bus channel to ZeroMQ subscribers (array-1.0 or bsread).")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("stream_address", help="address to bind the output stream, e.g. tcp://*:9100")
    parser.add_argument("-s", "--source_suffix", "-si", "--source_suffix_image", dest="source_suffix",
                        default="image", help="channel suffix of the source's ring buffer (default: image)")
    parser.add_argument("-sm", "--source_suffix_meta", dest="metadata_suffix", default=None,
                        help="channel suffix of the source's metadata, when another than the ring's (upstream: "
                             "behind a std_delay_filter, -sm delay -si image); default: the same")
    parser.add_argument("-t", "--type", default="array-1.0", help="array-1.0 (default) or bsread")
    parser.add_argument("-f", "--forward", action="store_true", help="forward every image")
    parser.add_argument("-p", "--periodic", metavar="Y:N", help="N times a second send the next Y images")
    parser.add_argument("-b", "--batch", metavar="Y:N", help="send images with image_id %% N < Y")
    parser.add_argument("--hwm", type=c_int_count, default=None,
                        help="images queued per subscriber before it misses images (default: 64 MiB worth, <= 1000)")
    return parser


def build(config: DetectorConfig, args) -> LiveStream:
    mode = mode_for(config, args.stream_address, forward=args.forward, periodic=args.periodic, batch=args.batch)
    return LiveStream(config, args.stream_address, mode=mode, stream_type=args.type,
                      source_suffix=args.source_suffix, metadata_suffix=args.metadata_suffix, hwm=args.hwm)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("std_live_stream", build_parser(), build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
