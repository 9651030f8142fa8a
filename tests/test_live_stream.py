"""std_live_stream: selection, encoding, and end to end through real shm and sockets.

The service runs in a thread of the test (so its counters can be asserted), the simulator as a real
subprocess; subscribers are our client, raw pyzmq sockets, and PSI's own psi-mflow / psi-bsread.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.bus import ImagePublisher, image_metadata
from stddaq.client import LiveStreamClient, image_id
from stddaq.errors import UsageError
from stddaq.formats import array10, bsread
from stddaq.formats.compression import bitshuffle_lz4_encode, blosc2_encode
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, PcoImageMetadata, protocol_dtype
from stddaq.services.base import Service
from stddaq.services.live_stream import LiveStream, Mode, Selector, mode_for, parse_mode

SIM = "stddaq.services.simulator"
LIVE = "stddaq.services.live_stream"


# ---------------------------------------------------------------- pure parts
def test_parse_mode() -> None:
    assert parse_mode("batch", "1:10") == Mode("batch", 1, 10)
    assert parse_mode("periodic", "5:2") == Mode("periodic", 5, 2)


@pytest.mark.parametrize("kind,text,message", [
    ("periodic", "3", "is not Y:N"),
    ("periodic", "a:b", "is not Y:N"),
    ("batch", "0:5", "must both be > 0"),
    ("periodic", "1:0", "must both be > 0"),
    ("batch", "6:5", "Y must be <= N"),
    ("batch", "-1:5", "is not Y:N"),
])
def test_parse_mode_rejects(kind: str, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_mode(kind, text)


def test_mode_from_flags_then_config_then_forward(make_config) -> None:
    address = "tcp://127.0.0.1:9100"
    config, _ = make_config(live_stream_configs={address: {"type": "batch", "config": [1, 4]}})
    assert mode_for(config, address) == Mode("batch", 1, 4)
    assert mode_for(config, address, periodic="2:3") == Mode("periodic", 2, 3)
    assert mode_for(config, address, forward=True) == Mode()
    assert mode_for(config, "tcp://127.0.0.1:9101") == Mode()
    with pytest.raises(UsageError, match="exclude each other"):
        mode_for(config, address, forward=True, batch="1:2")


def test_selector_forward_and_batch() -> None:
    assert all(Selector(Mode()).select(i) for i in range(100))
    batch = Selector(Mode("batch", 3, 10))
    assert [i for i in range(45) if batch.select(i)] == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32, 40, 41, 42]


def test_selector_periodic_sends_y_consecutive_n_times_a_second() -> None:
    selector = Selector(Mode("periodic", 3, 10))  # 10 windows a second, 3 images each
    rate = 1000.0
    chosen = [i for i in range(2000) if selector.select(i, now=i / rate)]  # 2 s of a 1 kHz source
    assert len(chosen) == 20 * 3
    starts = chosen[::3]
    assert all(chosen[k:k + 3] == [s, s + 1, s + 2] for k, s in zip(range(0, 60, 3), starts, strict=True))
    assert all(99 <= d <= 101 for d in np.diff(starts))  # 100 ids apart, up to float rounding of the times


def test_selector_periodic_after_a_pause_does_not_burst() -> None:
    selector = Selector(Mode("periodic", 1, 10))
    assert selector.select(0, now=0.0)
    assert not selector.select(1, now=0.05)
    # 5 s without images: the next image opens one window, not fifty catch-up windows
    assert selector.select(2, now=5.0)
    assert not selector.select(3, now=5.001) and not selector.select(4, now=5.05)
    assert selector.select(5, now=5.1)


# ---------------------------------------------------------------- helpers
@contextmanager
def running(service: Service) -> Iterator[Service]:
    service.start()
    thread = threading.Thread(target=service.run, name=f"{service.name}-test")
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(10)
        service.close()


def raw_sub(ctx: zmq.Context, address: str, **options) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for key, value in options.items():
        sock.setsockopt(getattr(zmq, key), value)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    return sock


def drain(sock: zmq.Socket, timeout: float = 1.0) -> list[list[bytes]]:
    messages = []
    while sock.poll(timeout * 1000):
        messages.append(sock.recv_multipart())
    return messages


def drain_client(client: LiveStreamClient, timeout: float = 1.0) -> list[tuple[dict, np.ndarray]]:
    return list(iter(lambda: client.receive(timeout), None))


def check_raw_message(config, stream_type: str, parts: list[bytes]) -> int:
    """Byte-exact headers and exact ramp pixels of one message; returns its id."""
    if stream_type == "array-1.0":
        frame = json.loads(parts[0])["frame"]
        assert parts[0] == array10.encode_header(frame, config.shape, config.dtype)
        assert parts[0].startswith(b'{"htype":"array-1.0", "shape":[%d,%d], "type":"uint16", "frame":' % config.shape)
        assert parts[1] == ramp(frame, config.shape, config.dtype).tobytes()
        return frame
    assert len(parts) == 4
    main = json.loads(parts[0])
    channel = bsread.BsreadChannel(f"{config.detector_name}:FPICTURE", config.shape, "uint16")
    assert parts[1] == bsread.encode_data_header(channel)
    assert main["hash"] == hashlib.md5(parts[1]).hexdigest()
    stamp = main["global_timestamp"]
    assert parts[0] == bsread.encode_main_header(main["pulse_id"], stamp["sec"], stamp["ns"], main["hash"])
    assert parts[3] == bsread.encode_timestamp(stamp["sec"], stamp["ns"]) and stamp["sec"] > 1.7e9
    _, _, pixels = bsread.decode(parts)
    assert np.array_equal(pixels, ramp(main["pulse_id"], config.shape, config.dtype))
    return main["pulse_id"]


# ---------------------------------------------------------------- end to end
MODES = {"forward": Mode(), "batch": Mode("batch", 2, 10), "periodic": Mode("periodic", 2, 10)}


@pytest.mark.parametrize("stream_type", ["array-1.0", "bsread"])
@pytest.mark.parametrize("mode_name", list(MODES))
def test_every_mode_and_format_to_several_subscribers(make_config, service, stream_type: str, mode_name: str) -> None:
    # pco: the bsread channel name and timestamps come from the pco metadata
    config, path = make_config(detector_type="pco", image_pixel_height=24, image_pixel_width=40, ram_buffer_slots=400)
    n_images, rate = 300, 200
    ctx = zmq.Context()
    live = LiveStream(config, "tcp://127.0.0.1:*", mode=MODES[mode_name], stream_type=stream_type, ctx=ctx)
    try:
        with running(live):
            address = live.endpoints["stream"]
            clients = [LiveStreamClient(address, ctx=ctx) for _ in range(2)]
            sock = raw_sub(ctx, address)
            try:
                assert wait_until(lambda: live.subscribers >= 3, timeout=10)
                sim = service(SIM, path, "--n-images", n_images, "--rate", rate, "--wait-subscribers", 1)
                assert sim.wait(timeout=60) == 0
                raw_ids = [check_raw_message(config, stream_type, parts) for parts in drain(sock)]
                received = [drain_client(client) for client in clients]
            finally:
                for client in clients:
                    client.close()
                sock.close(0)
            totals = live.stats()
    finally:
        ctx.term()
    for messages in received:
        assert [image_id(h) for h, _ in messages] == raw_ids
        for header, pixels in messages:
            assert pixels.shape == config.shape and pixels.dtype == config.dtype
            assert np.array_equal(pixels, ramp(image_id(header), config.shape, config.dtype))
    if mode_name == "forward":
        assert raw_ids == list(range(n_images))
    elif mode_name == "batch":
        assert raw_ids == [i for i in range(n_images) if i % 10 < 2]
    else:  # 10 windows a second of 2 consecutive images, from a 1.5 s run at 200 Hz
        starts = raw_ids[::2]
        assert all(raw_ids[k + 1] == raw_ids[k] + 1 for k in range(0, len(raw_ids) - 1, 2)), raw_ids
        assert 10 <= len(starts) <= 20, raw_ids
        # windows open every 100 ms = 20 images on average; one late window (a busy CI core) may
        # stretch a gap, but the schedule does not drift
        assert all(5 <= d <= 45 for d in np.diff(starts)), raw_ids
        assert 15 <= float(np.mean(np.diff(starts))) <= 25, raw_ids
    assert totals["selected"] == totals["sent"] == len(raw_ids)
    assert totals["processed_times"] == n_images
    assert all(totals[k] == 0 for k in totals if k.startswith("dropped_")), totals
    assert totals["lost"] == totals["gaps"] == totals["invalid"] == 0


def test_psi_clients_decode_our_streams(make_config, service) -> None:
    """Clients nobody here wrote: psi-mflow reads array-1.0, psi-bsread reads bsread, same pixels."""
    mflow = pytest.importorskip("mflow")
    bsread_client = pytest.importorskip("bsread")
    config, path = make_config(image_pixel_height=24, image_pixel_width=40, ram_buffer_slots=200)
    n_images = 50
    ctx = zmq.Context()
    array_live = LiveStream(config, "tcp://127.0.0.1:*", stream_type="array-1.0", ctx=ctx)
    bsread_live = LiveStream(config, "tcp://127.0.0.1:*", stream_type="bsread", ctx=ctx)
    try:
        with running(array_live), running(bsread_live):
            stream = mflow.connect(array_live.endpoints["stream"], mode=mflow.SUB, receive_timeout=3000)
            port = int(bsread_live.endpoints["stream"].rsplit(":", 1)[1])
            source = bsread_client.Source(host="127.0.0.1", port=port, mode=bsread_client.SUB, receive_timeout=3000)
            source.connect()
            try:
                assert wait_until(lambda: array_live.subscribers >= 1 and bsread_live.subscribers >= 1)
                sim = service(SIM, path, "--n-images", n_images, "--rate", 200, "--wait-subscribers", 2)
                for expected in range(n_images):
                    message = stream.receive()
                    assert message is not None, f"psi-mflow got nothing after {expected - 1}"
                    header, (pixels,) = message.data["header"], message.data["data"]
                    assert header == {"htype": "array-1.0", "shape": list(config.shape), "type": "uint16",
                                      "frame": expected}
                    assert np.array_equal(pixels, ramp(expected, config.shape, config.dtype))
                for expected in range(n_images):
                    message = source.receive()
                    assert message is not None, f"psi-bsread got nothing after {expected - 1}"
                    data = message.data
                    assert data.pulse_id == expected
                    value = data.data[f"{config.detector_name}:image"]
                    assert np.array_equal(value.value, ramp(expected, config.shape, config.dtype))
                    assert value.timestamp > 1.7e9
                assert sim.wait(timeout=30) == 0
            finally:
                stream.disconnect()
                source.disconnect()
    finally:
        ctx.term()


def test_slow_subscriber_does_not_slow_the_fast_one(make_config, service) -> None:
    config, path = make_config(image_pixel_height=128, image_pixel_width=128, ram_buffer_slots=1000)
    n_images, rate = 800, 400
    ctx = zmq.Context()
    live = LiveStream(config, "tcp://127.0.0.1:*", hwm=50, ctx=ctx)
    try:
        with running(live):
            address = live.endpoints["stream"]
            stuck = raw_sub(ctx, address, RCVHWM=1, RCVBUF=4096)  # connected, reads nothing until the end
            fast = LiveStreamClient(address, ctx=ctx, timeout=5)
            try:
                assert wait_until(lambda: live.subscribers >= 2, timeout=10)
                sim = service(SIM, path, "--n-images", n_images, "--rate", rate, "--wait-subscribers", 1)
                arrival = []
                for expected in range(n_images):
                    message = fast.receive()
                    assert message is not None, f"fast subscriber got nothing after {expected - 1}"
                    header, pixels = message
                    assert header["frame"] == expected
                    assert np.array_equal(pixels, ramp(expected, config.shape, config.dtype))
                    arrival.append(time.monotonic())
                assert sim.wait(timeout=30) == 0
                slow_ids = [json.loads(parts[0])["frame"] for parts in drain(stuck, 0.5)]
                for parts in drain(stuck, 0.2):
                    check_raw_message(config, "array-1.0", parts)
            finally:
                fast.close()
                stuck.close(0)
            totals = live.stats()
    finally:
        ctx.term()
    # the fast one got every image at the source's pace (800 images at 400 Hz: 2 s)
    assert arrival[-1] - arrival[0] < n_images / rate * 1.5 + 0.5
    assert fast.stats["gaps"] == 0
    assert len(slow_ids) < n_images
    assert totals["dropped_hwm"] > 0 and totals["sent"] == n_images, totals


# ---------------------------------------------------------------- per image, without the simulator
class FakeImage:
    def __init__(self, metadata: ImageMetadata, data: np.ndarray, intact: bool = True) -> None:
        self.metadata, self.data, self._intact = metadata, data, intact

    def intact(self) -> bool:
        return self._intact


def _metadata(config, image_id: int, compression: int = 0, size: int = 0, dtype=None) -> ImageMetadata:
    return ImageMetadata(image_id=image_id, height=config.image_pixel_height, width=config.image_pixel_width,
                         size=size, dtype=protocol_dtype(dtype or config.dtype), status=1, compression=compression)


@pytest.fixture
def started_live(make_config):
    """A started (not running) live stream and a subscriber: the test calls _handle itself."""
    def make(stream_type: str):
        config, _ = make_config(image_pixel_height=16, image_pixel_width=24)
        ctx = zmq.Context()
        live = LiveStream(config, "tcp://127.0.0.1:*", stream_type=stream_type, ctx=ctx).start()
        sock = raw_sub(ctx, live.endpoints["stream"])
        assert wait_until(lambda: (live._count_subscribers(), live.subscribers)[1] >= 1)
        cleanups.append(lambda: (sock.close(0), live.close(), ctx.term()))
        return config, live, sock

    cleanups: list = []
    yield make
    for cleanup in cleanups:
        cleanup()


def test_an_ipv6_address_is_bound_and_connected(make_config) -> None:
    """tcp://[::1]:PORT ended std_live_stream with "No such device": libzmq takes an IPv6 address
    only on a socket with ZMQ_IPV6 set. The stream client connects to one too."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24)
    ctx = zmq.Context()
    live = LiveStream(config, "tcp://[::1]:*", ctx=ctx).start()
    try:
        address = live.endpoints["stream"]
        assert address.startswith("tcp://[::1]:")
        with LiveStreamClient(address, ctx=ctx, timeout=2) as client:
            assert wait_until(lambda: (live._count_subscribers(), live.subscribers)[1] >= 1)
            live._handle(FakeImage(_metadata(config, 7), ramp(7, config.shape, config.dtype)))
            header, pixels = client.receive(2)
        assert image_id(header) == 7 and np.array_equal(pixels, ramp(7, config.shape, config.dtype))
    finally:
        live.close()
        ctx.term()


