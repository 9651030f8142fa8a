"""Live stream benchmark: std_sim -> std_live_stream -> SUB sink, against a minimal raw pyzmq pipeline.

Baseline (same run, same shapes): a producer memcpy's frames into an mmap'd /dev/shm ring and sends
16 bytes of (id, size) on ipc; a forwarder reads the slot and sends [header, pixels] on a TCP PUB;
the sink is the same SUB loop for both. Figures (issue 3):
- forward 480x128 uint16 images/s, >= 0.9x baseline; forward 2016x2016 uint16 GB/s, >= 0.9x, and
  GB/s per core the service uses (goal >= 1);
- batch 1:1000 from a metadata-only source: metadata messages/s the service keeps up with (>= 100k);
- bsread from a raw source: bitshuffle-lz4 throughput per core vs upstream's rule (300 MB/s per core);
- p50/p99 latency source -> subscriber at 1 kHz, 480x128 (goal p99 < 1 ms).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time

import numpy as np
import zmq
from common import Timer, make_config, report, spawn

from stddaq.bus import ImagePublisher, image_metadata
from stddaq.formats.compression import bitshuffle_lz4_encode
from stddaq.patterns import Noise

HEADER = '{{"htype":"array-1.0", "shape":[{h},{w}], "type":"uint16", "frame":{i}}}'
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    ctx.term()
    return port


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- baseline roles
def raw_forwarder(name: str, height: int, width: int, n_slots: int, address: str) -> None:
    """Minimal forwarder: metadata from ipc, copy of the slot, two parts on a TCP PUB."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc:///tmp/{name}")
    pub = ctx.socket(zmq.PUB)
    pub.bind(address)
    slot = height * width * 2
    ring = None
    unpack = struct.Struct("<QQ").unpack
    while sub.poll(15_000):
        image_id, size = unpack(sub.recv())
        if ring is None:
            with open(f"/dev/shm/{name}", "rb") as f:
                ring = np.frombuffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), np.uint8)
        offset = (image_id % n_slots) * slot
        pub.send(HEADER.format(h=height, w=width, i=image_id).encode(), zmq.SNDMORE)
        pub.send(ring[offset:offset + size], copy=True)  # the cheapest way through pyzmq: one memcpy
    pub.close(1000)
    sub.close(0)
    ctx.term()


# ---------------------------------------------------------------- the sink (this process)
def sink(address: str, n_expected: int, start_producer, last_id: int, timeout: float = 15.0) -> tuple[Timer, int]:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    time.sleep(0.5)  # the subscription reaches the (re)starting PUB
    processes = start_producer()
    timer = Timer()
    received = 0
    while sub.poll(timeout * 1000):
        parts = sub.recv_multipart(copy=False)
        timer.tick()
        received += 1
        frame = json.loads(parts[0].bytes).get("frame")
        if frame is not None and frame >= last_id:
            break
    sub.close(0)
    ctx.term()
    for proc in processes:
        proc.wait(60)
    return timer, received


def forward(height: int, width: int, n_images: int, n_slots: int) -> None:
    config, path = make_config(height, width, n_slots=n_slots)
    gb = height * width * 2 / 1e9
    name = config.detector_name + "-raw"
    address = f"tcp://127.0.0.1:{free_port()}"
    forwarder = spawn(__file__, "forwarder", name, height, width, n_slots, address)
    time.sleep(0.5)
    base, _ = sink(address, n_images, lambda: [spawn(os.path.join(BENCH_DIR, "bench_bus.py"), "raw", name, height,
                                                     width, n_slots, n_images, 0), forwarder], n_images - 1)
    address = f"tcp://127.0.0.1:{free_port()}"
    live = spawn("-m", "stddaq.services.live_stream", path, address, "-f")
    time.sleep(1.0)
    cpu0 = cpu_seconds(live.pid)
    timer, received = sink(address, n_images, lambda: [spawn("-m", "stddaq.services.simulator", path, "--n-images",
                                                             n_images, "--wait-subscribers", 1)], n_images - 1)
    cpu = cpu_seconds(live.pid) - cpu0
    live.terminate()
    live.wait(30)
    rate = timer.rate()
    report(f"live_stream forward {height}x{width} uint16", rate, "images/s", base.rate(), ">= 0.9")
    report(f"live_stream forward {height}x{width} uint16", rate * gb, "GB/s", base.rate() * gb, ">= 0.9")
    print(f"  received {received}/{n_images}; service CPU {cpu:.2f} s -> {received * gb / cpu if cpu else 0:.2f} "
          "GB/s per core (goal >= 1)", flush=True)


