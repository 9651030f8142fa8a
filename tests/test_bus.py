"""ImagePublisher -> ImageSubscriber through real shared memory and real ipc sockets."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.bus import ImagePublisher, ImageSubscriber, image_metadata
from stddaq.bus.sockets import unlink_ipc
from stddaq.errors import BufferMissingError, BusError
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, ImageMetadataStatus


@contextlib.contextmanager
def _pair(config):
    """A publisher and a subscriber connected to it (so it misses nothing), closed after."""
    with ImagePublisher(config) as publisher, ImageSubscriber(config) as subscriber:
        assert publisher.wait_for_subscribers(1, timeout=5)
        yield publisher, subscriber


def _ramps(publisher, config, ids, offset: int = 0) -> None:
    """Publish image ``id`` with the pixels of the ramp of ``id + offset``, for each of ``ids``."""
    for image_id in ids:
        publisher.publish_image(image_metadata(config, image_id), ramp(image_id + offset, config.shape, config.dtype))


def test_images_arrive_with_metadata_and_zero_copy_views(make_config) -> None:
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, range(10))
        for image_id in range(10):
            image = subscriber.receive(timeout=5)
            assert image is not None and image.image_id == image_id
            assert image.metadata.size == config.image_n_bytes
            assert image.metadata.status == ImageMetadataStatus.good_image
            assert image.data.shape == config.shape and image.data.dtype == config.dtype
            assert np.array_equal(image.data, ramp(image_id, config.shape, config.dtype))
            assert image.data.base is not None  # a view of the slot, not a copy
            assert subscriber.confirm(image)
        assert subscriber.receive(timeout=0.05) is None
        totals = subscriber.stats.totals()
        assert totals["processed_times"] == 10 and totals["lost"] == 0 and totals["invalid"] == 0 and totals["gaps"] == 0


def test_compressed_image_is_a_blob_of_size_bytes(make_config) -> None:
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        metadata = image_metadata(config, 5)
        metadata.compression = ImageMetadataCompression.blosc2
        publisher.publish_image(metadata, b"0123456789abc")
        image = subscriber.receive(timeout=5)
        assert image.data.dtype == np.uint8 and image.data.tobytes() == b"0123456789abc"


def test_garbage_is_counted_and_the_loop_goes_on(make_config, caplog) -> None:
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        too_big = image_metadata(config, 1)
        too_big.height = 10_000
        wrong_size = image_metadata(config, 2)
        wrong_size.size = 17
        unknown_dtype = image_metadata(config, 3)
        unknown_dtype.dtype = 99
        # enum fields carry any int32 on the wire; a file's u8/u4 columns cannot hold -1
        unknown_status, unknown_compression, empty_blob = (image_metadata(config, 3) for _ in range(3))
        unknown_status.status = -1
        unknown_compression.compression = 7
        empty_blob.compression, empty_blob.size = 2, 0  # blosc2 with no bytes
        for junk in (b"\xff\xff\xff", too_big.SerializeToString(), wrong_size.SerializeToString(),
                     unknown_dtype.SerializeToString(), unknown_status.SerializeToString(),
                     unknown_compression.SerializeToString(), empty_blob.SerializeToString()):
            publisher.socket.send(junk)
        publisher.socket.send_multipart([b"a", b"b"])
        publisher.publish_image(image_metadata(config, 4), ramp(4, config.shape, config.dtype))
        image = subscriber.receive(timeout=5)
        assert image is not None and image.image_id == 4
        totals = subscriber.stats.totals()
        assert totals["invalid"] == 8 and totals["processed_times"] == 1
        assert "do not fit a slot" in caplog.text or "not an ImageMetadata" in caplog.text
        assert "expected 1 message part, got 2" in subscriber.last_error  # the last junk: counted once, parts drained
        # warned once per period, not once per message
        assert caplog.text.count("ignoring message") == 1


def test_overwritten_slot_is_never_delivered(make_config) -> None:
    config, _ = make_config(ram_buffer_slots=4)
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, range(10))  # the reader has not read anything: slots of 0..5 are reused
        delivered = []
        while (image := subscriber.receive(timeout=0.5)) is not None:
            assert np.array_equal(image.data, ramp(image.image_id, config.shape, config.dtype))
            delivered.append(image.image_id)
        assert delivered == [6, 7, 8, 9]
        assert subscriber.stats.totals()["lost"] == 6


def test_overwrite_while_in_use_is_detected_by_confirm(make_config) -> None:
    config, _ = make_config(ram_buffer_slots=2)
    with _pair(config) as (publisher, subscriber):
        publisher.publish_image(image_metadata(config, 0), ramp(0, config.shape, config.dtype))
        image = subscriber.receive(timeout=5)
        assert image.intact()
        publisher.publish_image(image_metadata(config, 2), ramp(2, config.shape, config.dtype))  # same slot
        assert not image.intact()
        assert not subscriber.confirm(image)
        with pytest.raises(RuntimeError, match="overwritten"):
            image.copy()
        totals = subscriber.stats.totals()
        assert totals["lost"] == 1 and totals["processed_times"] == 0 and totals["processed_bytes"] == 0


def test_gaps_are_counted(make_config) -> None:
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, (1, 2, 5, 6, 10))
        ids = [subscriber.receive(timeout=5).image_id for _ in range(5)]
        assert ids == [1, 2, 5, 6, 10]
        assert subscriber.stats.totals()["gaps"] == 2 + 3
        assert subscriber.stats.totals()["missed"] == 0  # ids that step: nothing was made between them


def test_images_made_whose_metadata_never_came_are_counted_missed(make_config) -> None:
    """A reader whose connection was down for a moment (a restarted source it reconnects to)
    never gets some messages: only `gaps` said so, which ids that step make normal, and the
    driver recorded on and said file_saved without those images."""
    config, _ = make_config(ram_buffer_slots=16)
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, range(3))
        ids = [subscriber.receive(timeout=5).image_id for _ in range(3)]  # the reader is there (mapped)
        for image_id in (3, 4):  # made and complete, their messages lost on the way
            publisher.write_image(image_metadata(config, image_id), ramp(image_id, config.shape, config.dtype))
        publisher.publish_image(image_metadata(config, 5), ramp(5, config.shape, config.dtype))
        publisher.publish_image(image_metadata(config, 40), ramp(40, config.shape, config.dtype))  # a step
        ids += [subscriber.receive(timeout=5).image_id for _ in range(2)]
        assert ids == [0, 1, 2, 5, 40]
        totals = subscriber.stats.totals()
        assert totals["gaps"] == 2 + 34 and totals["missed"] == 2, dict(totals)


def test_images_a_killed_writer_made_but_never_sent_are_counted_missed(make_config) -> None:
    """A producer killed with images complete in its ring whose messages it had not sent: the
    reader followed its restart (a new buffer) and nothing said those images were gone."""
    config, _ = make_config(ram_buffer_slots=16)
    subscriber = ImageSubscriber(config).connect()
    try:
        with ImagePublisher(config) as first:
            assert first.wait_for_subscribers(1, timeout=5)
            _ramps(first, config, range(3))
            assert [subscriber.receive(timeout=5).image_id for _ in range(3)] == [0, 1, 2]
            for image_id in (3, 4):  # complete; the writer dies before their messages go
                first.write_image(image_metadata(config, image_id), ramp(image_id, config.shape, config.dtype))
        with ImagePublisher(config) as restarted:  # a new buffer; its ids begin again
            # the reader resubscribes when its socket is used (libzmq handles the reconnect there)
            assert wait_until(lambda: subscriber.receive(timeout=0.01) is None and restarted.subscriber_count() > 0)
            restarted.publish_image(image_metadata(config, 0), ramp(0, config.shape, config.dtype))
            assert subscriber.receive(timeout=5).image_id == 0
        totals = subscriber.stats.totals()
        assert totals["missed"] == 2 and totals["lost"] == 0, dict(totals)
    finally:
        subscriber.close()


def test_an_earlier_runs_leftovers_are_not_counted_missed(make_config) -> None:
    """Review of the missed count: a new run in the same buffer whose ids step found the
    earlier run's ids complete in the slots it skipped (12 counted missed, none was); and a
    short run, then a re-created buffer, counted 6 of the run before it."""
    config, _ = make_config(ram_buffer_slots=16)
    publisher = ImagePublisher(config).open()  # not _pair: the writer is replaced below
    subscriber = ImageSubscriber(config).connect()
    assert publisher.wait_for_subscribers(1, timeout=5)
    got = []

    def send(ids) -> None:
        for image_id in ids:
            publisher.publish_image(image_metadata(config, image_id), ramp(image_id, config.shape, config.dtype))
            got.append(subscriber.receive(timeout=5).image_id)

    try:
        send(range(40))
        send(range(0, 41, 4))  # a new run, ids step: the slots it skips hold the run before's ids
        assert subscriber.stats.totals()["missed"] == 0
        send(range(5))  # a short run; then the writer restarts with a new buffer
        publisher.close()
        publisher = ImagePublisher(config).open()
        assert wait_until(lambda: subscriber.receive(timeout=0.01) is None and publisher.subscriber_count() > 0)
        send(range(3))
        totals = subscriber.stats.totals()
        assert totals["missed"] == 0 and totals["lost"] == 0, dict(totals)
        # a ring's worth of consecutive ids rewrote every slot: a gap is looked at again
        send(range(3, 3 + 16))
        publisher.write_image(image_metadata(config, 19), ramp(19, config.shape, config.dtype))
        send([20])
        assert subscriber.stats.totals()["missed"] == 1
    finally:
        subscriber.close()
        publisher.close()


def test_a_reader_a_ring_behind_a_restarted_writer_counts_nothing_missed(make_config) -> None:
    """Review of the killed-writer count: a reader more than a ring behind when its source was
    re-created followed it at an old message; the old buffer's last ids were counted missed,
    though their messages were still on their way (then counted lost as well: 16 twice)."""
    config, _ = make_config(ram_buffer_slots=16)
    subscriber = ImageSubscriber(config).connect()
    try:
        with ImagePublisher(config) as first:
            assert first.wait_for_subscribers(1, timeout=5)
            for image_id in range(100):
                first.publish_image(image_metadata(config, image_id), ramp(image_id, config.shape, config.dtype))
                if image_id < 5:
                    assert subscriber.receive(timeout=5).image_id == image_id
        with ImagePublisher(config) as restarted:
            # the reader resubscribes when its socket is used; EVENTS uses it without taking a message
            assert _resubscribed(subscriber, restarted)
            _ramps(restarted, config, range(10))
            while subscriber.receive(timeout=1) is not None:
                pass
        assert subscriber.stats.totals()["missed"] == 0, dict(subscriber.stats.totals())
    finally:
        subscriber.close()


def test_behind_a_filter_that_republishes_some_images_none_is_missed(make_config) -> None:
    """-sm: the metadata comes from a filter (upstream's std_delay_filter) that forwards only some
    of the ring's images; the others are complete in the ring and skipped on purpose."""
    config, _ = make_config(ram_buffer_slots=16)
    with ImagePublisher(config) as ring, ImagePublisher(config, "delay") as delay:
        subscriber = ImageSubscriber(config, metadata_suffix="delay").connect()
        try:
            assert delay.wait_for_subscribers(1, timeout=5)
            received = []
            for image_id in range(6):
                message = ring.write_image(image_metadata(config, image_id), ramp(image_id, config.shape, config.dtype))
                if image_id in (0, 3, 5):
                    delay.send(message, image_id)
                    received.append(subscriber.receive(timeout=5).image_id)
            assert received == [0, 3, 5]
            totals = subscriber.stats.totals()
            assert totals["gaps"] == 3 and totals["missed"] == 0, dict(totals)
        finally:
            subscriber.close()


def test_an_image_without_pixels_is_invalid(make_config) -> None:
    """A 0x0 image went on as good: the live stream sent "shape":[0,0], which its own decoders refuse."""
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        empty = image_metadata(config, 1)
        empty.height = empty.size = 0
        publisher.socket.send(empty.SerializeToString())  # not an image it wrote
        publisher.publish_image(image_metadata(config, 2), ramp(2, config.shape, config.dtype))
        assert subscriber.receive(timeout=5).image_id == 2
        assert subscriber.stats.totals()["invalid"] == 1
        assert subscriber.last_error == f"image 1: shape 0x{config.image_pixel_width} has no pixels"


def test_count_complete_sees_only_what_the_ring_still_holds(make_config) -> None:
    config, _ = make_config(ram_buffer_slots=8)
    with ImagePublisher(config) as publisher:
        ring = publisher.buffer
        for image_id in (*range(10), 12):
            ring.begin_write(image_id)
            ring.end_write(image_id)
        ring.begin_write(13)  # being written: not complete
        # of the last 8 ids (6..13): 6..9 and 12 are held; 10 and 11 never were, 13 is being written
        assert ring.count_complete(0, 14) == 5
        assert ring.count_complete(10, 12) == 0 and ring.count_complete(5, 5) == 0


def test_attach_waits_then_names_missing_buffer(make_config) -> None:
    config, _ = make_config()
    subscriber = ImageSubscriber(config).connect()
    try:
        started = time.monotonic()
        with pytest.raises(BufferMissingError, match=rf"/dev/shm/{config.channel('image')} does not exist"):
            subscriber.attach(wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        subscriber.close()


def test_reader_follows_a_restarted_writer(make_config) -> None:
    config, _ = make_config()
    ctx = zmq.Context()
    subscriber = ImageSubscriber(config, ctx=ctx).connect()
    try:
        for run in range(2):
            publisher = ImagePublisher(config, ctx=ctx).open()
            # a SUB re-sends its subscription on reconnect only while it polls, as a real reader does
            assert wait_until(lambda p=publisher: subscriber.socket.poll(10) is not None and p.subscriber_count() == 1)
            publisher.publish_image(image_metadata(config, 0), ramp(run, config.shape, config.dtype))
            image = subscriber.receive(timeout=5)
            assert image is not None and np.array_equal(image.data, ramp(run, config.shape, config.dtype))
            del image
            publisher.close()
    finally:
        subscriber.close()
        ctx.term()


def test_images_in_use_stay_good_when_the_reader_follows_a_restarted_writer(make_config) -> None:
    """Following a re-created buffer closed the old one: every image of it still being worked
    on (a stage's threads) said overwritten and was counted lost, though its bytes were whole."""
    config, _ = make_config()
    ctx = zmq.Context()
    subscriber = ImageSubscriber(config, ctx=ctx).connect()
    kept = []
    try:
        for run in range(2):
            publisher = ImagePublisher(config, ctx=ctx).open()
            assert wait_until(lambda p=publisher: subscriber.socket.poll(10) is not None and p.subscriber_count() == 1)
            publisher.publish_image(image_metadata(config, 5 - run), ramp(run, config.shape, config.dtype))
            image = subscriber.receive(timeout=5)
            assert image is not None
            kept.append(image)
            publisher.close()
        old, new = kept
        assert old._buffer is not new._buffer and subscriber.buffer is new._buffer
        assert subscriber.confirm(old) and np.array_equal(old.data, ramp(0, config.shape, config.dtype))
        assert subscriber.confirm(new) and subscriber.stats.totals().get("lost", 0) == 0
    finally:
        kept.clear()
        subscriber.close()
        ctx.term()


def test_a_writer_caught_while_it_re_creates_its_buffer_is_waited_for(make_config) -> None:
    """A restarting writer first claims the name with an empty object, then sizes it. A reader
    that looks in that moment keeps the buffer it has (no exception out of receive) and takes
    the new one once it is there."""
    import os

    from stddaq.bus.ram_buffer import _claim, _unlink

    config, _ = make_config()
    with ImagePublisher(config) as publisher, ImageSubscriber(config) as subscriber:
        subscriber.attach()
        old = subscriber.buffer
        _unlink(publisher.layout.name)  # the writer is gone; its restart has claimed the name
        fd = _claim(publisher.layout.name)
        try:
            assert subscriber._replaced(0, force=True) is False
            assert subscriber.buffer is old and old.sequence is not None  # still mapped
            os.ftruncate(fd, publisher.layout.n_bytes)  # now it is there
            assert subscriber._replaced(0, force=True) is True and subscriber.buffer is not old
        finally:
            os.close(fd)
            _unlink(publisher.layout.name)


def test_publish_rejects_oversized_image(make_config) -> None:
    config, _ = make_config()
    with ImagePublisher(config) as publisher:
        with pytest.raises(Exception, match="do not fit a slot"):
            publisher.publish_image(ImageMetadata(image_id=1), np.zeros(config.image_n_bytes + 1, np.uint8))


def test_a_source_buffer_of_another_size_is_refused_not_fatal(make_config, caplog) -> None:
    """A source started with another config (another ring size) made receive() raise
    BufferLayoutError: the reading service (driver, live stream, compression stage) died. Its
    messages are now invalid, with the reason; the right buffer is read once it is there; one
    that replaces it with the wrong size again is said once and its images are counted lost
    (the old mapping is not read for them)."""
    config, _ = make_config(ram_buffer_slots=8)
    # (shm objects are whole 2 MiB: 8 and 16 slots of 3 kB would be the same size)
    other, _ = make_config(detector_name=config.detector_name, ram_buffer_slots=1000)
    ctx = zmq.Context()
    try:
        with ImageSubscriber(config, ctx=ctx) as subscriber:
            def publish(publisher, cfg, image_id) -> None:
                assert wait_until(lambda: subscriber.socket.poll(10) is not None and publisher.subscriber_count() == 1)
                publisher.publish_image(image_metadata(cfg, image_id), ramp(image_id, cfg.shape, cfg.dtype))

            with ImagePublisher(other, ctx=ctx) as wrong:
                publish(wrong, other, 0)
                assert subscriber.receive(timeout=2) is None
                assert subscriber.stats.totals()["invalid"] == 1
                assert "has 4194304 bytes but this config implies 2097152" in subscriber.last_error
            with ImagePublisher(config, ctx=ctx) as right:
                publish(right, config, 1)
                image = subscriber.receive(timeout=5)
                assert image is not None and np.array_equal(image.data, ramp(1, config.shape, config.dtype))
                del image
            with ImagePublisher(other, ctx=ctx) as wrong:
                publish(wrong, other, 0)
                wrong.publish_image(image_metadata(other, 1), ramp(1, other.shape, other.dtype))  # 1 is in the old slot
                assert subscriber.receive(timeout=1) is None
                assert subscriber.stats.totals()["lost"] == 2
    finally:
        ctx.term()
    assert caplog.text.count("was re-created by its writer but cannot be read") == 1


@pytest.mark.parametrize("suffix,compression", [("h5bitshuffle-lz4", ImageMetadataCompression.h5bitshuffle_lz4),
                                                ("blosc2", ImageMetadataCompression.blosc2)])
def test_monitor_verifies_the_pixels_of_a_compressed_channel(make_config, suffix, compression) -> None:
    """std_bus_monitor --verify ramp on a compressed channel confirmed images and never compared
    them: images that are not the ramp passed with corrupt=0."""
    import threading

    from stddaq.formats.compression import bitshuffle_lz4_encode, blosc2_encode
    from stddaq.services.monitor import BusMonitor

    config, _ = make_config(ram_buffer_slots=16)
    encode = bitshuffle_lz4_encode if suffix == "h5bitshuffle-lz4" else blosc2_encode
    ctx = zmq.Context()
    source = ImagePublisher(config, suffix, ctx=ctx).open()
    monitor = BusMonitor(config, suffix=suffix, verify="ramp", ctx=ctx).start()
    thread = threading.Thread(target=monitor.run)
    thread.start()
    try:
        assert wait_until(lambda: source.subscriber_count() >= 1)
        for image_id in range(4):
            pixels = ramp(image_id, config.shape, config.dtype) if image_id % 2 else np.full(config.shape, 7, config.dtype)
            metadata = image_metadata(config, image_id)
            metadata.compression = compression
            source.publish_image(metadata, np.frombuffer(encode(pixels), np.uint8))
        assert wait_until(lambda: monitor.stats()["processed_times"] >= 4)
        assert monitor.stats()["corrupt"] == 2, dict(monitor.stats())
    finally:
        monitor.stop()
        thread.join(10)
        monitor.close()
        source.close()
        ctx.term()


def test_an_ipc_name_another_process_listens_on_is_not_taken_over(make_config) -> None:
    """libzmq binds over a live socket file: a second writer or driver of a detector took the
    first one's names, and removed them when it ended, cutting the first off for good."""
    from stddaq.bus.sockets import bind, ipc_in_use

    config, _ = make_config()
    address = config.ipc_address("writer-0")
    ctx = zmq.Context()
    first, second = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
    try:
        bind(first, address, "the first")
        with pytest.raises(BusError, match=f"cannot bind the second at {address}: another process listens there"):
            bind(second, address, "the second")
        first.close(0)  # as a killed process: its socket file stays behind, nobody listens
        assert wait_until(lambda: not ipc_in_use(address), timeout=5)  # libzmq closes it in its own thread
        assert os.path.exists(address.removeprefix("ipc://"))
        assert bind(second, address, "the second") == address
    finally:
        for sock in (first, second):
            sock.close(0)
        ctx.term()
        unlink_ipc(address)


def _two_runs(publisher, config, ids) -> None:
    """Run 1 and run 2 of ``ids``: the writer begins its ids again; run 2's pixels are the ramp of id + 1000."""
    _ramps(publisher, config, ids)
    _ramps(publisher, config, ids, 1000)


def _takes(subscriber, config, image_id: int, offset: int = 0):
    """The next image the subscriber hands on: ``image_id``, with the pixels of the ramp of ``image_id + offset``."""
    image = subscriber.receive(timeout=5)
    assert image is not None and image.image_id == image_id
    np.testing.assert_array_equal(image.data, ramp(image_id + offset, config.shape, config.dtype))
    return image


@contextlib.contextmanager
def _reader_of_a_restarted_writer(config):
    """(subscriber, writer 1, restart): the subscriber connected to writer 1; ``restart()`` closes
    writer 1, opens writer 2 (a new buffer) and returns it once the subscriber is connected to it."""
    subscriber = ImageSubscriber(config)
    writers = [ImagePublisher(config).open()]

    def restart() -> ImagePublisher:
        writers[0].close()
        writers.append(ImagePublisher(config).open())
        assert _resubscribed(subscriber, writers[1])
        return writers[1]

    try:
        subscriber.connect(wait=5)
        assert writers[0].wait_for_subscribers(1, timeout=5)
        yield subscriber, writers[0], restart
    finally:
        subscriber.close()
        for writer in writers:
            writer.close()


def _resubscribed(subscriber, publisher) -> bool:
    """Whether the subscriber's socket is connected to a restarted ``publisher`` (a SUB reconnects when used)."""
    return wait_until(lambda: subscriber.socket.getsockopt(zmq.EVENTS) >= 0 and publisher.subscriber_count() > 0)


def test_a_lagging_reader_never_takes_the_next_runs_image_under_its_metadata(make_config) -> None:
    """The guard holds ids: a reader still behind by a whole run when its writer began its ids again
    took the new run's pixels under the old run's metadata, as complete (review: 10 of 20 images,
    every counter 0). Each slot now holds its image's run, and the reader works out the run of
    each message from their order."""
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        _two_runs(publisher, config, range(10))  # run 1's messages come first: their slots hold run 2's images
        for image_id in range(10):
            assert _takes(subscriber, config, image_id, 1000).intact()
        assert subscriber.stats.totals()["lost"] == 10


def test_an_image_in_use_is_not_intact_once_the_next_run_rewrote_its_id(make_config) -> None:
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, range(6))
        image = subscriber.receive(timeout=5)
        assert image.image_id == 0 and image.intact()
        publisher.publish_image(image_metadata(config, 0), ramp(7, config.shape, config.dtype))  # ids went back
        assert not image.intact()  # the same id, complete, but another run's
        assert not subscriber.confirm(image)


@pytest.mark.parametrize("sent_before", [0, 10])
def test_a_reader_that_connects_takes_every_run_after_it(make_config, sent_before) -> None:
    """The run of a reader's first message: read from the writer's header before it connects.
    Nothing sent yet, or a run that ended: the new run's images all arrive, none lost."""
    config, _ = make_config()
    publisher = ImagePublisher(config).open()
    try:
        _ramps(publisher, config, range(sent_before))
        subscriber = ImageSubscriber(config).connect()
        try:
            assert publisher.wait_for_subscribers(1, timeout=5)
            _ramps(publisher, config, range(5), 50)  # a new run (after the first) begins at 0
            for image_id in range(5):
                _takes(subscriber, config, image_id, 50)
            assert subscriber.stats.totals()["lost"] == 0
        finally:
            subscriber.close()
    finally:
        publisher.close()


def test_a_reader_that_missed_a_change_of_run_reconnects(make_config) -> None:
    """A full queue drops messages, and with them maybe the change of run: the reader could then
    no longer tell the runs apart, and would count every later image lost. Once nothing else is
    queued it reconnects, with the run read from the writer's header. (The dropped messages are
    taken off the socket here, unread: a full queue is not made to order.)"""
    config, _ = make_config()
    with _pair(config) as (publisher, subscriber):
        _ramps(publisher, config, range(5))
        assert [subscriber.receive(timeout=5).image_id for _ in range(5)] == list(range(5))
        _two_runs(publisher, config, range(5))  # the rest of run 1, run 2 from 0: dropped
        for _ in range(10):
            assert subscriber.socket.poll(5000) and subscriber.socket.recv()
        for image_id in (5, 6):  # run 2 goes on, above where run 1 was: it may be either
            _ramps(publisher, config, [image_id])
            assert subscriber.receive(timeout=1) is None  # lost, and nothing else queued
        assert subscriber.stats.totals()["lost"] == 2  # the second time: reconnected
        socket = subscriber.socket
        assert publisher.wait_for_subscribers(1, timeout=5)
        time.sleep(0.2)  # the old connection's goodbye and the new one's handshake
        _ramps(publisher, config, range(7, 12))
        for image_id in range(7, 12):
            _takes(subscriber, config, image_id)
        assert subscriber.stats.totals()["lost"] == 2 and subscriber.socket is socket


def test_a_reader_a_ring_behind_over_a_writer_restart_never_takes_the_old_writers_images_from_the_new_one(
        make_config) -> None:
    """Writer 1 sends 0-199 into 64 slots and exits; writer 2 (a new buffer) sends 0-199 with
    other pixels. A reader that read nothing meanwhile re-mapped the new buffer at writer 1's
    first overwritten image and took writer 1's messages 136-199 with writer 2's pixels (review
    23: 64 of 128). The old writer's header says which messages may still be its own."""
    config, _ = make_config(ram_buffer_slots=64)
    with _reader_of_a_restarted_writer(config) as (subscriber, first, restart):

        def send_run(publisher: ImagePublisher, writer: int) -> None:
            for image_id in range(200):
                metadata = image_metadata(config, image_id)
                metadata.gf.scan_id = writer
                publisher.publish_image(metadata, ramp(image_id + 1000 * writer, config.shape, config.dtype))

        send_run(first, 1)
        time.sleep(0.3)  # in the reader's queue
        second = restart()
        send_run(second, 2)
        got = {1: [], 2: []}
        while (image := subscriber.receive(timeout=1)) is not None:
            writer = image.metadata.gf.scan_id
            np.testing.assert_array_equal(image.data, ramp(image.image_id + 1000 * writer, config.shape, config.dtype))
            got[writer].append(image.image_id)
        assert got == {1: list(range(136, 200)), 2: list(range(136, 200))}
        assert subscriber.stats.totals()["lost"] == 272, dict(subscriber.stats.totals())
        for image_id in range(200, 300):  # and it keeps up with the new writer (review 23: it lost every image)
            _ramps(second, config, [image_id])
            image = subscriber.receive(timeout=5)
            assert image is not None and image.image_id == image_id
        assert subscriber.stats.totals()["lost"] == 272


def test_a_reader_that_missed_a_change_of_run_follows_its_writers_restart(make_config) -> None:
    """Its floor behind the old writer's runs (it missed a change of run), every message of the
    restarted writer (ids going on) looked like one the old writer may have sent: the reader
    kept the old buffer for ever and lost every image (review 24). Twice with nothing queued,
    it re-subscribes, with the new buffer's header."""
    config, _ = make_config(ram_buffer_slots=64)
    with _reader_of_a_restarted_writer(config) as (subscriber, first, restart):
        _ramps(first, config, range(5))
        assert [subscriber.receive(timeout=5).image_id for _ in range(5)] == list(range(5))
        for image_id in range(5):  # a new run: dropped (taken off the socket unread)
            _ramps(first, config, [image_id])
            assert subscriber.socket.poll(5000) and subscriber.socket.recv()
        second = restart()
        for image_id in (1000, 1001):  # it goes on from 1000: they may be the old writer's, by the floor
            _ramps(second, config, [image_id])
            assert subscriber.receive(timeout=1) is None
        assert subscriber.stats.totals()["lost"] == 2
        assert wait_until(lambda: subscriber.socket.getsockopt(zmq.EVENTS) >= 0 and second.subscriber_count() == 1)
        time.sleep(0.2)
        for image_id in range(1002, 1007):
            _ramps(second, config, [image_id])
            _takes(subscriber, config, image_id)
        assert subscriber.stats.totals()["lost"] == 2


def test_a_buffer_left_by_a_killed_writer_is_not_read_for_its_successors_images(make_config, tmp_path) -> None:
    """A reader that connected while a killed writer's buffer was left behind judged its
    successor's images by the dead one's slots and header: it re-subscribed again and again,
    missed images, and took one of the dead writer's images for the new one's (review 24)."""
    import subprocess
    import sys

    config, path = make_config(ram_buffer_slots=64)
    killed = ("import os, sys\nfrom stddaq.config import DetectorConfig\nfrom stddaq.bus import ImagePublisher, "
              "image_metadata\nfrom stddaq.patterns import ramp\nc = DetectorConfig.load(sys.argv[1])\n"
              "p = ImagePublisher(c).open()\nfor i in range(64):\n    p.publish_image(image_metadata(c, i), "
              "ramp(i, c.shape, c.dtype))\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", killed, str(path)], check=True, timeout=60)
    subscriber = ImageSubscriber(config).connect()  # maps the buffer left behind
    publisher = None
    try:
        publisher = ImagePublisher(config).open()
        assert _resubscribed(subscriber, publisher)
        for image_id in range(80):
            _ramps(publisher, config, [image_id], 500)
            _takes(subscriber, config, image_id, 500)
        totals = subscriber.stats.totals()
        assert totals["lost"] == totals["gaps"] == 0, dict(totals)
    finally:
        subscriber.close()
        if publisher is not None:
            publisher.close()