def test_torn_image_is_counted_and_not_sent(started_live) -> None:
    config, live, sock = started_live("array-1.0")
    pixels = ramp(5, config.shape, config.dtype)
    live._handle(FakeImage(_metadata(config, 5), pixels, intact=False))
    live._handle(FakeImage(_metadata(config, 6), ramp(6, config.shape, config.dtype)))
    messages = drain(sock, 0.5)
    assert [json.loads(m[0])["frame"] for m in messages] == [6]
    totals = live.stats()
    assert totals["dropped_torn"] == 1 and totals["sent"] == 1 and totals["selected"] == 2


def test_unrepresentable_dtype_and_bad_blob_are_counted_and_skipped(started_live) -> None:
    config, live, sock = started_live("array-1.0")
    live._handle(FakeImage(_metadata(config, 1, dtype=np.int16), ramp(1, config.shape, config.dtype).view(np.int16)))
    live._handle(FakeImage(_metadata(config, 2, compression=ImageMetadataCompression.blosc2, size=40),
                           np.arange(40, dtype=np.uint8)))
    assert drain(sock, 0.3) == []
    totals = live.stats()
    assert totals["dropped_dtype"] == 1 and totals["dropped_decode"] == 1 and totals["sent"] == 0
    assert "int16" in live.last_error or "blosc2" in live.last_error


