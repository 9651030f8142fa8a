"""std_sim as a real subprocess -> ImageSubscriber in the test: ids, pixels, metadata, cleanup."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import LateReader, wait_until

from stddaq.bus import ImageSubscriber
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadataCompression, ImageMetadataStatus, protocol_dtype

SIM = "stddaq.services.simulator"


@pytest.mark.parametrize("detector_type,bit_depth,oneof", [
    ("eiger", 8, "eg"),
    ("gigafrost", 16, "gf"),
    ("eiger", 32, "eg"),
    ("jungfrau-converted", 16, "jf"),
    ("pco", 16, "pco"),
])
def test_every_image_arrives_in_order_with_exact_pixels(make_config, service, detector_type, bit_depth, oneof) -> None:
    config, path = make_config(detector_type=detector_type, bit_depth=bit_depth, image_pixel_height=30,
                               image_pixel_width=300, ram_buffer_slots=400)
    n_images, start_id = 300, 1000
    with ImageSubscriber(config) as subscriber:
        sim = service(SIM, path, "--n-images", n_images, "--start-id", start_id, "--wait-subscribers", 1)
        for expected_id in range(start_id, start_id + n_images):
            image = subscriber.receive(timeout=10)
            assert image is not None, f"no image after {expected_id - 1}"
            meta = image.metadata
            assert meta.image_id == expected_id
            assert (meta.height, meta.width) == (30, 300)
            assert meta.dtype == protocol_dtype(config.dtype)
            assert meta.size == 30 * 300 * config.dtype.itemsize
            assert meta.status == ImageMetadataStatus.good_image
            assert meta.compression == ImageMetadataCompression.none
            assert meta.WhichOneof("image_metadata") == oneof
            assert np.array_equal(image.data, ramp(expected_id, config.shape, config.dtype))
            assert subscriber.confirm(image)
        if oneof == "gf":
            assert meta.gf.store_image and meta.gf.frame_timestamp > 0
        if oneof == "pco":
            assert meta.pco.bsread_name == f"{config.detector_name}:FPICTURE" and meta.pco.global_timestamp_sec > 1.7e9
        assert sim.wait(timeout=30) == 0
        totals = subscriber.stats.totals()
        assert totals["lost"] == 0 and totals["gaps"] == 0 and totals["invalid"] == 0
    assert not os.path.exists(f"/dev/shm/{config.channel('image')}")


def test_lagging_reader_never_gets_an_overwritten_image(make_config, service) -> None:
    """Few slots, a fast writer and a slow reader: what the reader uses is good, the rest is counted."""
    config, path = make_config(ram_buffer_slots=8, image_pixel_height=64, image_pixel_width=64)
    n_images = 2000
    good, lost_in_use = 0, 0
    with ImageSubscriber(config) as subscriber:
        service(SIM, path, "--n-images", n_images, "--wait-subscribers", 1, "--linger", 3)
        expected = np.empty(config.shape, config.dtype)
        last_id = -1
        while (image := subscriber.receive(timeout=5)) is not None:
            last_id = image.image_id
            expected[:] = ramp(image.image_id, config.shape, config.dtype)  # slow work on the view
            matches = np.array_equal(image.data, expected)
            if subscriber.confirm(image):
                assert matches, f"image {image.image_id} confirmed intact but its pixels are wrong"
                good += 1
            else:
                lost_in_use += 1
        totals = subscriber.stats.totals()
    assert last_id == n_images - 1
    assert totals["lost"] > 0, "the reader was expected to fall behind the writer"
    assert totals["processed_times"] == good
    assert totals["processed_times"] + totals["lost"] + totals["gaps"] == n_images
    assert totals["lost"] >= lost_in_use


def test_rate_and_stats_line(make_config, service) -> None:
    config, path = make_config(stats_collection_period=0.3)
    sim = service(SIM, path, "--rate", 200, "--n-images", 200, "--linger", 0)
    assert sim.wait(timeout=30) == 0
    _, err = sim.output()
    lines = [ln for ln in err.splitlines() if f"detector={config.detector_name},service=std_sim,processed_times=" in ln]
    assert len(lines) >= 2, err
    rates = [float(ln.split("repetition_rate_hz=")[1].split(",")[0]) for ln in lines[:-1]]
    assert all(100 < r < 300 for r in rates), rates


def test_sigterm_stops_and_unlinks(make_config, service) -> None:
    config, path = make_config()
    sim = service(SIM, path, "--rate", 100)
    assert wait_until(lambda: os.path.exists(f"/dev/shm/{config.channel('image')}"), timeout=10)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.wait(timeout=10) == 0
    assert not os.path.exists(f"/dev/shm/{config.channel('image')}")
    assert not os.path.exists(f"/tmp/{config.channel('image')}")


@pytest.mark.parametrize("args,message", [
    (["--rate", "-1"], "--rate"),
    (["--n-images", "0"], "--n-images"),
    (["--pattern", "zebra"], "--pattern"),
    (["--start-id", "x"], "--start-id"),
    (["--linger", "inf"], "--linger: inf is not allowed: must be a finite number >= 0"),  # crashed at the end
    (["--start-id", str(2**63 - 1)], "must be 0..9223372036854775806"),  # OverflowError in the guard
    (["--start-id", str(2**63 - 3), "-n", "5"], "goes past the highest id the ring can hold"),
])
def test_bad_arguments_exit_2_with_one_line(make_config, service, args, message) -> None:
    config, path = make_config()
    sim = service(SIM, path, *args)
    assert sim.wait(timeout=30) == 2
    _, err = sim.output()
    assert len(err.strip().splitlines()) == 1 and message in err


def test_second_simulator_on_same_channel_fails_clearly(make_config, service) -> None:
    config, path = make_config()
    first = service(SIM, path, "--rate", 10)
    assert wait_until(lambda: os.path.exists(f"/dev/shm/{config.channel('image')}"), timeout=10)
    second = service(SIM, path, "--rate", 10)
    assert second.wait(timeout=30) == 1
    _, err = second.output()
    assert "already exists" in err
    assert first.proc.poll() is None


def test_sighup_stops_a_service_unless_it_is_ignored(make_config) -> None:
    """SIGHUP (its terminal or ssh session went away) stops a service cleanly, shm and socket
    removed; under nohup (SIGHUP ignored) it runs on, as it did before SIGHUP was handled."""
    import subprocess
    import sys

    for ignored in (False, True):
        config, path = make_config()
        prefix = ["nohup"] if ignored else []
        proc = subprocess.Popen([*prefix, sys.executable, "-m", SIM, str(path), "--rate", "10"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shm = f"/dev/shm/{config.channel('image')}"
        try:
            assert wait_until(lambda shm=shm: os.path.exists(shm), timeout=15)
            proc.send_signal(signal.SIGHUP)
            if ignored:
                time.sleep(1)
                assert proc.poll() is None
                proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert not os.path.exists(shm) and not os.path.exists(config.ipc_address("image")[len("ipc://"):])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_images_published_before_a_stop_reach_a_reader_slow_for_a_moment(make_config) -> None:
    """A stopped simulator closed at once: what was queued for a reader that was not scheduled
    for a moment was dropped, the last images of the run lost without a gap."""
    import threading

    from stddaq.services.simulator import Simulator

    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=64)
    sim = Simulator(config, rate=20_000).start()
    reader = LateReader(config.ipc_address("image"))
    try:
        assert sim.publisher.wait_for_subscribers(1, timeout=10)
        runner = threading.Thread(target=sim.run)
        runner.start()
        time.sleep(0.3)  # about 6000 images, none read yet
        sim.stop()
        runner.join(timeout=10)
        reader.read_later()  # the reader comes back while the simulator is stopping
        sim.close()
        received = reader.join()
    finally:
        reader.close()
    assert len(received) == sim.next_id > 2000
