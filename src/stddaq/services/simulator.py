"""std_sim: produces images into ``<det>-image`` exactly like the assembly stage would."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from stddaq.bus.publisher import CLOSE_LINGER, ImagePublisher, image_metadata
from stddaq.config import DetectorConfig
from stddaq.errors import UsageError
from stddaq.formats import MAX_IMAGE_ID
from stddaq.patterns import Noise, Ramp
from stddaq.protocol import EGImageMetadata, GFImageMetadata, ImageMetadata, JFImageMetadata, PcoImageMetadata
from stddaq.services.base import (
    ArgumentParser,
    Service,
    non_negative_float,
    non_negative_int,
    number_type,
    positive_int,
    service_main,
)

log = logging.getLogger(__name__)

PATTERNS = ("ramp", "noise")


class Simulator(Service):
    """Writes ``n_images`` (or endless) images at ``rate`` Hz (0 = as fast as possible)."""

    name = "std_sim"

    def __init__(self, config: DetectorConfig, *, rate: float = 0.0, n_images: int | None = None,
                 start_id: int = 0, pattern: str = "ramp", suffix: str = "image",
                 wait_subscribers: int = 0, wait_timeout: float = 10.0, linger: float = 1.0, **kw) -> None:
        super().__init__(config, **kw)
        if pattern not in PATTERNS:
            raise ValueError(f"pattern {pattern!r} is not allowed (allowed: {', '.join(PATTERNS)})")
        if n_images is not None and start_id + n_images - 1 > MAX_IMAGE_ID:
            raise UsageError(f"--start-id {start_id} with --n-images {n_images} goes past the highest id the ring "
                             f"can hold, {MAX_IMAGE_ID}")
        self.rate = rate
        self.n_images = n_images
        self.start_id = start_id
        self.pattern = pattern
        self.suffix = suffix
        self.wait_subscribers = wait_subscribers
        self.wait_timeout = wait_timeout
        self.linger = linger
        self.next_id = start_id
        self.publisher: ImagePublisher | None = None

    def _start(self) -> None:
        config = self.config
        # the buffer first: it checks /dev/shm has room for it (an image too big for memory is
        # refused so, with exit 2, not by a MemoryError of the pattern, restarted again and again)
        self.publisher = ImagePublisher(config, self.suffix, ctx=self.ctx).open()
        self._generator = (Ramp if self.pattern == "ramp" else Noise)(config.shape, config.dtype)
        self.endpoints = {"metadata": self.publisher.address, "buffer": f"/dev/shm/{self.publisher.layout.name}"}
        self._metadata = image_metadata(config)
        self._fill_detector_fields(self._metadata, 0)
        if self.wait_subscribers:
            deadline = time.monotonic() + self.wait_timeout
            while not self.publisher.wait_for_subscribers(self.wait_subscribers, 0.1):
                if self.stopping:  # in slices: a stop while it waits is not kept waiting
                    return
                if time.monotonic() < deadline:
                    continue
                log.warning("only %d of %d subscribers after %.1f s; starting anyway",
                            self.publisher.subscriber_count(), self.wait_subscribers, self.wait_timeout)
                break
        self._t0 = self.clock()
        log.info("simulating %s %s images %dx%d (%s pattern) on %s at %s", self.n_images or "endless",
                 config.detector_type, config.image_pixel_height, config.image_pixel_width, self.pattern,
                 self.publisher.address, f"{self.rate:g} Hz" if self.rate else "full speed")

    def _fill_detector_fields(self, metadata: ImageMetadata, image_id: int) -> None:
        kind = self.config.detector_type
        now_ns = time.time_ns()
        if kind == "gigafrost":
            metadata.gf.CopyFrom(GFImageMetadata(scan_id=1, scan_time=min(int(1e6 / self.rate), _U32_MAX) if self.rate else 0,
                                                 sync_time=0, frame_timestamp=now_ns // 1000,
                                                 exposure_time=1000, store_image=True))
        elif kind == "pco":
            metadata.pco.CopyFrom(PcoImageMetadata(global_timestamp_sec=now_ns // 1_000_000_000,
                                                   global_timestamp_ns=now_ns % 1_000_000_000,
                                                   bsread_name=f"{self.config.detector_name}:FPICTURE"))
        elif kind == "eiger":
            metadata.eg.CopyFrom(EGImageMetadata(exptime=1000))
        else:
            metadata.jf.CopyFrom(JFImageMetadata(daq_rec=image_id & 0xFFFF))

    def _step(self) -> bool:
        """Publish images for up to 50 ms, pacing them at ``rate``; False when done."""
        publisher, metadata, stats = self.publisher, self._metadata, self.counters
        # the typed slot view and the guard mark straight from the buffer: begin()'s uint8 view
        # would be made and thrown away per image
        slot_array, begin_write, fill = publisher.buffer.slot_array, publisher.buffer.begin_write, self._generator.fill
        kind = self.config.detector_type
        shape, dtype = self.config.shape, self.config.dtype
        n_bytes = metadata.size
        clock, rate = self.clock, self.rate
        step_end = clock() + 0.05  # return often enough for stop() and the stats line
        end_id = None if self.n_images is None else self.start_id + self.n_images
        image_id = self.next_id
        while True:
            if image_id == end_id:
                self._finish()
                return False
            if rate:
                wait = self._t0 + (image_id - self.start_id) / rate - clock()
                if wait > 0.05:
                    self._stop.wait(0.05)
                    return True
                if wait > 0:
                    time.sleep(wait)
            begin_write(image_id)
            fill(image_id, slot_array(image_id, shape, dtype))
            metadata.image_id = image_id
            if kind == "gigafrost":
                metadata.gf.frame_timestamp = time.time_ns() // 1000
            elif kind == "pco":
                now_ns = time.time_ns()
                metadata.pco.global_timestamp_sec = now_ns // 1_000_000_000
                metadata.pco.global_timestamp_ns = now_ns % 1_000_000_000
            elif kind != "eiger":
                metadata.jf.daq_rec = image_id & 0xFFFF
            publisher.publish(metadata)
            stats.processed(n_bytes)
            image_id += 1
            self.next_id = image_id
            if clock() >= step_end:
                return True

    def _finish(self) -> None:
        """Give subscribers time to read the last images before the buffer goes away."""
        log.info("sent %d images (ids %d..%d)", self.next_id - self.start_id, self.start_id, self.next_id - 1)
        if self.linger:
            self._stop.wait(self.linger)

    def _close(self) -> None:
        if self.publisher is not None:
            finished = self.n_images is not None and self.next_id >= self.start_id + self.n_images
            if self.linger and not finished:  # stopped: readers still get what is queued (_finish waited else)
                self.publisher.hold_for_readers(min(self.linger, CLOSE_LINGER))
            self.publisher.close(linger=min(self.linger, 1.0))
            self.publisher = None


_U32_MAX = (1 << 32) - 1  # GigaFRoST scan_time (us) is a uint32
#: ``--start-id``: an id the ring's overwrite guard can hold (stddaq.formats.MAX_IMAGE_ID)
start_id = number_type(int, "an integer", f"0..{MAX_IMAGE_ID}", lambda v: 0 <= v <= MAX_IMAGE_ID, "start_id")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Simulate a detector: write images into <detector>-image.")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("--rate", type=non_negative_float, default=0.0, help="images per second, 0 = as fast as possible")
    parser.add_argument("--n-images", "-n", type=positive_int, default=None, help="stop after N images (default: endless)")
    parser.add_argument("--start-id", type=start_id, default=0, help="id of the first image")
    parser.add_argument("--pattern", choices=PATTERNS, default="ramp")
    parser.add_argument("--suffix", "-s", default="image", help="channel suffix to write (default: image)")
    parser.add_argument("--wait-subscribers", type=non_negative_int, default=0,
                        help="wait for this many metadata subscribers before the first image")
    parser.add_argument("--linger", type=non_negative_float, default=1.0,
                        help="seconds to keep the buffer after the last image, for slow readers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("std_sim", build_parser(), lambda config, a: Simulator(
        config, rate=a.rate, n_images=a.n_images, start_id=a.start_id, pattern=a.pattern, suffix=a.suffix,
        wait_subscribers=a.wait_subscribers, linger=a.linger), argv)


if __name__ == "__main__":
    raise SystemExit(main())