@pytest.mark.parametrize("stream_type", ["array-1.0", "bsread"])
def test_a_blosc2_blob_that_crashes_its_decoder_costs_that_image_only(started_live, stream_type) -> None:
    """Some corrupt blosc2 headers make blosc2 raise SystemError (a negative size): that was not
    a CodecError, and one such image ended the live stream for every subscriber."""
    config, live, sock = started_live(stream_type)
    blob = bytearray(blosc2_encode(ramp(1, config.shape, config.dtype)))
    blob[7] ^= 0xFF
    live._handle(FakeImage(_metadata(config, 1, compression=ImageMetadataCompression.blosc2, size=len(blob)),
                           np.frombuffer(bytes(blob), np.uint8)))
    live._handle(FakeImage(_metadata(config, 2), ramp(2, config.shape, config.dtype)))
    assert len(drain(sock, 0.5)) == 1
    totals = live.stats()
    assert totals["dropped_decode"] == 1 and totals["sent"] == 1, dict(totals)


def test_a_pco_timestamp_bsread_cannot_carry_costs_that_image_only(make_config) -> None:
    """pco timestamps are uint64 in the metadata, int64 in bsread's timestamp part: 2**63 raised
    struct.error and ended the bsread stream for every subscriber."""
    config, _ = make_config(detector_type="pco", image_pixel_height=16, image_pixel_width=24)
    ctx = zmq.Context()
    live = LiveStream(config, "tcp://127.0.0.1:*", stream_type="bsread", ctx=ctx).start()
    sock = raw_sub(ctx, live.endpoints["stream"])
    try:
        assert wait_until(lambda: (live._count_subscribers(), live.subscribers)[1] >= 1)
        for image_id, sec in ((1, 2**63), (2, 1_700_000_000)):
            metadata = _metadata(config, image_id)
            metadata.pco.CopyFrom(PcoImageMetadata(global_timestamp_sec=sec, global_timestamp_ns=5, bsread_name="X"))
            live._handle(FakeImage(metadata, ramp(image_id, config.shape, config.dtype)))
        assert len(drain(sock, 0.5)) == 1
        totals = live.stats()
        # a timestamp the format cannot carry is no pixel type problem (it was counted dropped_dtype)
        assert totals["dropped_format"] == 1 and totals["dropped_dtype"] == 0 and totals["sent"] == 1, dict(totals)
        assert "bsread timestamp 'sec' is 9223372036854775808" in live.last_error
    finally:
        sock.close(0)
        live.close()
        ctx.term()


