"""Compression stages: std_sim -> std_data_compress_* -> ImageSubscriber, decoded independently.

The per-image function is tested on a real ring without sockets (including an overwrite during
compression); the stages run as real subprocesses between real shm rings and ipc sockets.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import bitshuffle
import blosc2
import h5py
import hdf5plugin
import numpy as np
import pytest
import zmq
from conftest import LateReader, wait_until

from stddaq.bus import Image, ImagePublisher, ImageSubscriber, RamBuffer, image_metadata
from stddaq.bus.ram_buffer import BufferLayout
from stddaq.deploy import plan
from stddaq.errors import BusError, ConfigError
from stddaq.formats.compression import bitshuffle_lz4_header, decode
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, ImageMetadataStatus
from stddaq.services.compress import (
    COMPRESSED,
    FORWARDED,
    GIVEN_UP,
    LOST,
    TOO_BIG,
    Codec,
    Compressor,
    bitshuffle_lz4_codec,
    blosc2_codec,
    compress_into,
)
from stddaq.stats import Stats

SIM = "stddaq.services.simulator"
STAGE = "stddaq.services.compress"
SUFFIX = {"blosc2": "blosc2", "h5bitshuffle_lz4": "h5bitshuffle-lz4"}
COMPRESSION = {"blosc2": ImageMetadataCompression.blosc2,
               "h5bitshuffle_lz4": ImageMetadataCompression.h5bitshuffle_lz4}


# ---------------------------------------------------------------------- helpers
def subscribe(config, suffix: str, timeout: float = 10.0) -> ImageSubscriber:
    """A subscriber on ``suffix`` connected to its (running) publisher, so it misses no image."""
    return ImageSubscriber(config, suffix).connect(wait=timeout)


def stop(stage) -> str:
    """SIGTERM the stage, check it exits 0, return its stderr."""
    stage.proc.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=20) == 0
    return stage.output()[1]


def stage_totals(stderr: str, detector: str, service: str) -> dict[str, int]:
    """Sum of every counter over all stats lines the stage printed."""
    totals: dict[str, int] = {}
    for line in stderr.splitlines():
        if f"detector={detector},service={service}," not in line:
            continue
        for key, value in re.findall(r"(\w+)=(\d+)(?:,|$)", line.split("stddaq.stats: ", 1)[-1]):
            totals[key] = totals.get(key, 0) + int(value)
    assert totals, f"no stats line of {service} in:\n{stderr}"
    return totals


def check_independently(name: str, blob: np.ndarray, expected: np.ndarray, block_bytes: int = 0) -> None:
    """Decode ``blob`` with the libraries directly, not with stddaq's own decode()."""
    if name == "blosc2":
        assert blosc2.decompress(blob.tobytes()) == expected.tobytes()
        return
    n_bytes, header_block = bitshuffle_lz4_header(blob)
    assert n_bytes == expected.nbytes and header_block == (block_bytes or 8192)
    pixels = bitshuffle.decompress_lz4(blob[12:], expected.shape, expected.dtype, header_block // expected.itemsize)
    assert np.array_equal(pixels, expected)


# ---------------------------------------------------------------------- the per-image function
@pytest.fixture
def source_ring(make_config):
    config, _ = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=4)
    buffer = RamBuffer.create(BufferLayout.of(config, "image"))
    try:
        yield config, buffer
    finally:
        buffer.close()


def put(config, buffer: RamBuffer, image_id: int, pixels: np.ndarray, status=ImageMetadataStatus.good_image) -> Image:
    buffer.begin_write(image_id)
    view = buffer.slot_array(image_id, config.shape, config.dtype)
    view[:] = pixels
    buffer.end_write(image_id)
    metadata = image_metadata(config, image_id)
    metadata.status = status
    return Image(metadata, view, buffer)


@pytest.mark.parametrize("codec", [blosc2_codec(5), blosc2_codec(1), bitshuffle_lz4_codec(0, 2),
                                   bitshuffle_lz4_codec(256, 2)], ids=["blosc2", "blosc2-l1", "bs", "bs-256"])
