"""Compression stages (SPEC section 7): ``<det>-image`` -> ``<det>-blosc2`` / ``<det>-h5bitshuffle-lz4``.

``std_data_compress_blosc2 detector.json -t THREADS [-l LEVEL=5]`` and
``std_data_compress_h5bitshuffle_lz4 detector.json -t THREADS [-b BLOCK_BYTES=0]`` (also
``python -m stddaq.services.compress blosc2|h5bitshuffle_lz4 detector.json ...``): one
implementation, the codec is the only difference.

Per image (``compress_into``, a plain function tested without sockets): a good raw image is
compressed straight into the output slot of the same id; any other image is copied as it is
(status and compression kept). Then the source slot is checked: if the producer reused it while
we read it, the result is thrown away and the image counted ``lost`` (never published). A
compressed image bigger than the slot (incompressible data) is counted ``too_big`` and not
published. The output channel has the source's slot size and slot count.

An output slot holds one image from the moment its compression starts until its metadata is
published (or the image is dropped): an image whose output slot is still held (by one in flight,
or by one finished and waiting in the outbox) waits until that one is published. Otherwise a
tiny ring, or a new run whose ids start again while earlier images wait to be published, would
publish an image over a slot that already holds another's bytes, with the guard saying complete.

Threads: with ``-t 1`` the loop thread compresses itself; with ``-t N`` it splits images in
batches of about 1 MiB, hands N - 1 of every N batches to N - 1 worker threads and compresses
the other itself (the codecs release the GIL, see ``stddaq.formats.compression``), and publishes
the results in the order the images came, so readers of the output see ids in source order. At
most ``2 * N`` batches are in flight, fewer images than slots. When the loop thread would wait
(nothing to receive, or too much in flight) and a batch handed to a worker has not been started
yet, the loop thread takes it back and compresses it itself: on a loaded machine the workers may
wait for a core, and the loop thread waited idle for them (A/B at 480x128 blosc2 -t 2, 10-11
kHz, 6 rounds each: 98-120 us CPU per image against 113-128; 4 rounds with zero lost against 2).

Falling behind: an image whose source slot the producer will overwrite within ``margin`` images
(it is already nearly a ring ahead) is given up before it is compressed, counted ``lost`` with a
warning. Compressing it would most likely be wasted (the result is thrown away when the slot is
overwritten meanwhile) and would put the stage further behind, so a stage fed a little faster
than it can go lost most of its images; now it keeps compressing at its full rate and loses only
the excess.

Publishing: finished images are published in order in bursts, when no further source image is
waiting (before the loop blocks), after about 1 MiB of images, and at the end of every loop
slice and at close. Messages sent back to back cost libzmq's I/O thread one wake-up instead of
one per image (at 480x128 its CPU per image halved); an image's slot is marked complete just
before its message goes, so readers never see a message before its data.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from stddaq.bus.publisher import ImagePublisher
from stddaq.bus.ram_buffer import RamBuffer
from stddaq.bus.subscriber import Image, ImageSubscriber
from stddaq.config import STAGE_SUFFIXES, DetectorConfig
from stddaq.errors import UsageError
from stddaq.formats.compression import (
    BLOSC2_MAX_LEVEL,
    bitshuffle_lz4_encode_into,
    blosc2_encode_into,
    blosc2_encoder_at,
    check_block_bytes,
    single_threaded_openmp,
)
from stddaq.protocol import ImageMetadataCompression, ImageMetadataStatus
from stddaq.services.base import ArgumentParser, Service, ascii_int, positive_int, service_main

log = logging.getLogger(__name__)

_GOOD = int(ImageMetadataStatus.good_image)
_NONE = int(ImageMetadataCompression.none)

#: What ``compress_into`` did with one image.
COMPRESSED, FORWARDED, TOO_BIG, LOST = "compressed", "forwarded", "too_big", "lost"
GIVEN_UP = "given_up"  # not compressed: its source slot was about to be overwritten (counted lost)
ERROR = "errors"  # an exception while compressing: counted, logged, image not published
#: Images per hand-off to a worker thread: about this many bytes of images (at least one).
BATCH_BYTES = 1 << 20
#: How often the loop says again that it waits for a missing source buffer.
WAIT_LOG_PERIOD = 10.0


@dataclass(frozen=True)
class Codec:
    """One compression of SPEC 7: its output suffix, metadata value and encoder."""

    name: str  # the CLI word and the service name's tail
    suffix: str
    compression: int
    encode_into: Callable[[np.ndarray, np.ndarray], int]  # (pixels, slot) -> bytes written, 0 = does not fit
    #: the same between addresses, where the codec has it (blosc2_encoder_at):
    #: (source, n_bytes, itemsize, out, capacity) -> bytes written, 0 = does not fit
    encode_at: Callable[[int, int, int, int, int], int] | None = None


#: blosc2 level 0 stores the image as it is plus a 32-byte header: it never fits a slot.
MIN_LEVEL = 1


def blosc2_codec(level: int = 5) -> Codec:
    if not MIN_LEVEL <= level <= BLOSC2_MAX_LEVEL:
        raise UsageError(f"-l/--level {level} is not allowed (allowed: {MIN_LEVEL}..{BLOSC2_MAX_LEVEL})")
    return Codec("blosc2", STAGE_SUFFIXES["blosc2"], int(ImageMetadataCompression.blosc2),
                 lambda pixels, out: blosc2_encode_into(pixels, out, level), blosc2_encoder_at(level))


def bitshuffle_lz4_codec(block_bytes: int, itemsize: int) -> Codec:
    try:
        check_block_bytes(block_bytes, itemsize)
    except ValueError as exc:
        raise UsageError(f"-b/--block_size: {exc}") from None
    return Codec("h5bitshuffle_lz4", STAGE_SUFFIXES["h5bitshuffle_lz4"], int(ImageMetadataCompression.h5bitshuffle_lz4),
                 lambda pixels, out: bitshuffle_lz4_encode_into(pixels, out, block_bytes))


def compress_into(codec: Codec, image: Image, slot: np.ndarray, slot_address: int | None = None) -> tuple[str, int]:
    """Compress (good raw image) or copy (any other) ``image`` into ``slot``: (outcome, bytes).

    ``slot`` must already be marked as being written; with its ``slot_address`` given, a codec
    that has ``encode_at`` is called with addresses. The outcome is ``lost`` when the source slot
    no longer holds the image afterwards: what was read may be torn, so it must not go on.
    """
    metadata = image.metadata
    if metadata.status == _GOOD and metadata.compression == _NONE:
        pixels = image.data
        if slot_address is not None and codec.encode_at is not None:
            n_bytes = codec.encode_at(image.address, pixels.nbytes, pixels.itemsize, slot_address, slot.nbytes)
        else:
            n_bytes = codec.encode_into(pixels, slot)
        outcome = COMPRESSED if n_bytes else TOO_BIG
    else:
        blob = image.data.reshape(-1).view(np.uint8)
        n_bytes = blob.nbytes
        slot[:n_bytes] = blob
        outcome = FORWARDED
    if not image.intact():
        return LOST, 0
    return outcome, n_bytes


def give_up_margin(n_slots: int, threads: int) -> int:
    """Give an image up when its slot is overwritten within this many images (module docstring):
    one more than the threads compressing at once (while a thread compresses one image, a
    producer about as fast writes about one per thread), a quarter of the ring at most on tiny
    rings; on large rings 1/32 of the ring (the stage is hopelessly behind by then). Below
    ``n_slots``: on a 1-slot ring it is 0, and only an image already being overwritten is given up."""
    return min(n_slots - 1, max(1, min(threads + 1, n_slots // 4), n_slots // 32))


class Compressor(Service):
    """Reads ``<det>-<source>``, writes ``<det>-<codec suffix>`` (see module docstring)."""

    def __init__(self, config: DetectorConfig, codec: Codec, *, threads: int = 1, source_suffix: str = "image",
                 **kw) -> None:
        if threads < 1:
            raise UsageError(f"-t/--threads {threads} is not allowed: must be >= 1")
        self.name = f"std_data_compress_{codec.name}"
        super().__init__(config, **kw)
        self.codec = codec
        self.threads = threads
        self.source_suffix = source_suffix
        self.batch_images = max(1, BATCH_BYTES // config.image_n_bytes)
        # every in-flight image needs its own output slot, so fewer than n_slots of them
        self.max_in_flight = max(1, min(2 * threads * self.batch_images, config.n_slots - 1))
        self._in_flight = 0
        self._turn = 0  # which of the THREADS compresses the next batch (0: the loop thread)
        self.margin = give_up_margin(config.n_slots, threads)
        self.subscriber: ImageSubscriber | None = None
        self.publisher: ImagePublisher | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[list[Image], Future]] = deque()
        #: output slots of the images taken in and not yet published or dropped: a slot is written
        #: by one image at a time, and its image must be published before another one is written there
        self._held_slots: set[int] = set()
        self._outbox: list = []  # metadata of finished images, published by _flush
        self._next_wait_log = 0.0
        self._source_seen = False
        self.counters.declare(COMPRESSED, TOO_BIG, "not_good")
        self.counters.declare_ratio("ratio", "uncompressed_bytes", "compressed_bytes")

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        config = self.config
        self.publisher = ImagePublisher(config, self.codec.suffix, ctx=self.ctx).open()
        self.subscriber = ImageSubscriber(config, self.source_suffix, ctx=self.ctx, stats=self.counters).connect()
        self.endpoints = {"source": self.subscriber.address, "metadata": self.publisher.address,
                          "buffer": f"/dev/shm/{self.publisher.layout.name}"}
        single_threaded_openmp()
        if self.threads > 1:  # the loop thread is one of the THREADS (see _submit)
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix=self.name,
                                            initializer=single_threaded_openmp)
        self._attach_source()
        log.info("%s: %s -> %s with %d thread%s", self.name, self.subscriber.address, self.publisher.address,
                 self.threads, "" if self.threads == 1 else "s")

    def _attach_source(self) -> None:
        """Say (now and then) that the source buffer is missing; the subscriber maps it itself
        when the first image arrives. Mapping it here as soon as its name exists would race
        with its writer, which creates the slots first (size 0 for a moment) and the overwrite
        guard after them."""
        subscriber = self.subscriber
        if subscriber.buffer is not None or self._source_seen:
            return
        if RamBuffer.exists(subscriber.layout.name):
            self._source_seen = True
            log.info("source /dev/shm/%s is there", subscriber.layout.name)
            return
        now = self.clock()
        if now >= self._next_wait_log:
            self._next_wait_log = now + WAIT_LOG_PERIOD
            log.info("waiting for the source /dev/shm/%s: start %s", subscriber.layout.name, subscriber.created_by)

    def _close(self) -> None:
        """What was taken in goes out; then threads, sockets and buffers are let go, even if that
        failed (a socket left open would hang the context's term() for ever)."""
        try:
            if self._pool is not None:
                while self._pending and self.publisher is not None:
                    self._finish(*self._pending.popleft())
            if self.publisher is not None:
                self._flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            self._outbox.clear()
            self._pending.clear()
            self._held_slots.clear()
            self._in_flight = 0
            if self.subscriber is not None:
                self.subscriber.close()
                self.subscriber = None
            if self.publisher is not None:
                self.publisher.close_for_readers()
                self.publisher = None

    # ------------------------------------------------------------------ the loop
    def _step(self) -> bool:
        """Take images for up to 50 ms; publish finished ones in order."""
        if self.subscriber.buffer is None:
            self._attach_source()
        if self._pool is None:
            return self._step_inline()
        pending, receive = self._pending, self.subscriber.receive
        end = time.monotonic() + 0.05
        while time.monotonic() < end and not self.stopping:
            while pending and pending[0][1].done():
                self._finish(*pending.popleft())
            if self._in_flight >= self.max_in_flight:
                if not self._steal():
                    self._finish(*pending.popleft())  # waits for the oldest
                continue
            image = receive(timeout=0)
            if image is None:  # nothing waiting: send what is done, take on unstarted work, then block
                self._flush()
                if self._steal():
                    continue
                image = receive(timeout=0.001 if pending else 0.05)
            if image is None:
                if not pending:
                    return True
                continue
            batch = [image]
            room = min(self.batch_images, self.max_in_flight - self._in_flight)
            while len(batch) < room and (image := receive(timeout=0)) is not None:
                batch.append(image)
            self._submit(batch)
        self._flush()
        return True

    def _step_inline(self) -> bool:
        """-t 1: the loop thread compresses; no hand-off cost per image."""
        receive, process = self.subscriber.receive, self._process
        end = time.monotonic() + 0.05
        account, flush = self._account, self._flush
        held, n_slots = self._held_slots, self.config.n_slots
        while True:
            image = receive(timeout=0)
            if image is None:  # nothing waiting: send what is done before blocking
                flush()
                image = receive(timeout=0.05)
                if image is None:
                    break
            if image.image_id % n_slots in held:  # a finished image waiting to be published has that slot
                flush()
            account(image, *process(image))
            if time.monotonic() >= end or self.stopping:
                break
        flush()
        return True

    def _process(self, image: Image) -> tuple[str, int | str]:
        """The work of one image, in a worker thread or inline: (outcome, bytes or error text)."""
        if self.subscriber.overtaken_within(image, self.margin):
            return GIVEN_UP, 0
        image_id = image.metadata.image_id
        publisher = self.publisher
        try:
            return compress_into(self.codec, image, publisher.begin(image_id), publisher.buffer.slot_address(image_id))
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the stage
            return ERROR, f"{type(exc).__name__}: {exc}"

    def _process_batch(self, batch: list[Image]) -> list[tuple[str, int | str]]:
        process = self._process
        return [process(image) for image in batch]

    def _submit(self, batch: list[Image]) -> None:
        """Hand a batch to the pool, or compress it here: the loop thread takes every THREADS-th
        batch itself, so THREADS threads compress with THREADS - 1 workers. One Python thread
        less contends for the GIL: every time a thread releases it (the loop thread does in each
        recv and send), a waiting one takes it and the first must wait to get it back; with
        three Python threads on 2 cores that cost a thread switch per image. Images go in
        batches because a hand-off between threads costs tens of microseconds, as much as
        compressing a small image."""
        n_slots = self.config.n_slots
        taken = self._held_slots
        for index, image in enumerate(batch):
            slot = image.image_id % n_slots
            if slot in taken:  # an image in flight or unpublished has that output slot: it goes out first
                for earlier in batch[:index]:
                    taken.discard(earlier.image_id % n_slots)
                if index:
                    self._submit(batch[:index])
                while slot in taken:
                    if self._pending:
                        self._finish(*self._pending.popleft())
                    else:
                        self._flush()
                self._submit(batch[index:])
                return
            taken.add(slot)
        self._in_flight += len(batch)
        self._turn = (self._turn + 1) % self.threads
        # every THREADS-th batch is compressed here
        future = self._pool.submit(self._process_batch, batch) if self._turn else self._done_here(batch)
        self._pending.append((batch, future))

    def _done_here(self, batch: list[Image]) -> Future:
        """Compress ``batch`` in this thread; the done Future keeps its place in the order."""
        future = Future()
        future.set_result(self._process_batch(batch))
        return future

    def _steal(self) -> bool:
        """Compress here the oldest batch no worker has started yet, instead of waiting idle.

        True if there was one. On a loaded machine a worker thread may wait for a core while
        the loop thread has nothing else to do (see the module docstring)."""
        pending = self._pending
        for index, (batch, future) in enumerate(pending):
            if future.cancel():  # not started: no worker will touch it now
                pending[index] = (batch, self._done_here(batch))
                return True
        return False

    def _finish(self, batch: list[Image], future: Future) -> None:
        self._in_flight -= len(batch)
        try:
            outcomes = future.result()
        except Exception as exc:  # noqa: BLE001 - _process catches per image; this is the pool failing
            outcomes = [(ERROR, f"{type(exc).__name__}: {exc}")] * len(batch)
        for image, outcome in zip(batch, outcomes, strict=True):
            self._account(image, *outcome)

    def _account(self, image: Image, outcome: str, n_bytes: int | str) -> None:
        """Count the outcome and publish what may go on (called in source order). The image's
        output slot stays held until it is published (``_flush``), or is let go here if the image
        will not be."""
        counters, metadata = self.counters, image.metadata
        slot = image.image_id % self.config.n_slots
        if outcome not in (COMPRESSED, FORWARDED):
            self._held_slots.discard(slot)
        if outcome == ERROR:
            counters.add(ERROR)
            self.last_error = f"image {image.image_id}: {n_bytes}"
            counters.warn(ERROR, log, "%s; not published", self.last_error)
            return
        if outcome == LOST:  # compress_into saw its source overwritten: what it read may be torn
            self.subscriber.give_up(image)  # counts it lost
            return
        if outcome == GIVEN_UP:
            self.subscriber.give_up(image)
            counters.warn(GIVEN_UP, log, "image %d given up (counted as lost): the stage is nearly a ring behind "
                          "its source, which overwrites that slot within %d images; the stage cannot keep up with "
                          "this rate (more threads, or a lower rate)", image.image_id, self.margin)
            return
        if outcome == TOO_BIG:
            counters.add(TOO_BIG)
            counters.warn(TOO_BIG, log, "image %d: its %s form does not fit the slot of %d bytes; not published "
                          "(counted as too_big)", image.image_id, self.codec.name, self.publisher.layout.slot_n_bytes)
            return
        if outcome == COMPRESSED:
            counters.add(COMPRESSED)
            counters.add("uncompressed_bytes", metadata.size or image.data.nbytes)
            counters.add("compressed_bytes", n_bytes)
            metadata.compression = self.codec.compression
            metadata.size = n_bytes
        elif metadata.status != _GOOD:
            counters.add("not_good")
        else:
            counters.add("passed_through")  # a good image already compressed at the source
        self._held_slots.add(slot)
        outbox = self._outbox
        outbox.append(metadata)
        if len(outbox) >= self.batch_images:
            self._flush()

    def _flush(self) -> None:
        """Publish the images done so far, in order. Sent back to back, their messages cost
        libzmq's I/O thread one wake-up and one write instead of one each per image."""
        outbox = self._outbox
        if outbox:
            publish, held, n_slots = self.publisher.publish, self._held_slots, self.config.n_slots
            for metadata in outbox:
                publish(metadata)
                held.discard(metadata.image_id % n_slots)
            outbox.clear()


# ---------------------------------------------------------------------- command line
def _level(text: str) -> int:
    value = _integer(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is not allowed: level 0 stores images uncompressed with a 32-byte "
                                         f"header, which never fits the slot (allowed: {MIN_LEVEL}..{BLOSC2_MAX_LEVEL})")
    if not MIN_LEVEL <= value <= BLOSC2_MAX_LEVEL:
        raise argparse.ArgumentTypeError(f"{value} is not allowed (allowed: {MIN_LEVEL}..{BLOSC2_MAX_LEVEL})")
    return value


def _integer(text: str) -> int:
    try:
        return ascii_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser(codec_name: str) -> ArgumentParser:
    parser = ArgumentParser(description=f"Compress <detector>-image into a {codec_name} channel (SPEC 7).")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("-t", "--threads", type=positive_int, required=True, help="compression threads")
    if codec_name == "blosc2":
        parser.add_argument("-l", "--level", type=_level, default=5, help="blosc2 level 1..9 (default 5)")
    else:
        parser.add_argument("-b", "--block_size", type=_integer, default=0,
                            help="bitshuffle block in bytes: 0 = default (8192), else a multiple of 8 x bytes per pixel")
    return parser


def _build(codec_name: str) -> Callable[[DetectorConfig, argparse.Namespace], Compressor]:
    def build(config: DetectorConfig, args: argparse.Namespace) -> Compressor:
        if codec_name == "blosc2":
            codec = blosc2_codec(args.level)
        else:
            codec = bitshuffle_lz4_codec(args.block_size, config.dtype.itemsize)
        return Compressor(config, codec, threads=args.threads)
    return build


def main_blosc2(argv: Sequence[str] | None = None) -> int:
    return service_main("std_data_compress_blosc2", build_parser("blosc2"), _build("blosc2"), argv)


def main_h5bitshuffle_lz4(argv: Sequence[str] | None = None) -> int:
    return service_main("std_data_compress_h5bitshuffle_lz4", build_parser("h5bitshuffle_lz4"),
                        _build("h5bitshuffle_lz4"), argv)


MAINS = {"blosc2": main_blosc2, "h5bitshuffle_lz4": main_h5bitshuffle_lz4, "h5bitshuffle-lz4": main_h5bitshuffle_lz4}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stddaq.services.compress blosc2|h5bitshuffle_lz4 detector.json ...``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python -m stddaq.services.compress {blosc2,h5bitshuffle_lz4} detector.json -t THREADS "
              "[-l LEVEL | -b BLOCK_BYTES]  (see CODEC --help)")
        return 0
    if not argv or argv[0] not in MAINS:
        print("std_data_compress: error: first argument must be the codec: blosc2 or h5bitshuffle_lz4 "
              f"(got {argv[0] if argv else 'nothing'!r})", file=sys.stderr)
        return 2
    return MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