def test_a_pco_ns_of_a_second_or_more_is_carried_into_sec(started_live) -> None:
    """bsread readers add ns / 1e9 to sec: a pco ns of 2.5e9 went out as is (2.5 s late, or
    rejected by readers that check the range)."""
    config, live, sock = started_live("bsread")
    metadata = _metadata(config, 3)
    metadata.pco.CopyFrom(PcoImageMetadata(global_timestamp_sec=1_700_000_001, global_timestamp_ns=2_500_000_005))
    live._handle(FakeImage(metadata, ramp(3, config.shape, config.dtype)))
    (message,) = drain(sock, 0.5)
    assert json.loads(message[0])["global_timestamp"] == {"sec": 1_700_000_003, "ns": 500_000_005}
    assert message[3] == bsread.encode_timestamp(1_700_000_003, 500_000_005)


@pytest.mark.parametrize("compression", ["h5bitshuffle_lz4", "blosc2"])
def test_compressed_source_is_decoded_for_array10(started_live, compression: str) -> None:
    config, live, sock = started_live("array-1.0")
    pixels = ramp(9, config.shape, config.dtype)
    blob = np.frombuffer(bitshuffle_lz4_encode(pixels) if compression == "h5bitshuffle_lz4"
                         else blosc2_encode(pixels), np.uint8)
    live._handle(FakeImage(_metadata(config, 9, getattr(ImageMetadataCompression, compression), blob.nbytes), blob))
    (message,) = drain(sock, 0.5)
    assert message[0] == array10.encode_header(9, config.shape, config.dtype)
    assert message[1] == pixels.tobytes()