def test_compress_into_compresses_forwards_and_refuses(source_ring, codec: Codec) -> None:
    config, buffer = source_ring
    slot = np.zeros(config.image_n_bytes, np.uint8)
    pixels = ramp(9, config.shape, config.dtype)
    image = put(config, buffer, 9, pixels)
    outcome, n_bytes = compress_into(codec, image, slot)
    assert outcome == COMPRESSED and 0 < n_bytes < pixels.nbytes
    # as the stage calls it, with the output slot's address (blosc2 then compresses between addresses)
    by_address = np.zeros_like(slot)
    assert compress_into(codec, image, by_address, by_address.ctypes.data) == (COMPRESSED, n_bytes)
    assert np.array_equal(by_address, slot)
    image.metadata.compression, image.metadata.size = codec.compression, n_bytes
    assert np.array_equal(decode(image.metadata, slot[:n_bytes]), pixels)

    # a damaged image goes on as it is, byte for byte
    image = put(config, buffer, 10, pixels, ImageMetadataStatus.missing_packets)
    slot[:] = 0
    assert compress_into(codec, image, slot) == (FORWARDED, pixels.nbytes)
    assert slot.tobytes() == pixels.tobytes()

    # incompressible: does not fit the slot (blosc2 may have written part of it: the caller
    # marked the slot as being written and publishes nothing, so no reader takes it)
    noise = np.random.default_rng(1).integers(0, 1 << 16, config.shape, dtype=np.uint16)
    image = put(config, buffer, 11, noise)
    assert compress_into(codec, image, slot) == (TOO_BIG, 0)


def test_compress_into_reports_a_source_overwritten_meanwhile(source_ring) -> None:
    config, buffer = source_ring
    image = put(config, buffer, 5, ramp(5, config.shape, config.dtype))
    real = blosc2_codec()

    def overwritten_while_compressing(pixels: np.ndarray, out: np.ndarray) -> int:
        n_bytes = real.encode_into(pixels, out)
        buffer.begin_write(5 + config.n_slots)  # the producer reuses the slot
        return n_bytes

    codec = Codec("blosc2", "blosc2", real.compression, overwritten_while_compressing)
    assert compress_into(codec, image, np.zeros(config.image_n_bytes, np.uint8)) == (LOST, 0)


def test_an_image_about_to_be_overwritten_is_given_up_before_compressing(source_ring) -> None:
    """A stage nearly a ring behind gives the image up (counted lost) instead of compressing it:
    the work would most likely be thrown away and put the stage further behind."""
    config, buffer = source_ring  # 4 slots
    stage = Compressor(config, blosc2_codec(), threads=1)
    assert stage.margin == 1
    stage.subscriber = ImageSubscriber(config)  # not connected: its bookkeeping is what is used here
    image = put(config, buffer, 5, ramp(5, config.shape, config.dtype))
    buffer.begin_write(5 + config.n_slots - 2)  # the producer is 2 ahead: the slot lives 2 more images
    assert not stage.subscriber.overtaken_within(image, stage.margin)
    buffer.begin_write(5 + config.n_slots - 1)  # 3 ahead: the next image overwrites it
    assert stage.subscriber.overtaken_within(image, stage.margin)
    assert stage._process(image) == (GIVEN_UP, 0)  # decided before any output slot is touched


def test_ids_left_by_an_earlier_run_are_not_taken_for_a_producer_far_ahead(make_config, service) -> None:
    """A producer whose ids go back in the same buffer (a new acquisition) leaves higher ids of
    the run before in the guard; a stage must not give the new run's images up for them."""
    config, _ = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=8)
    with ImagePublisher(config) as publisher, ImageSubscriber(config) as subscriber:
        publisher.wait_for_subscribers(1, timeout=10)
        pixels = np.zeros(config.shape, config.dtype)
        metadata = image_metadata(config)
        for image_id in [*range(100, 120), *range(0, 3)]:  # a run up to 119, then a new one from 0
            metadata.image_id = image_id
            publisher.publish_image(metadata, pixels)
        seen = []
        while (image := subscriber.receive(timeout=2)) is not None:
            seen.append(image.image_id)
            if image.image_id == 0:  # slot 7 (of id 7 = 0 + 8 - 1) holds 119 from the run before
                assert int(publisher.buffer.sequence[7]) == 2 * 119 + 2
                assert not subscriber.overtaken_within(image, margin=1)
            if image.image_id == 2:
                break
        assert seen[-3:] == [0, 1, 2]
        assert subscriber._newest_stale == 0 + config.n_slots - 1  # leftovers possible until the ring is filled once
        for image_id in range(3, 12):  # the new run fills the ring once and goes on
            metadata.image_id = image_id
            publisher.publish_image(metadata, pixels)
        images = {}
        while (image := subscriber.receive(timeout=2)) is not None:
            images[image.image_id] = image
            if image.image_id == 11:
                break
        # producer at 11: image 4's slot (reused by 12) is overwritten within 1 image; image 3 is gone already
        assert subscriber.overtaken_within(images[4], margin=1) and not subscriber.overtaken_within(images[4], 0)
        assert not subscriber.overtaken_within(images[5], margin=1)


