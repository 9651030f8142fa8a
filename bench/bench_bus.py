"""Bus benchmark: std_sim -> ImageSubscriber against a minimal raw pyzmq + memcpy pair.

Figures (issue: the bus): images/s and GB/s for 480x128 and 2016x2016 uint16, goal >= 0.9x the
raw pair; metadata-only messages/s through ImageSubscriber, goal >= 100k/s (< 10 us per image),
against a raw SUB socket receiving the same messages.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

import numpy as np
import zmq
from common import Timer, make_config, report, spawn

from stddaq.bus import ImagePublisher, ImageSubscriber, image_metadata
from stddaq.config import DetectorConfig


# ---------------------------------------------------------------- baseline roles (subprocesses)
def raw_producer(name: str, height: int, width: int, n_slots: int, n_images: int, metadata_only: bool) -> None:
    """The minimal producer: memcpy a frame into an mmap'd /dev/shm slot, send 16 bytes of id+size."""
    slot = height * width * 2
    path = f"/dev/shm/{name}"
    with open(path, "w+b") as f:
        f.truncate(slot * n_slots)
        ring = mmap.mmap(f.fileno(), slot * n_slots)
    slots = np.frombuffer(ring, np.uint8).reshape(n_slots, slot)
    frame = (np.arange(height * width) % 65536).astype(np.uint16).view(np.uint8)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(f"ipc:///tmp/{name}")
    pub.recv()  # wait for the subscriber
    pack = struct.Struct("<QQ").pack
    for image_id in range(n_images):
        if not metadata_only:
            np.copyto(slots[image_id % n_slots], frame)
        pub.send(pack(image_id, slot))
    time.sleep(1.0)
    pub.close(2000)
    ctx.term()
    del slots
    os.unlink(path)
    os.unlink(f"/tmp/{name}")


def publisher_metadata_only(config_path: str, n_images: int) -> None:
    config = DetectorConfig.load(config_path)
    with ImagePublisher(config) as publisher:
        publisher.wait_for_subscribers(1, timeout=30)
        metadata = image_metadata(config)
        for image_id in range(n_images):
            publisher.begin(image_id)
            metadata.image_id = image_id
            publisher.publish(metadata)
        time.sleep(1.0)


# ---------------------------------------------------------------- consumers (this process)
def _wait_for(path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def consume_raw(name: str, height: int, width: int, n_slots: int, n_images: int, metadata_only: bool,
                drain: bool = False) -> float:
    """The baseline reader. ``drain``: wait until the producer has queued everything and ended,
    then read: the rate is then the reader's own, not the producer's."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc:///tmp/{name}")
    producer = spawn(__file__, "raw", name, height, width, n_slots, n_images, int(metadata_only))
    slot = height * width * 2
    _wait_for(f"/dev/shm/{name}")
    with open(f"/dev/shm/{name}", "rb") as f:
        ring = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    data = np.frombuffer(ring, np.uint8)
    if drain:
        producer.wait()
    timer = Timer()
    unpack = struct.Struct("<QQ").unpack
    while timer.count < n_images and sub.poll(10_000):
        image_id, size = unpack(sub.recv())
        view = data[(image_id % n_slots) * slot:(image_id % n_slots) * slot + size].view(np.uint16)
        del view
        timer.tick()
    producer.wait()
    sub.close(0)
    ctx.term()
    return timer.rate()


def consume_stddaq(config: DetectorConfig, producer_argv: list, n_images: int,
                   drain: bool = False) -> tuple[float, dict]:
    timer = Timer()
    with ImageSubscriber(config) as subscriber:
        producer = spawn(*producer_argv)
        if drain:
            subscriber.attach(wait=30)
            producer.wait()
        while timer.count < n_images:
            image = subscriber.receive(timeout=10)
            if image is None:
                break
            timer.tick()
            if image.image_id == n_images - 1:
                break
        producer.wait()
        totals = dict(subscriber.stats.totals())
    return timer.rate(), totals


def bench_images(height: int, width: int, n_images: int, n_slots: int) -> None:
    config, path = make_config(height, width, n_slots=n_slots)
    gb = height * width * 2 / 1e9
    base = consume_raw(config.detector_name + "-raw", height, width, n_slots, n_images, False)
    rate, totals = consume_stddaq(config, ["-m", "stddaq.services.simulator", path, "--n-images", n_images,
                                           "--wait-subscribers", 1, "--linger", 1], n_images)
    report(f"bus {height}x{width} uint16 std_sim->subscriber", rate, "images/s", base, ">= 0.9")
    report(f"bus {height}x{width} uint16 std_sim->subscriber", rate * gb, "GB/s", base * gb, ">= 0.9")
    if totals["lost"] or totals["gaps"]:
        print(f"  note: lost={totals['lost']} gaps={totals['gaps']} of {n_images}", flush=True)


def bench_metadata(n_images: int) -> None:
    """Per-message cost of the reader alone: the producer queues every message (fewer than the
    queue holds) and ends before the reader starts, so the reader never waits for the producer."""
    # one slot per message: the producer writes no pixels, so the slots cost no memory, and no
    # slot is reused while its metadata waits in the queue (that would be counted as lost)
    config, path = make_config(48, 32, n_slots=n_images)
    base = consume_raw(config.detector_name + "-raw", 48, 32, n_images, n_images, True, drain=True)
    rate, totals = consume_stddaq(config, [__file__, "meta", path, n_images], n_images, drain=True)
    report("bus metadata-only ImageSubscriber.receive", rate, "msgs/s", base, ">= 100,000 msgs/s")
    overhead_us = (1 / rate - 1 / base) * 1e6 if rate and base else float("nan")
    print(f"bus subscriber per-image overhead over raw SUB: {overhead_us:.2f} us (goal < 10 us); "
          f"per image in all: {1e6 / rate:.2f} us; lost={totals['lost']} gaps={totals['gaps']}", flush=True)


def main() -> None:
    bench_images(480, 128, 20_000, 1000)
    bench_images(2016, 2016, 1500, 64)
    bench_metadata(90_000)  # below the 100k-message queues: nothing is dropped while queued


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        name, h, w, slots, n, meta = sys.argv[2:]
        raw_producer(name, int(h), int(w), int(slots), int(n), meta == "1")
    elif len(sys.argv) > 1 and sys.argv[1] == "meta":
        publisher_metadata_only(sys.argv[2], int(sys.argv[3]))
    else:
        main()