def test_bsread_passes_h5bitshuffle_through_and_compresses_raw(started_live) -> None:
    config, live, sock = started_live("bsread")
    pixels = ramp(3, config.shape, config.dtype)
    blob = bitshuffle_lz4_encode(pixels, block_bytes=256)  # not the default block: proves pass-through
    metadata = _metadata(config, 3, ImageMetadataCompression.h5bitshuffle_lz4, blob.nbytes)
    metadata.pco.CopyFrom(PcoImageMetadata(global_timestamp_sec=1_700_000_001, global_timestamp_ns=5,
                                           bsread_name="X:CAM"))
    live._handle(FakeImage(metadata, blob))
    live._handle(FakeImage(_metadata(config, 4), ramp(4, config.shape, config.dtype)))
    first, second = drain(sock, 0.5)
    assert first[2] == blob.tobytes()
    assert json.loads(first[0])["global_timestamp"] == {"sec": 1_700_000_001, "ns": 5}
    assert json.loads(first[1])["channels"][0]["name"] == "X:CAM"
    main, channel, decoded = bsread.decode(second)
    assert channel.name == f"{config.detector_name}:image" and channel.compression == "bitshuffle_lz4"
    assert second[2][:12] == (pixels.nbytes).to_bytes(8, "big") + (8192).to_bytes(4, "big")
    assert np.array_equal(decoded, ramp(4, config.shape, config.dtype))
    assert abs(main["global_timestamp"]["sec"] - time.time()) < 60