def test_a_one_slot_ring_gives_nothing_up(make_config) -> None:
    config, _ = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=1)
    stage = Compressor(config, blosc2_codec(), threads=2)
    assert stage.margin == 0
    with RamBuffer.create(BufferLayout.of(config, "image")) as buffer:
        stage.subscriber = ImageSubscriber(config)  # not connected: its bookkeeping is what is used here
        image = put(config, buffer, 7, ramp(7, config.shape, config.dtype))
        assert not stage.subscriber.overtaken_within(image, stage.margin)


def test_connect_wait_says_when_no_publisher_comes(make_config) -> None:
    config, _ = make_config()
    subscriber = ImageSubscriber(config, "blosc2")
    with pytest.raises(BusError, match=f"no publisher at ipc:///tmp/{config.channel('blosc2')} after 0.2 s"):
        subscriber.connect(wait=0.2)
    assert subscriber.socket is None


def test_stats_line_prints_the_ratio() -> None:
    lines: list[str] = []
    stats = Stats("det", "svc", 1.0, clock=lambda: 0.0, emit=lines.append)
    stats.declare_ratio("ratio", "uncompressed_bytes", "compressed_bytes")
    assert stats.flush(1.0).endswith(",uncompressed_bytes=0,compressed_bytes=0,ratio=0.00")
    stats.add("uncompressed_bytes", 300)
    stats.add("compressed_bytes", 100)
    assert stats.flush(2.0).endswith(",ratio=3.00")