def batch_metadata(n_images: int) -> None:
    config, path = make_config(48, 32, n_slots=n_images)
    address = f"tcp://127.0.0.1:{free_port()}"
    live = spawn("-m", "stddaq.services.live_stream", path, address, "-b", "1:1000")
    time.sleep(1.0)
    last = (n_images - 1) // 1000 * 1000
    timer, received = sink(address, n_images // 1000,
                           lambda: [spawn(os.path.join(BENCH_DIR, "bench_bus.py"), "meta", path, n_images)], last)
    live.terminate()
    live.wait(30)
    rate = (received - 1) * 1000 / (timer.last - timer.first) if received > 1 else 0.0
    base = raw_metadata_rate(n_images)
    report("live_stream batch 1:1000 metadata", rate, "msgs/s", base, ">= 100,000 msgs/s")


def raw_metadata_rate(n_images: int) -> float:
    """Baseline: a raw SUB reading n small messages from a PUB in another process."""
    name = f"benchraw{os.getpid()}"
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc:///tmp/{name}")
    producer = spawn(os.path.join(BENCH_DIR, "bench_bus.py"), "raw", name, 48, 32, 16, n_images, 1)
    timer = Timer()
    while timer.count < n_images and sub.poll(10_000):
        sub.recv()
        timer.tick()
    producer.wait()
    sub.close(0)
    ctx.term()
    return timer.rate()


def bsread_compression() -> None:
    pixels = Noise((2016, 2016), np.uint16).frames[0]
    bitshuffle_lz4_encode(pixels)
    start = time.process_time()
    n = 20
    for _ in range(n):
        bitshuffle_lz4_encode(pixels)
    mb_per_core = n * pixels.nbytes / 1e6 / (time.process_time() - start)
    report("bsread bitshuffle-lz4 of a raw 2016x2016 uint16 noise image", mb_per_core, "MB/s per core", 300.0,
           "upstream's rule: 1 core per 300 MB/s")


def latency_producer(config_path: str, n_images: int, rate: float) -> None:
    """Publishes images at ``rate`` whose first 8 bytes are the CLOCK_MONOTONIC send time (ns)."""
    from stddaq.config import DetectorConfig
    config = DetectorConfig.load(config_path)
    with ImagePublisher(config) as publisher:
        publisher.wait_for_subscribers(1, 30)
        time.sleep(0.5)
        metadata = image_metadata(config)
        frame = np.zeros(config.shape, config.dtype)
        stamp = frame.reshape(-1).view(np.uint8)[:8].view(np.int64)
        t0 = time.perf_counter()
        for image_id in range(n_images):
            wait = t0 + image_id / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            metadata.image_id = image_id
            stamp[0] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            publisher.publish_image(metadata, frame)
        time.sleep(1.0)


def latency(height: int = 480, width: int = 128, n_images: int = 3000, rate: float = 1000.0) -> None:
    """Source -> subscriber delay; the producer is its own process (a thread here would share the
    sink's GIL) and stamps the send time into the pixels, read back with the same system clock."""
    config, path = make_config(height, width, n_slots=1000)
    address = f"tcp://127.0.0.1:{free_port()}"
    live = spawn("-m", "stddaq.services.live_stream", path, address, "-f")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(address)
    time.sleep(0.5)
    producer = spawn(__file__, "latency-producer", path, n_images, rate)
    delays: list[float] = []
    while sub.poll(15_000):
        parts = sub.recv_multipart(copy=False)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sent = int(np.frombuffer(parts[1].buffer, np.int64, count=1)[0])
        delays.append((now - sent) / 1e9)
        if json.loads(parts[0].bytes)["frame"] == n_images - 1:
            break
    producer.wait(60)
    sub.close(0)
    live.terminate()
    live.wait(30)
    ctx.term()
    if delays:
        p50, p99 = np.percentile(np.array(delays) * 1e3, [50, 99])
        print(f"live_stream latency source->subscriber at {rate:g} Hz {height}x{width}: p50 {p50:.3f} ms, "
              f"p99 {p99:.3f} ms over {len(delays)} images (goal p99 < 1 ms)", flush=True)


def main() -> None:
    # a ring as long as the run: the service and the baseline forward every image (a short ring
    # would measure how many images the simulator overwrites, not how fast the stream forwards)
    forward(480, 128, 10_000, 10_000)
    forward(2016, 2016, 300, 300)
    batch_metadata(100_000)
    bsread_compression()
    latency()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "forwarder":
        name, h, w, slots, address = sys.argv[2:]
        raw_forwarder(name, int(h), int(w), int(slots), address)
    elif len(sys.argv) > 1 and sys.argv[1] == "latency-producer":
        latency_producer(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