def test_bsread_does_not_pass_on_a_blob_of_another_size(started_live) -> None:
    """A source h5bitshuffle-lz4 blob whose header holds another number of pixels (cut short,
    another detector's) went out as a normal bsread message; array-1.0 mode dropped it."""
    config, live, sock = started_live("bsread")
    small = bitshuffle_lz4_encode(ramp(1, (4, 6), config.dtype))
    live._handle(FakeImage(_metadata(config, 1, ImageMetadataCompression.h5bitshuffle_lz4, small.nbytes), small))
    good = bitshuffle_lz4_encode(ramp(2, config.shape, config.dtype))
    live._handle(FakeImage(_metadata(config, 2, ImageMetadataCompression.h5bitshuffle_lz4, good.nbytes), good))
    messages = drain(sock, 0.5)
    assert [json.loads(m[0])["pulse_id"] for m in messages] == [2]
    totals = live.stats()
    assert totals["dropped_decode"] == 1 and "chunk holds 48 bytes of pixels, the image has 768" in live.last_error


# ---------------------------------------------------------------- the command line
def _free_port() -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    ctx.term()
    return port


def test_cli_waits_for_the_source_then_streams(make_config, service) -> None:
    config, path = make_config(stats_collection_period=0.5)
    address = f"tcp://127.0.0.1:{_free_port()}"
    live = service(LIVE, path, address, "-b", "1:2")
    with LiveStreamClient(address, timeout=5) as client:
        time.sleep(1.0)  # the service is up before its source exists
        sim = service(SIM, path, "--n-images", 40, "--rate", 100, "--wait-subscribers", 1)
        ids = [image_id(h) for h, _ in iter(lambda: client.receive(3), None)]
        assert sim.wait(timeout=30) == 0
    assert ids == list(range(0, 40, 2))
    assert live.stop() == 0
    _, err = live.output()
    assert f"waiting for the source buffer /dev/shm/{config.channel('image')}" in err
    lines = [ln for ln in err.splitlines() if "service=std_live_stream,processed_times=" in ln]
    assert lines and all(f"detector={config.detector_name}" in ln for ln in lines)
    for key in ("selected=", "sent=", "lost=", "dropped_torn=", "dropped_hwm=", "dropped_dtype="):
        assert key in lines[0], lines[0]
    assert not os.path.exists(f"/dev/shm/{config.channel('image')}")