def test_stats_line_never_counts_below_zero_images() -> None:
    """Images given up in a period after the one that counted them processed (a stage's last ones,
    the source stopped) made that period's line say processed_times=-3 and a negative rate; the
    lines' sum still comes to the totals once images come again."""
    lines: list[str] = []
    stats = Stats("det", "svc", 1.0, clock=lambda: 0.0, emit=lines.append)
    for _ in range(10):
        stats.processed(100)
    stats.flush(1.0)
    for _ in range(3):  # given up (ImageSubscriber.give_up)
        stats.unprocessed(100)
    assert "processed_times=0,repetition_rate_hz=0.0,processed_bytes=0" in stats.flush(2.0)
    for _ in range(5):
        stats.processed(100)
    assert "processed_times=2,repetition_rate_hz=2.0,processed_bytes=200" in stats.flush(3.0)
    assert "processed_times=0," in stats.flush(4.0)
    assert stats.totals()["processed_times"] == 12
    assert sum(int(re.search(r"processed_times=(\d+)", line)[1]) for line in lines) == 12


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("codec,threads,extra,detector", [
    ("blosc2", 1, [], {}),
    ("blosc2", 2, ["-l", "9"], {"detector_type": "eiger", "bit_depth": 32}),
    ("h5bitshuffle_lz4", 2, [], {}),
    ("h5bitshuffle_lz4", 1, ["-b", "512"], {"detector_type": "eiger", "bit_depth": 8}),
])
def test_every_image_decodes_to_the_ramp_in_order(make_config, service, tmp_path, codec, threads, extra,
                                                  detector) -> None:
    config, path = make_config(image_pixel_height=40, image_pixel_width=72, ram_buffer_slots=400, **detector)
    n_images, start_id = 300, 50
    block_bytes = int(extra[1]) if extra[:1] == ["-b"] else 0
    stage = service(STAGE, codec, path, "-t", threads, *extra)
    h5 = h5py.File(tmp_path / "chunks.h5", "w")
    dataset = h5.create_dataset("data", (n_images, *config.shape), config.dtype, chunks=(1, *config.shape),
                                **hdf5plugin.Bitshuffle(nelems=block_bytes // config.dtype.itemsize, cname="lz4"))
    with subscribe(config, SUFFIX[codec]) as subscriber, h5:
        sim = service(SIM, path, "--n-images", n_images, "--start-id", start_id, "--rate", 1000,
                      "--wait-subscribers", 1)
        for index, expected_id in enumerate(range(start_id, start_id + n_images)):
            image = subscriber.receive(timeout=10)
            assert image is not None, f"nothing after image {expected_id - 1}"
            meta = image.metadata
            assert meta.image_id == expected_id
            assert meta.compression == COMPRESSION[codec]
            assert meta.status == ImageMetadataStatus.good_image
            assert (meta.height, meta.width) == config.shape
            assert meta.size == image.data.nbytes < config.image_n_bytes
            expected = ramp(expected_id, config.shape, config.dtype)
            assert np.array_equal(decode(meta, image.data), expected)
            check_independently(codec, image.data, expected, block_bytes)
            if codec == "h5bitshuffle_lz4":
                dataset.id.write_direct_chunk((index, 0, 0), image.data.tobytes())
            assert subscriber.confirm(image)
        assert sim.wait(timeout=30) == 0
        totals = subscriber.stats.totals()
        assert totals["lost"] == totals["gaps"] == totals["invalid"] == 0
    if codec == "h5bitshuffle_lz4":  # what an HDF5 reader sees: plain h5py, the filter from hdf5plugin
        with h5py.File(tmp_path / "chunks.h5", "r") as f:
            for index in (0, 1, n_images // 2, n_images - 1):
                assert np.array_equal(f["data"][index], ramp(start_id + index, config.shape, config.dtype))
    err = stop(stage)
    totals = stage_totals(err, config.detector_name, f"std_data_compress_{codec}")
    assert totals["compressed"] == totals["processed_times"] == n_images
    assert totals["lost"] == totals["too_big"] == totals["not_good"] == totals["gaps"] == 0
    assert re.search(r",ratio=\d+\.\d\d", err)
    assert not os.path.exists(f"/dev/shm/{config.channel(SUFFIX[codec])}")


def test_a_reader_behind_a_stage_never_takes_the_next_runs_image_under_its_metadata(make_config, service) -> None:
    """The stage's source began its ids again; so did the stage. A reader of the stage still
    reading the run before took the new run's blobs under the old run's metadata, the guard
    saying complete (review: 10 of 20 images, every counter 0)."""
    config, path = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=64)
    with ImagePublisher(config) as source:
        stage = service(STAGE, "blosc2", path, "-t", 2)
        assert source.wait_for_subscribers(1, timeout=10)
        with subscribe(config, "blosc2") as reader:
            output = RamBuffer.attach(BufferLayout.of(config, "blosc2"))
            try:
                for run in (1, 2):  # the reader reads nothing until both runs went through the stage
                    for image_id in range(10):
                        source.publish_image(image_metadata(config, image_id),
                                             ramp(image_id + 1000 * run, config.shape, config.dtype))
                    assert wait_until(lambda run=run: output.sent_last() == (run, 9), 10)
            finally:
                output.close()
            for image_id in range(10):
                image = reader.receive(timeout=5)
                assert image is not None and image.image_id == image_id
                assert np.array_equal(decode(image.metadata, image.data), ramp(image_id + 2000, config.shape,
                                                                               config.dtype))
            assert reader.stats.totals()["lost"] == 10
            assert reader.receive(timeout=0.5) is None
    stop(stage)


@pytest.mark.parametrize("codec", ["blosc2", "h5bitshuffle_lz4"])
def test_incompressible_and_damaged_images(make_config, service, codec) -> None:
    """Random images are counted too_big and never published; damaged ones go on uncompressed."""
    config, path = make_config(image_pixel_height=32, image_pixel_width=64, ram_buffer_slots=8)
    rng = np.random.default_rng(7)
    stage = service(STAGE, codec, path, "-t", 2)
    # id -> what the test sends: ramp (good), noise (good, incompressible) or damaged ramp
    plan = {i: "noise" if i % 5 == 2 else "damaged" if i % 7 == 3 else "ramp" for i in range(60)}
    with ImagePublisher(config) as source:
        assert source.wait_for_subscribers(1, timeout=10)
        with subscribe(config, SUFFIX[codec]) as subscriber:
            metadata = image_metadata(config)
            for image_id, kind in plan.items():
                metadata.image_id = image_id
                metadata.status = (ImageMetadataStatus.missing_packets if kind == "damaged"
                                   else ImageMetadataStatus.good_image)
                pixels = (rng.integers(0, 1 << 16, config.shape, dtype=np.uint16) if kind == "noise"
                          else ramp(image_id, config.shape, config.dtype))
                source.publish_image(metadata, pixels)
                if kind == "noise":
                    continue
                image = subscriber.receive(timeout=10)  # lockstep: the small ring is never overrun
                assert image is not None, f"image {image_id} did not come out"
                assert image.image_id == image_id
                if kind == "damaged":
                    assert image.metadata.compression == ImageMetadataCompression.none
                    assert image.metadata.status == ImageMetadataStatus.missing_packets
                    assert image.metadata.size == pixels.nbytes
                else:
                    assert image.metadata.compression == COMPRESSION[codec]
                assert np.array_equal(decode(image.metadata, image.data), pixels)
                assert subscriber.confirm(image)
            assert subscriber.receive(timeout=0.5) is None  # nothing else: the noise images were held back
    err = stop(stage)
    totals = stage_totals(err, config.detector_name, f"std_data_compress_{codec}")
    kinds = list(plan.values())
    assert totals["too_big"] == kinds.count("noise")
    assert totals["not_good"] == kinds.count("damaged")
    assert totals["compressed"] == kinds.count("ramp")
    assert totals["lost"] == 0
    assert "does not fit the slot" in err and "too_big" in err


def test_a_stage_behind_a_fast_source_loses_images_but_never_publishes_a_bad_one(make_config, service) -> None:
    """A tiny ring under a full-speed simulator: the stage falls behind; whatever it publishes
    is exact, the rest is counted lost/gaps."""
    config, path = make_config(image_pixel_height=128, image_pixel_width=128, ram_buffer_slots=4)
    n_images = 2000
    stage = service(STAGE, "h5bitshuffle_lz4", path, "-t", 2)
    good = 0
    with subscribe(config, "h5bitshuffle-lz4") as subscriber:
        service(SIM, path, "--n-images", n_images, "--wait-subscribers", 1)
        last_id = -1
        while (image := subscriber.receive(timeout=5)) is not None:
            assert image.image_id > last_id, "ids went back: the output order is broken"
            last_id = image.image_id
            blob = image.data.copy()  # the stage may be rewriting this slot: copy, confirm, decode
            if subscriber.confirm(image):
                assert np.array_equal(decode(image.metadata, blob), ramp(image.image_id, config.shape, config.dtype))
                good += 1
    assert good > 0
    err = stop(stage)
    totals = stage_totals(err, config.detector_name, "std_data_compress_h5bitshuffle_lz4")
    assert totals["compressed"] + totals["lost"] + totals["gaps"] == n_images
    assert totals["compressed"] >= good
    # the stats line's bytes are those of the images it counts processed, not of those it gave up
    assert totals["processed_bytes"] == totals["processed_times"] * config.image_n_bytes


def test_waits_for_a_missing_source_then_compresses(make_config, service) -> None:
    config, path = make_config()
    stage = service(STAGE, "blosc2", path, "-t", 1)
    with subscribe(config, "blosc2") as subscriber:
        assert not RamBuffer.exists(config.channel("image"))
        service(SIM, path, "--n-images", 20, "--wait-subscribers", 1)
        ids = []
        while len(ids) < 20 and (image := subscriber.receive(timeout=10)) is not None:
            assert np.array_equal(decode(image.metadata, image.data), ramp(image.image_id, config.shape, config.dtype))
            ids.append(image.image_id)
    assert ids == list(range(20))
    err = stop(stage)
    assert f"waiting for the source /dev/shm/{config.channel('image')}: start the simulator" in err


@pytest.mark.parametrize("args,message", [
    (["blosc2", "-t", "0"], "-t/--threads: 0 is not allowed"),
    (["blosc2", "-t", "x"], "-t/--threads"),
    (["blosc2"], "required: -t/--threads"),
    (["blosc2", "-t", "1", "-l", "12"], "-l/--level: 12 is not allowed (allowed: 1..9)"),
    (["blosc2", "-t", "1", "-l", "0"], "level 0 stores images uncompressed"),
    (["blosc2", "-t", "1", "-l", "-1"], "-l/--level"),
    (["h5bitshuffle_lz4", "-t", "1", "-b", "-16"], "block size -16 is not allowed"),
    (["h5bitshuffle_lz4", "-t", "1", "-b", "24"], "24 bytes is not a multiple of 16 (8 x 2 bytes per pixel)"),
    (["h5bitshuffle_lz4", "-t", "1", "-b", "4k"], "-b/--block_size"),
    (["h5bitshuffle_lz4", "-t", "1", "-b", " 16"], "-b/--block_size: ' 16' is not an integer"),
    (["blosc2", "-t", "1", "-l", "\u0665"], "-l/--level: '\u0665' is not an integer"),  # Arabic-Indic 5: int() takes it
    (["blosc2", "-t", "\uff12"], "-t/--threads: '\uff12' is not an integer"),  # fullwidth 2
    (["blosc2", "-t", "1_0"], "-t/--threads: '1_0' is not an integer"),
    (["h5bitshuffle_lz4", "-t", "1", "-b", str(2**32)], "must be at most 2113929216 (LZ4's largest input"),
    (["zstd", "-t", "1"], "must be the codec: blosc2 or h5bitshuffle_lz4"),
])
def test_bad_arguments_exit_2_with_one_line(make_config, service, args, message) -> None:
    _, path = make_config()
    stage = service(STAGE, args[0], path, *args[1:])
    assert stage.wait(timeout=30) == 2
    _, err = stage.output()
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_block_size_rule_uses_the_pixel_size(make_config, service) -> None:
    """-b must be a multiple of 8 x bytes per pixel: 48 is fine for uint16, not for uint32."""
    _, path = make_config(detector_type="eiger", bit_depth=32)
    stage = service(STAGE, "h5bitshuffle_lz4", path, "-t", "1", "-b", "48")
    assert stage.wait(timeout=30) == 2
    assert "48 bytes is not a multiple of 32 (8 x 4 bytes per pixel)" in stage.output()[1]


def test_images_sharing_an_output_slot_are_never_in_flight_together(make_config) -> None:
    """Image 0 is slow to compress, and its source slot is reused by image 4 meanwhile. 4 maps
    to the same output slot: the stage (in this process, -t 2) must not compress 4 until 0 is
    done, or 0's late write would land on 4's output. 0 is counted lost, 4 comes out exact."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=4)
    real = bitshuffle_lz4_codec(0, 2)

    def slow_for_image_0(pixels: np.ndarray, out: np.ndarray) -> int:
        read = pixels.copy()  # what it read before the producer came by
        time.sleep(0.4 if read.flat[0] == 0 else 0.05)  # ramp pixel (0, 0) of image id is 7 * id
        return real.encode_into(read, out)

    stage = Compressor(config, Codec(real.name, real.suffix, real.compression, slow_for_image_0), threads=2)
    with ImagePublisher(config) as source:
        stage.start()
        runner = threading.Thread(target=stage.run)
        runner.start()
        try:
            assert source.wait_for_subscribers(1, timeout=10)
            with subscribe(config, "h5bitshuffle-lz4") as subscriber:
                metadata = image_metadata(config)
                metadata.image_id = 0
                source.publish_image(metadata, ramp(0, config.shape, config.dtype))
                assert wait_until(lambda: stage._in_flight == 1, timeout=5)
                metadata.image_id = 4
                source.publish_image(metadata, ramp(4, config.shape, config.dtype))
                image = subscriber.receive(timeout=10)
                assert image is not None and image.image_id == 4
                pixels = np.array(decode(image.metadata, image.data))  # a copy: the ring goes away at the end
                intact = subscriber.confirm(image)
                del image
                assert intact and np.array_equal(pixels, ramp(4, config.shape, config.dtype))
        finally:
            stage.stop()
            runner.join(timeout=10)
            stage.close()
    totals = stage.stats()
    assert totals["compressed"] == 1 and totals["lost"] == 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scenario", ["tiny ring", "new run"])
def test_an_image_waiting_to_be_published_keeps_its_output_slot(make_config, threads, scenario) -> None:
    """A finished image waits in the outbox until the next burst is published. An image with the
    same output slot (a ring smaller than a burst, or a new run whose ids start again) must not
    be compressed there before it is published: checked at every publish, the slot holds
    exactly the image its message names. The source always has the next image waiting; the new
    run comes from a restarted source (a new buffer), so the old run's images stay readable."""
    n_slots = 4 if scenario == "tiny ring" else 64
    config, _ = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=n_slots)
    restarted, _ = make_config(image_pixel_height=40, image_pixel_width=56, ram_buffer_slots=n_slots)
    sources = [RamBuffer.create(BufferLayout.of(c, "image")) for c in (config, restarted)]
    if scenario == "tiny ring":
        plan = [(sources[0], image_id, ramp(image_id, config.shape, config.dtype)) for image_id in range(12)]
    else:
        plan = [(sources[run], image_id, ramp(image_id + 1000 * run, config.shape, config.dtype))
                for run in (0, 1) for image_id in range(10)]
    handed: list[tuple[Image, np.ndarray]] = []  # handed to the stage, not yet published or passed over
    checked: list[int] = []
    stage = Compressor(config, blosc2_codec(), threads=threads)
    try:
        stage.start()
        waiting = list(plan)

        def receive(timeout: float | None = 0.0) -> Image | None:
            if not waiting:
                return None
            source, image_id, pixels = waiting.pop(0)
            handed.append((put(config, source, image_id, pixels), pixels))
            return handed[-1][0]

        stage.subscriber.receive = receive
        out, publish = stage.publisher.buffer, stage.publisher.publish

        def checked_publish(metadata) -> None:
            publish(metadata)
            while handed[0][0].metadata is not metadata:  # images before it that were lost
                handed.pop(0)
            expected = handed.pop(0)[1]
            assert np.array_equal(decode(metadata, out.slot_bytes(metadata.image_id, metadata.size)), expected)
            checked.append(metadata.image_id)

        stage.publisher.publish = checked_publish
        while waiting or stage._pending:
            stage._step()
    finally:
        stage.stop()
        stage.close()
        for source in sources:
            source.close()
    totals = stage.stats()
    assert totals["compressed"] == len(checked) and totals["compressed"] + totals["lost"] == len(plan)
    assert len(checked) >= len(plan) // 2


def test_a_lost_image_is_counted_even_when_its_slot_holds_its_id_again(source_ring) -> None:
    """compress_into saw the source overwritten while it read (a new run writing the same id).
    By the time the loop thread accounts it, the slot holds that id complete again: it is still
    counted lost (what was read may be torn), not checked again and silently dropped."""
    config, buffer = source_ring
    stage = Compressor(config, blosc2_codec(), threads=2)
    stage.subscriber = ImageSubscriber(config, stats=stage.counters)  # not connected: bookkeeping only
    image = put(config, buffer, 5, ramp(5, config.shape, config.dtype))
    stage.counters.processed()  # as receive() counted it
    real = blosc2_codec()

    def rewritten_while_compressing(pixels: np.ndarray, out: np.ndarray) -> int:
        n_bytes = real.encode_into(pixels, out)
        buffer.begin_write(5)  # a new run writes id 5 again
        return n_bytes

    codec = Codec("blosc2", "blosc2", real.compression, rewritten_while_compressing)
    outcome = compress_into(codec, image, np.zeros(config.image_n_bytes, np.uint8))
    assert outcome == (LOST, 0)
    buffer.end_write(5)  # ... and has finished it before the image is accounted
    stage._account(image, *outcome)
    assert stage.stats()["lost"] == 1 and stage.stats()["processed_times"] == 0 and not stage._outbox


def test_a_failure_while_closing_still_lets_go_of_threads_sockets_and_buffers(make_config) -> None:
    """If publishing what is left fails at close, the error comes out, and the pool, the sockets
    and the shared memory are still let go (an open socket would hang close for ever)."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=8)
    stage = Compressor(config, blosc2_codec(), threads=2).start()
    metadata = image_metadata(config, 3)
    metadata.size = config.image_n_bytes + 1  # cannot be published: the last flush raises
    stage._outbox.append(metadata)
    with pytest.raises(BusError, match="does not fit a slot"):
        stage.close()
    assert stage._pool is None and stage.publisher is None and stage.subscriber is None


def test_images_published_at_close_still_reach_a_reader_slow_for_a_moment(make_config) -> None:
    """The stage's publisher was closed with linger 0: messages still queued in its socket (a
    reader not scheduled for a moment) were dropped, the tail of a run lost without a gap."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=8)
    stage = Compressor(config, blosc2_codec(), threads=2).start()
    reader = LateReader(config.ipc_address("blosc2"))
    try:
        assert stage.publisher.wait_for_subscribers(1, timeout=10)
        metadata = image_metadata(config)
        metadata.size = 100
        for image_id in range(20_000):  # about 1 MB of messages: more than the kernel's socket buffers hold
            metadata.image_id = image_id
            stage._outbox.append(ImageMetadata.FromString(metadata.SerializeToString()))
        reader.read_later()  # the reader comes back while the stage is closing
        stage.close()
        received = reader.join()
    finally:
        reader.close()
    assert len(received) == 20_000


