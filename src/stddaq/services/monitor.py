"""std_bus_monitor: reads a bus channel and prints its stats line (rate, lost, gaps, invalid).

With ``--verify ramp`` it also checks every raw image against the simulator's ramp, so a
deployment fed by ``std_sim`` proves end to end that no image was corrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from stddaq.bus.subscriber import ImageSubscriber
from stddaq.config import DetectorConfig
from stddaq.formats import compression as codecs
from stddaq.patterns import Ramp
from stddaq.protocol import ImageMetadataCompression
from stddaq.services.base import ArgumentParser, Service, service_main

log = logging.getLogger(__name__)


class BusMonitor(Service):
    name = "std_bus_monitor"

    def __init__(self, config: DetectorConfig, *, suffix: str = "image", verify: str | None = None, **kw) -> None:
        super().__init__(config, **kw)
        self.suffix = suffix
        self.verify = verify
        self.counters.declare("corrupt")
        self.subscriber: ImageSubscriber | None = None

    def _start(self) -> None:
        self.subscriber = ImageSubscriber(self.config, self.suffix, ctx=self.ctx, stats=self.counters).connect()
        self.endpoints = {"metadata": self.subscriber.address}
        self._ramp = Ramp(self.config.shape, self.config.dtype) if self.verify == "ramp" else None
        self._expected = np.empty(self.config.shape, self.config.dtype) if self._ramp else None

    def _step(self) -> bool:
        image = self.subscriber.receive(timeout=0.1)
        if image is None:
            return True
        if self._ramp is None:
            self.subscriber.confirm(image)
            return True
        self._ramp.fill(image.image_id, self._expected)
        metadata = image.metadata
        if metadata.compression == ImageMetadataCompression.none:
            equal, problem = np.array_equal(image.data, self._expected), "does not match the ramp pattern"
        else:  # a compressed channel: its pixels are checked too (they were not: corrupt=0 said nothing)
            blob = image.data.copy()  # decoded from a copy: an overwrite meanwhile is no corrupt blob
            try:
                pixels = codecs.decode(metadata, blob)
                equal, problem = np.array_equal(pixels, self._expected), "decodes to pixels that are not the ramp"
            except codecs.CodecError as exc:
                equal, problem = False, f"does not decode: {exc}"
        if self.subscriber.confirm(image) and not equal:
            self.counters.add("corrupt")
            self.counters.warn("corrupt", log, "image %d %s", image.image_id, problem)
        return True

    def _close(self) -> None:
        if self.subscriber is not None:
            self.subscriber.close()
            self.subscriber = None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Read a bus channel and print its stats line.")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("-s", "--source_suffix", default="image", help="channel suffix to read (default: image)")
    parser.add_argument("--verify", choices=("ramp",), default=None, help="check pixels against a pattern")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("std_bus_monitor", build_parser(),
                        lambda config, a: BusMonitor(config, suffix=a.source_suffix, verify=a.verify), argv)


if __name__ == "__main__":
    raise SystemExit(main())