def test_metadata_of_another_channel_than_the_ring_with_sm_and_si(make_config, service) -> None:
    """Behind a std_delay_filter (upstream: -sm delay -si image) the metadata comes from
    <det>-delay and the pixels from the <det>-image ring. -sm and -si were one option, so one
    of the two was ignored: the filter bypassed, or a ring /dev/shm/<det>-delay waited for."""
    from stddaq.bus.sockets import bind, unlink_ipc

    config, path = make_config()
    address = f"tcp://127.0.0.1:{_free_port()}"
    ctx = zmq.Context()
    delay = ctx.socket(zmq.XPUB)  # the filter: forwards the metadata of the images it keeps
    bind(delay, config.ipc_address("delay"), "the delay filter")
    try:
        with ImagePublisher(config) as images:
            live = service(LIVE, path, address, "-sm", "delay", "-si", "image", "-f")
            assert delay.poll(20_000)  # the live stream subscribed to the filter
            delay.recv()

            def publish(frame: int, keep: bool) -> None:
                metadata = image_metadata(config, frame)
                message = images.write_image(metadata, ramp(frame, config.shape, config.dtype))
                images.send(message, frame)  # on <det>-image, as the receiver does: not what the stream reads
                if keep:
                    delay.send(message)

            with LiveStreamClient(address, timeout=2) as client:
                probe = iter(range(1000, 2000))
                assert wait_until(lambda: (publish(next(probe), True), client.receive(0.2))[1] is not None,
                                  timeout=20)
                for frame in range(10):
                    publish(frame, keep=frame % 2 == 0)
                got = [(image_id(header), pixels) for header, pixels in iter(lambda: client.receive(2), None)]
            assert live.stop() == 0
    finally:
        delay.close(0)
        ctx.term()
        unlink_ipc(config.ipc_address("delay"))
    got = [(i, pixels) for i, pixels in got if i < 1000]
    assert [i for i, _ in got] == [0, 2, 4, 6, 8]
    assert all(np.array_equal(pixels, ramp(i, config.shape, config.dtype)) for i, pixels in got)


@pytest.mark.parametrize("args,message", [
    (["-p", "3"], "-p/--periodic '3' is not Y:N"),
    (["-b", "0:5"], "must both be > 0"),
    (["-p", "a:b"], "is not Y:N"),
    (["-p", "\uff11:\uff13"], "is not Y:N"),  # fullwidth digits: int() takes them, an operator did not mean them
    (["--address", "tcp://127.0.0.1:\uff19\uff11\uff10\uff10"], "PORT 0..65535"),
    (["-b", "5:3"], "Y must be <= N"),
    (["-t", "json"], "-t/--type 'json' is not allowed (allowed: array-1.0, bsread)"),
    (["-f", "-p", "1:2"], "exclude each other"),
    (["-s", "bad/suffix"], "suffix"),
    # libzmq bound port 99999 as 34463 (and -5 as 65531) without a word
    (["--address", "tcp://127.0.0.1:99999"], "address 'tcp://127.0.0.1:99999' is not allowed"),
    (["--address", "tcp://127.0.0.1:-5"], "PORT 0..65535"),
    # these two hung for ever without a word: a socket left open kept the context's term() waiting
    (["--hwm", "99999999999999"], "99999999999999 is not allowed: must be 1..2147483647"),
    (["-s", "s" * 100], "is too long: its socket path"),
])
def test_cli_bad_input_exits_2_with_one_line(make_config, service, args: list, message: str) -> None:
    config, path = make_config()
    address = args[1] if args[:1] == ["--address"] else "tcp://127.0.0.1:0"
    args = args[2:] if args[:1] == ["--address"] else args
    live = service(LIVE, path, address, *args)
    assert live.wait(timeout=30) == 2
    _, err = live.output()
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("address", ["tcp://no-such-host.invalid:9123", "tcp://192.0.2.1:9123"])  # TEST-NET-1
def test_cli_an_address_not_of_this_machine_is_named(make_config, service, address) -> None:
    """"No such device" said nothing of what was wrong. Exit 1, not 2: under `stddaq up` a 2 stops the
    whole deployment, and a name that did not resolve for a moment may come back (``up`` refuses
    such a host before it starts anything)."""
    _, path = make_config()
    live = service(LIVE, path, address)
    assert live.wait(timeout=30) == 1
    _, err = live.output()
    host = address.removeprefix("tcp://").rpartition(":")[0]
    assert len(err.strip().splitlines()) == 1, err
    assert f"{host!r} is no interface, address or resolvable name of this machine" in err, err