def test_the_last_stats_line_counts_what_is_finished_while_closing(make_config, caplog) -> None:
    """The last stats line was printed before close(), which publishes the images still being
    compressed: the totals said fewer compressed than processed, with nothing lost or too big."""
    from stddaq.services.base import ArgumentParser, Service, service_main

    class Closing(Service):  # finishes its work in close(), as the stage does with -t 2
        name = "closing"

        def _start(self) -> None:
            self.counters.declare("compressed")

        def _step(self) -> bool:
            return False

        def _close(self) -> None:
            self.counters.add("compressed", 3)

    config, path = make_config()
    parser = ArgumentParser()
    parser.add_argument("detector_json_filename")
    with caplog.at_level(logging.INFO, logger="stddaq.stats"):
        assert service_main("closing", parser, lambda c, _a: Closing(c), [str(path)]) == 0
    lines = "\n".join(record.getMessage() for record in caplog.records)
    assert stage_totals(lines, config.detector_name, "closing")["compressed"] == 3


def test_a_start_that_fails_with_a_socket_open_raises_instead_of_hanging(make_config) -> None:
    """std_live_stream --hwm 99999999999999 hung for ever: its start failed after making a socket
    it had not kept yet, and the context's term() waited for that socket to be closed."""
    from stddaq.services.base import Service

    class LeavesASocket(Service):
        name = "leaves_a_socket"

        def _start(self) -> None:
            sock = self.ctx.socket(zmq.PUB)  # kept alive by the traceback's frame, not by the service
            sock.setsockopt(zmq.SNDHWM, 2**40)  # OverflowError

        def _close(self) -> None:
            pass

    config, _ = make_config()
    service = LeavesASocket(config)
    failed: list[BaseException] = []
    starter = threading.Thread(target=lambda: failed.extend(_raised(service.start)), daemon=True)
    starter.start()
    starter.join(10)
    assert not starter.is_alive(), "start() hangs"
    assert [type(exc) for exc in failed] == [OverflowError]
    assert service.ctx is None


def _raised(call) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001
        return [exc]
    return []


def test_the_loop_thread_takes_back_work_no_worker_has_started(make_config) -> None:
    """-t 2 with its one worker thread busy elsewhere (as on a loaded machine, where it waits for
    a core): the batches handed to it are taken back and compressed by the loop thread, so
    every image still comes out, in order and exact, while the worker is still busy."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=64)
    stage = Compressor(config, blosc2_codec(), threads=2)
    with ImagePublisher(config) as source:
        stage.start()
        busy, release = threading.Event(), threading.Event()
        stage._pool.submit(lambda: (busy.set(), release.wait(30)))  # the only worker, held
        assert busy.wait(5)
        runner = threading.Thread(target=stage.run)
        try:
            with subscribe(config, "blosc2") as subscriber:
                # the stage's PUB drops what it sends before our subscription has reached it: wait
                # for that here, while no other thread uses its socket yet
                assert stage.publisher.wait_for_subscribers(1, timeout=10)
                runner.start()
                assert source.wait_for_subscribers(1, timeout=10)
                metadata = image_metadata(config)
                for image_id in range(20):
                    metadata.image_id = image_id
                    source.publish_image(metadata, ramp(image_id, config.shape, config.dtype))
                    if image_id % 5 == 4:
                        time.sleep(0.05)  # several batches, some handed to the worker
                for image_id in range(20):
                    image = subscriber.receive(timeout=10)
                    assert image is not None and image.image_id == image_id
                    pixels = np.array(decode(image.metadata, image.data))
                    assert subscriber.confirm(image)
                    del image
                    assert np.array_equal(pixels, ramp(image_id, config.shape, config.dtype))
                assert not release.is_set()  # all of it done while the worker was still held
        finally:
            release.set()
            stage.stop()
            if runner.is_alive():
                runner.join(timeout=10)
            stage.close()
    assert stage.stats()["compressed"] == 20


# ---------------------------------------------------------------------- stddaq up
def test_plan_starts_the_stages_a_config_asks_for(make_config) -> None:
    config, path = make_config()
    assert not [s for s in plan(config, path) if s.name.startswith("std_data_compress")]
    config, path = make_config(compression_stages={"blosc2": {"threads": 2, "level": 7},
                                                   "h5bitshuffle_lz4": {"block_size": 1024}})
    specs = {s.name: s.argv[2:] for s in plan(config, path)}
    assert specs["std_data_compress_blosc2"] == [STAGE, "blosc2", str(path), "-t", "2", "-l", "7"]
    assert specs["std_data_compress_h5bitshuffle_lz4"] == [STAGE, "h5bitshuffle_lz4", str(path), "-t", "1", "-b", "1024"]
    names = list(specs)
    assert names.index("std_sim") < names.index("std_data_compress_blosc2")  # producers first


@pytest.mark.parametrize("stages,message", [
    ({"zstd": {}}, "'compression_stages.zstd.[key]'"),
    ({"blosc2": {"level": 0}}, "'compression_stages.blosc2.level' has value 0"),
    ({"blosc2": {"threads": 0}}, "'compression_stages.blosc2.threads' has value 0"),
    ({"blosc2": {"thread": 2}}, "'compression_stages.blosc2.thread'"),
    ({"h5bitshuffle_lz4": {"block_size": 24}}, "block size 24 bytes is not a multiple of 16 (8 x 2 bytes per pixel)"),
    ({"h5bitshuffle_lz4": {"block_size": 2**32}}, "block size 4294967296 bytes is not allowed: must be at most"),
])
def test_bad_compression_stages_config_is_named(make_config, stages, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(compression_stages=stages)


def test_stddaq_up_runs_the_compression_stages(make_config) -> None:
    config, path = make_config(compression_stages={"blosc2": {"threads": 2}, "h5bitshuffle_lz4": {}})
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for codec in ("blosc2", "h5bitshuffle_lz4"):
        lines = [ln for ln in out.stdout.splitlines() if f"service=std_data_compress_{codec},processed_times=" in ln]
        assert lines, out.stdout
        assert all(",lost=0," in ln and ",too_big=0," in ln for ln in lines), lines
        assert sum(int(ln.split(",compressed=")[1].split(",")[0]) for ln in lines) > 100
    monitor = [ln for ln in out.stdout.splitlines() if "service=std_bus_monitor,processed_times=" in ln]
    assert monitor and all(",corrupt=0" in ln for ln in monitor)