def test_cli_address_in_use_exits_1(make_config, service) -> None:
    config, path = make_config()
    ctx = zmq.Context()
    holder = ctx.socket(zmq.PUB)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        live = service(LIVE, path, f"tcp://127.0.0.1:{port}")
        assert live.wait(timeout=30) == 1
        _, err = live.output()
    finally:
        holder.close(0)
        ctx.term()
    assert len(err.strip().splitlines()) == 1 and f"cannot bind the live stream at tcp://127.0.0.1:{port}" in err, err


def test_a_compressed_image_overwritten_before_it_is_decoded_counts_as_torn(make_config) -> None:
    """The blob is copied while the slot still holds it, then decoded from the copy: an image whose
    slot was reused meanwhile is dropped_torn (not a corrupt blob from upstream, dropped_decode),
    and the decoder never reads a slot that is changing under it."""
    from stddaq.bus import ImagePublisher, image_metadata

    config, _ = make_config(image_pixel_height=64, image_pixel_width=64, ram_buffer_slots=4)
    ctx = zmq.Context()
    source = ImagePublisher(config, ctx=ctx).open()
    live = LiveStream(config, "tcp://127.0.0.1:*", stream_type="array-1.0", ctx=ctx).start()
    try:
        assert wait_until(lambda: source.subscriber_count() >= 1)

        def publish(image_id: int, pixels: np.ndarray) -> None:
            metadata = image_metadata(config, image_id)
            metadata.compression = ImageMetadataCompression.h5bitshuffle_lz4
            source.publish_image(metadata, bitshuffle_lz4_encode(pixels))

        publish(0, np.zeros(config.shape, config.dtype))
        image = live.subscriber.receive(timeout=5)
        assert image is not None and image.image_id == 0
        publish(4, ramp(4, config.shape, config.dtype))  # the same slot, another blob
        live._handle(image)
        del image
        totals = live.stats()
        assert totals["dropped_torn"] == 1 and totals["dropped_decode"] == 0 and totals["sent"] == 0
    finally:
        live.close()
        source.close()
        ctx.term()


def test_a_source_of_another_layout_is_waited_out_not_fatal(make_config) -> None:
    """A source started with another config (another image size) made the live stream exit
    at attach; under stddaq up it crash-looped and took the deployment down. It now says why
    and streams once the source is re-created with the right config."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=16)
    other, _ = make_config(detector_name=config.detector_name, image_pixel_height=64, image_pixel_width=64,
                           ram_buffer_slots=16)
    ctx = zmq.Context()
    live = LiveStream(config, "tcp://127.0.0.1:*", ctx=ctx).start()
    sock = raw_sub(ctx, live.endpoints["stream"])
    thread = threading.Thread(target=live.run)
    try:
        with ImagePublisher(other, ctx=ctx):
            thread.start()
            assert wait_until(lambda: live.last_error is not None and "this config implies" in live.last_error)
            time.sleep(0.3)
            assert thread.is_alive()
        with ImagePublisher(config, ctx=ctx) as source:
            assert wait_until(lambda: source.subscriber_count() >= 1)
            source.publish_image(image_metadata(config, 3), ramp(3, config.shape, config.dtype))
            messages = drain(sock, 2.0)
        assert [json.loads(m[0])["frame"] for m in messages] == [3]
    finally:
        live.stop()
        thread.join(10)
        sock.close(0)
        live.close()
        ctx.term()
