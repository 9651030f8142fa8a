"""std_array10_recv / std_bsread_recv: stream -> <det>-image -> our bus subscriber, pixels exact."""

from __future__ import annotations

import hashlib
import itertools
import json
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.bus import ImagePublisher, ImageSubscriber
from stddaq.formats import FormatError, array10, bsread
from stddaq.formats.compression import bitshuffle_lz4_encode
from stddaq.patterns import ramp
from stddaq.services.live_stream import LiveStream
from stddaq.services.receiver import InOrder, StreamReceiver, _Head

SIM = "stddaq.services.simulator"


@contextmanager
def running(*services):
    threads = []
    try:
        for service in services:
            if service.state == "created":
                service.start()
            thread = threading.Thread(target=service.run, name=f"{service.name}-test")
            thread.start()
            threads.append(thread)
        yield services
    finally:
        for service in services:
            service.stop()
        for thread in threads:
            thread.join(10)
        for service in services:
            service.close_quietly() if service.state == "failed" else service.close()


@pytest.mark.parametrize("stream_type", ["array-1.0", "bsread"])
def test_simulator_to_stream_to_receiver_to_bus(make_config, service, stream_type: str, caplog) -> None:
    """std_sim -> std_live_stream -> receiver (-t sub, -n 2 asked) -> <det2>-image -> ImageSubscriber:
    one SUB connection is made, so every image is written and published exactly once."""
    source, path = make_config(detector_type="pco", image_pixel_height=20, image_pixel_width=36, ram_buffer_slots=300)
    target, _ = make_config(detector_type="pco", image_pixel_height=20, image_pixel_width=36, ram_buffer_slots=300)
    n_images = 120
    ctx = zmq.Context()
    live = LiveStream(source, "tcp://127.0.0.1:*", stream_type=stream_type, ctx=ctx)
    try:
        live.start()
        receiver = StreamReceiver(target, live.endpoints["stream"], stream_type=stream_type, n_connections=2,
                                  socket_type="sub", ctx=ctx)
        with running(live, receiver), ImageSubscriber(target, ctx=ctx) as subscriber:
            assert wait_until(lambda: live.subscribers >= 1, timeout=10)
            assert len(receiver.sockets) == 1
            sim = service(SIM, path, "--n-images", n_images, "--rate", 300, "--wait-subscribers", 1)
            ids = []
            while (image := subscriber.receive(timeout=3)) is not None:
                pixels = image.data.copy()
                assert subscriber.confirm(image)
                assert np.array_equal(pixels, ramp(image.image_id, target.shape, target.dtype))
                ids.append(image.image_id)
                if stream_type == "bsread":
                    assert image.metadata.pco.bsread_name == f"{source.detector_name}:FPICTURE"
            assert sim.wait(timeout=30) == 0
            totals = receiver.stats()
    finally:
        ctx.term()
    assert ids == list(range(n_images))  # each image once, in order
    assert "-n 2 ignored with -t sub: one SUB connection is made" in caplog.text  # the user is told
    assert totals["invalid"] == totals["mismatch"] == 0
    assert totals["processed_times"] == n_images


def test_pull_connections_share_the_images_sub_makes_one(make_config) -> None:
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12)
    address = "tcp://127.0.0.1:9999"
    assert StreamReceiver(config, address).n_connections == 4  # -t pull, the default -n
    assert StreamReceiver(config, address, n_connections=2).n_connections == 2
    assert StreamReceiver(config, address, socket_type="sub").n_connections == 1
    assert StreamReceiver(config, address, n_connections=3, socket_type="sub").n_connections == 1


@pytest.mark.parametrize("stream_type", ["array-1.0", "bsread"])
def test_push_stream_with_bad_messages_only_good_ones_written(make_config, stream_type: str) -> None:
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12, ram_buffer_slots=100)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    encoder = bsread.BsreadEncoder(config.shape, config.dtype)

    def message(image_id: int, shape=config.shape, dtype=config.dtype) -> list:
        pixels = ramp(image_id, shape, dtype)
        if stream_type == "array-1.0":
            return array10.encode(image_id, pixels)
        enc = encoder if shape == config.shape and dtype == config.dtype else bsread.BsreadEncoder(shape, dtype)
        return enc.parts(image_id, "x:y", 1, 2, bitshuffle_lz4_encode(pixels))

    receiver = StreamReceiver(config, address, stream_type=stream_type, n_connections=3, ctx=ctx)
    try:
        with running(receiver), ImageSubscriber(config, ctx=ctx) as subscriber:
            # the receiver's metadata PUB drops what is sent before our SUB is connected: probe first
            probe = 1000

            def probed() -> bool:
                try:
                    push.send_multipart(message(probe), zmq.NOBLOCK)
                except zmq.Again:  # none of the receiver's connections is up yet
                    time.sleep(0.05)
                    return False
                return subscriber.receive(timeout=0.2) is not None

            assert wait_until(probed, timeout=10)
            sent = [10, 11, 13, 14]
            push.send_multipart(message(10))
            push.send_multipart(message(11))
            push.send_multipart(message(12, shape=(12, 8)))  # shape of another detector
            push.send_multipart(message(13))
            push.send_multipart(message(15, dtype=np.uint8))  # type of another detector
            # bigger than a slot: bsread counted these invalid (told by its size before its shape)
            push.send_multipart(message(16, shape=(16, 24)))
            push.send_multipart(message(17, dtype=np.uint32))
            push.send_multipart([b'{"htype":"nonsense"}', b""])  # not the format at all
            push.send_multipart(message(14))
            got = []
            while (image := subscriber.receive(timeout=1.5)) is not None:
                if image.image_id != probe:
                    assert np.array_equal(image.data, ramp(image.image_id, config.shape, config.dtype))
                    got.append(image.image_id)
            totals = receiver.stats()
            last_error = receiver.last_error
    finally:
        push.close(0)
        ctx.term()
    assert sorted(got) == sent
    assert totals["mismatch"] == 4 and totals["invalid"] == 1, dict(totals)
    # the 3 connections' messages interleave as they arrive: the last error is one of them
    assert any(text in last_error for text in ("type uint8", "type uint32", "shape [12, 8]", "shape [16, 24]",
                                               "'htype'", "has 2 parts")), last_error


@pytest.mark.parametrize("n_connections", [4, 2])
def test_pull_connections_publish_in_id_order(make_config, n_connections: int) -> None:
    """A PUSH stream dealt out to PULL connections as fast as it goes: every image once, pixels
    exact, published in id order, no false gap. Before, each socket was read empty in turn: 3000
    images came out with up to 700 "ids went back" and 3000-170000 gaps counted at the reader;
    then, merged but written past a connection silent for 2 ms, 20000 small images still came out
    with 64 (-n 4) and 367 (-n 2) "ids went back". The probe's id is far above the stream's, as a
    sender's last run before it began its ids again: the connections' runs must agree after it."""
    config, _ = make_config(image_pixel_height=16, image_pixel_width=24, ram_buffer_slots=21000)
    n_images, probe = 20_000, 10**9
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    receiver = StreamReceiver(config, address, n_connections=n_connections, ctx=ctx)
    try:
        with running(receiver), ImageSubscriber(config, ctx=ctx) as subscriber:
            def probed() -> bool:  # the probe until our SUB gets it: the connections are up then
                if push.poll(0, zmq.POLLOUT):
                    push.send_multipart(array10.encode(probe, ramp(probe, config.shape, config.dtype)), zmq.NOBLOCK)
                return subscriber.receive(timeout=0.2) is not None

            assert wait_until(probed, timeout=10)
            assert wait_until(lambda: receiver.publisher.subscriber_count() >= 1
                              and len(receiver.sockets) == n_connections)
            time.sleep(0.3)  # every connection's handshake: the stream is dealt out to all of them
            messages = [array10.encode(i, ramp(i, config.shape, config.dtype)) for i in range(n_images)]
            sender = threading.Thread(target=lambda: [push.send_multipart(m) for m in messages])
            sender.start()
            ids = []
            while (image := subscriber.receive(timeout=3)) is not None:
                if image.image_id != probe:
                    assert np.array_equal(image.data, ramp(image.image_id, config.shape, config.dtype))
                    ids.append(image.image_id)
            sender.join(10)
            totals = subscriber.stats.totals()
    finally:
        push.close(0)
        ctx.term()
    went_back = sum(1 for before, after in itertools.pairwise(ids) if after <= before)
    assert went_back == 0 and len(ids) == n_images and sorted(ids) == list(range(n_images))
    assert totals["gaps"] == 0 and totals["lost"] == 0


def _send_timed(push: zmq.Socket, config, ids: list[int], offset: int, sent: dict) -> None:
    """Send ``ids`` whose pixels are ``ramp(id + offset)`` (the offset tells runs of the same ids
    apart), noting when each was sent under (offset, id)."""
    messages = [array10.encode(i, ramp(i + offset, config.shape, config.dtype)) for i in ids]
    for image_id, message in zip(ids, messages, strict=True):
        sent[offset, image_id] = time.monotonic()
        push.send_multipart(message)


def _receive_timed(subscriber: ImageSubscriber, config, offsets: tuple[int, ...], timeout: float = 2) -> dict:
    """Take images until none comes for ``timeout`` s: {(offset, id): when published}, each
    image's pixels checked to be ramp(id + one of ``offsets``) and taken once."""
    got = {}
    while (image := subscriber.receive(timeout=timeout)) is not None:
        offset = next((offset for offset in offsets
                       if np.array_equal(image.data, ramp(image.image_id + offset, config.shape, config.dtype))), None)
        assert offset is not None and (offset, image.image_id) not in got, image.image_id
        got[offset, image.image_id] = time.monotonic()
        subscriber.confirm(image)
    return got


def test_bursts_are_not_held_for_a_connection_the_sender_never_deals_to(make_config) -> None:
    """One of 4 connections never completes its handshake (the sender never deals to it): each
    burst of a stream that pauses goes out at once. Waited for as one that had had nothing yet,
    it added 1 s to the first image of every burst; a burst that jumps ids waits LAG_WAIT for it."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12, ram_buffer_slots=2000)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    mute = socket.create_server(("127.0.0.1", 0))  # takes the connection, never answers its greeting
    receiver = StreamReceiver(config, address, n_connections=4, ctx=ctx).start()
    receiver.sockets[3].disconnect(address)
    receiver.sockets[3].connect(f"tcp://127.0.0.1:{mute.getsockname()[1]}")
    bursts = [range(0, 200), range(200, 400), range(400, 600), range(5000, 5200)]
    sent = {}
    try:
        with running(receiver), ImageSubscriber(config, ctx=ctx) as subscriber:
            assert wait_until(lambda: receiver.publisher.subscriber_count() >= 1)
            time.sleep(0.3)  # the 3 other connections' handshakes

            def send() -> None:
                for ids in bursts:
                    _send_timed(push, config, list(ids), 0, sent)
                    time.sleep(0.3)  # the pause: the receiver is idle between bursts

            sender = threading.Thread(target=send)
            sender.start()
            got = _receive_timed(subscriber, config, (0,))
            sender.join(10)
    finally:
        push.close(0)
        mute.close()
        ctx.term()
    assert sorted(got) == sorted(sent)
    assert list(sorted(got, key=got.get)) == sorted(sent)  # in id order
    for ids in bursts:
        assert got[0, ids[-1]] - sent[0, ids[0]] < 0.5, (ids, got[0, ids[-1]] - sent[0, ids[0]])


def test_a_restarted_senders_images_are_not_held_for_connections_not_reconnected_yet(make_config) -> None:
    """The sender process restarts (a new PUSH at the same port, ids beginning again): its images
    go out as the connections reconnect one by one. The connections not reconnected yet, still
    in the old run, were waited for 1 s each burst, as if the sender were ahead of them."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12, ram_buffer_slots=2000)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"
    receiver = StreamReceiver(config, address, n_connections=4, ctx=ctx)
    sent = {}
    try:
        with running(receiver), ImageSubscriber(config, ctx=ctx) as subscriber:
            assert wait_until(lambda: receiver.publisher.subscriber_count() >= 1)
            time.sleep(0.3)  # every connection's handshake

            def send() -> None:
                nonlocal push
                _send_timed(push, config, list(range(500)), 0, sent)
                time.sleep(0.3)
                push.close(0)
                time.sleep(0.1)
                push = ctx.socket(zmq.PUSH)
                push.setsockopt(zmq.LINGER, 0)
                push.bind(address)
                _send_timed(push, config, list(range(500)), 1000, sent)

            sender = threading.Thread(target=send)
            sender.start()
            got = _receive_timed(subscriber, config, (0, 1000))
            sender.join(10)
    finally:
        push.close(0)
        ctx.term()
    assert sorted(got) == sorted(sent)
    latency = max(got[key] - sent[key] for key in sent if key[0] == 1000)
    assert latency < 0.6, latency


def test_the_merge_waits_for_a_connection_that_may_hold_a_lower_id(make_config) -> None:
    """Which connections with nothing waiting the merge waits for before it writes the lowest
    waiting id: one behind it, one that has had nothing yet when the id does not follow the last
    written (a probe image before a run reached 1 of 4 connections; the run's 0, 1, 2, dealt to
    the other three, came after 3 and 7), one still in the run before, and not one given up,
    until the stream pauses. An id that follows the last written waits for none: one connection
    the sender never deals to held the first image of every burst."""
    config, _ = make_config(image_pixel_height=4, image_pixel_width=4)
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", n_connections=4)
    parts = array10.encode(9, ramp(9, config.shape, config.dtype))
    heads = [_Head(9, np.zeros(config.shape, config.dtype), {}, parts, 1), None, None, None]
    receiver._runs, receiver._stalled = [0] * 4, [False] * 4  # as _start() makes them
    receiver._last = [9, 8, None, 20]  # 1 wrote 8: 9 follows; 2 has had nothing; 3 is ahead
    assert receiver._behind(heads, 0) == [2]  # nothing written yet: 2 may hold a lower id
    receiver._written, receiver._written_run = 8, 0
    assert receiver._behind(heads, 0) == []
    heads[0] = heads[0]._replace(image_id=11)  # 9 and 10 not written: 1 or 2 may hold them
    assert receiver._behind(heads, 0) == [1, 2]
    receiver._runs = [1, 0, 0, 0]  # 0's ids went back (a new run): 3, still in the old one, may hold its first
    assert receiver._behind(heads, 0) == [1, 2, 3]
    receiver._stalled = [False, True, True, False]  # given up: had nothing while waited for
    assert receiver._behind(heads, 0) == [3]
    receiver.publisher = ImagePublisher(config).open()  # the pause drains what is held, and waits again
    try:
        receiver._idle()
    finally:
        receiver.publisher.close()
    assert receiver._behind(heads, 0) == [1, 2, 3]


def test_a_stream_at_an_ipv6_address_is_received(make_config) -> None:
    config, _ = make_config(image_pixel_height=4, image_pixel_width=6)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.IPV6, 1)
    address = f"tcp://[::1]:{push.bind_to_random_port('tcp://[::1]')}"
    try:
        with running(StreamReceiver(config, address, n_connections=1, ctx=ctx)), \
                ImageSubscriber(config, ctx=ctx) as subscriber:
            def probed() -> bool:
                if push.poll(0, zmq.POLLOUT):
                    push.send_multipart(array10.encode(5, ramp(5, config.shape, config.dtype)), zmq.NOBLOCK)
                image = subscriber.receive(timeout=0.2)
                return image is not None and np.array_equal(image.data, ramp(5, config.shape, config.dtype))

            assert wait_until(probed, timeout=10)
    finally:
        push.close(0)
        ctx.term()


def test_messages_taken_in_are_published_at_close(make_config) -> None:
    """At stop, the connections' decoded messages not written yet and the held messages go out,
    in id order: they were taken in from the network."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12)
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", n_connections=2, ctx=ctx).start()
    try:
        with ImageSubscriber(config, ctx=ctx) as subscriber:
            assert wait_until(lambda: subscriber.socket.poll(10) is not None
                              and receiver.publisher.subscriber_count() == 1)
            subscriber.attach()  # a reader maps the ring while its writer lives
            for image_id in (1, 3):  # written, their messages held (0 and 2 not there yet)
                receiver.handle(array10.encode(image_id, ramp(image_id, config.shape, config.dtype)))
            for index, image_id in enumerate((2, 0)):  # waiting at their connections
                parts = array10.encode(image_id, ramp(image_id, config.shape, config.dtype))
                receiver._heads[index] = _Head(*receiver._decode(parts), parts, image_id)
            assert subscriber.receive(timeout=0.2) is None
            receiver.close()
            ids = []
            while (image := subscriber.receive(timeout=1)) is not None:
                assert np.array_equal(image.data, ramp(image.image_id, config.shape, config.dtype))
                ids.append(image.image_id)
    finally:
        receiver.close()
        ctx.term()
    assert ids == [0, 1, 2, 3]


def _released(order: InOrder, ids: list[int]) -> list[int]:
    out = []
    for image_id in ids:
        out += order.before(image_id) + order.add(image_id, image_id)
    return out


def test_in_order_sorts_interleaved_ids_and_gives_up_on_a_missing_one() -> None:
    order = InOrder(window=4, n_slots=100)
    assert _released(order, [1, 0, 3, 2, 5, 4]) == [0, 1, 2, 3, 4, 5]  # 1 waits for 0 only at the start
    assert _released(order, [7, 8, 9, 10]) == []  # 6 does not come: held, at most 4
    assert order.add(11, 11) == [7, 8, 9, 10, 11]  # a fifth: 6 is skipped, the rest follow in order
    assert _released(order, [14, 12]) == [12]  # 13 missing: 14 waits
    assert order.drain() == [14] and order.drain() == []
    assert _released(order, [15]) == [15]  # the next one goes at once


def test_in_order_lets_nothing_be_overwritten_or_passed() -> None:
    """A held image goes out before its slot is written again (the same id, or one a ring
    apart), and before the images of a new run whose ids start again."""
    order = InOrder(window=8, n_slots=10)
    order.max_distance = 100  # the guard alone, as for a new run's ids (test_ids_far_behind_the_newest_...)
    assert _released(order, [0]) == [] and order.drain() == [0]
    assert _released(order, [2, 4]) == []  # 1 missing
    assert _released(order, [12]) == [2]  # 12 takes 2's slot: 2 goes first; 12 and 4 wait for 3
    # 4 again (a sender that began again): the held 4 is given up, not published, since its slot
    # gets the new 4's pixels under the same id (a reader would take them for the old 4's)
    assert _released(order, [4]) == [] and order.lost == [4]
    assert order.drain() == [4, 12]
    assert _released(order, [13, 15, 14]) == [13, 14, 15]
    assert _released(order, [25, 0, 1]) == [25, 0, 1]  # ids went back: the old run's 25 first


def test_an_old_run_image_held_for_its_order_goes_before_the_new_run_reaches_its_id() -> None:
    """A sender began its ids again while a -n 4 receiver was behind: the merge wrote the new
    run's low ids first, and the old run's 197 waited (held) for its order behind them until the
    new run reached 196; the new 197 then took its slot just after the old 197's metadata went
    out: readers got the new pixels under the old image's metadata, the guard saying intact (same
    id). Nothing is held for more than a window of images now; one still held when its id comes
    again is given up (counted lost), never published."""
    def merged(order: InOrder, new_run: list[int]) -> list[int]:
        """The old run up to 196 published, then as the merge wrote them: new 0, old 197, new 1..."""
        assert _released(order, list(range(197))) + order.drain() == list(range(197))
        return _released(order, [0, 197, *new_run])

    order = InOrder(window=4, n_slots=1000)
    released = merged(order, list(range(1, 197)))
    assert released.index(197) <= 1 + 2 * 4 and sorted(released) == [*range(197), 197]  # early, out of order
    assert _released(order, [197]) == [197] and order.lost == []  # the new 197, nothing lost
    wide = InOrder(window=300, n_slots=1000)  # 197 still held when the new run reaches its id
    new_run = [i for i in range(1, 197) if i != 196]
    assert merged(wide, new_run) == [0, *new_run]
    assert _released(wide, [197]) == [] and wide.lost == [197]
    assert wide.drain() == [197]  # the new run's 197


def test_a_connection_ahead_for_a_while_is_not_put_out_of_order() -> None:
    """Messages held because one connection ran ahead of the others went out of order after two
    windows (the rule is for an old run's last images after the ids went back), and readers saw
    ids go back, which ends a recording."""
    order = InOrder(window=16, n_slots=1000)
    ahead = list(range(20, 72, 4))  # one connection's next 13 images, written before the others'
    arrivals = [*range(17), *ahead, *[i for i in range(17, 140) if i not in ahead]]
    released = _released(order, arrivals) + order.drain()
    assert released == list(range(140))


def test_ids_that_step_are_released_within_the_window_never_at_their_slot(make_config) -> None:
    """Pulse ids stepping by 4 into a ring of 1000 slots use 250 of them. A window of 256 held
    each message until its slot was written again, so readers found most images gone; the
    receiver's window is a few images per connection."""
    config, _ = make_config(ram_buffer_slots=1000)
    order = StreamReceiver(config, "tcp://127.0.0.1:1", n_connections=4).in_order
    assert order.window == 16
    released, by_before = [], 0
    for image_id in range(0, 8000, 4):
        early = order.before(image_id)
        by_before += len(early)
        released += early + order.add(image_id, image_id)
        assert len(order) <= order.window
    assert by_before == 0 and released + order.drain() == list(range(0, 8000, 4))


def test_ids_far_behind_the_newest_go_and_a_step_is_learnt() -> None:
    """Pulse ids stepping by 100 into 1000 slots: the ring holds 10 of them. Held for a window of
    16, each went out just before its slot was written again, and a -n 4 receiver's readers got 35
    of 3000. A held id goes once the newest is half a ring above it, and after STEP_HISTORY ids
    the step is the stream's: the next id of a step follows at once, as 1 does after 0."""
    order = InOrder(window=16, n_slots=1000)
    released, held_most = [], 0
    for image_id in range(100, 300_100, 100):
        assert order.before(image_id) == []  # never at its slot
        released += order.add(image_id, image_id)
        held_most = max(held_most, len(order))
    assert released + order.drain() == list(range(100, 300_100, 100))
    assert held_most == 5 and order.step == 100  # 500 ids at first: half the ring; nothing once learnt
    assert _released(order, [300_100]) == [300_100]  # the last was 300_000
    assert _released(order, [300_300]) == [] and _released(order, [300_200]) == [300_200, 300_300]  # a gap waits
    assert order.drain() == [] and order.step == 100


def test_ids_that_step_reach_readers_through_4_connections(make_config) -> None:
    """The same through a real -n 4 receiver at 500 images/s: a reader takes every image, intact.
    The ids use 10 of the ring's slots: a reader has 20 ms to take an image before it is written
    over (at 2000 images/s, 5 ms: a CPU-loaded machine made the test's own reader lose some)."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12, ram_buffer_slots=1000)
    n_images, step, probe = 1000, 100, 10**9
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    receiver = StreamReceiver(config, address, n_connections=4, ctx=ctx)
    try:
        with running(receiver), ImageSubscriber(config, ctx=ctx) as subscriber:
            def probed() -> bool:
                if push.poll(0, zmq.POLLOUT):
                    push.send_multipart(array10.encode(probe, ramp(probe, config.shape, config.dtype)), zmq.NOBLOCK)
                return subscriber.receive(timeout=0.2) is not None

            assert wait_until(probed, timeout=10)
            time.sleep(0.3)  # every connection's handshake
            while subscriber.receive(timeout=0.3) is not None:
                pass
            sent = [k * step for k in range(1, n_images + 1)]

            def send() -> None:
                start = time.monotonic()
                for k, image_id in enumerate(sent):
                    time.sleep(max(0.0, start + k / 500 - time.monotonic()))
                    push.send_multipart(array10.encode(image_id, ramp(image_id, config.shape, config.dtype)))

            sender = threading.Thread(target=send)
            sender.start()
            taken = []
            while (image := subscriber.receive(timeout=2)) is not None:
                data = image.data.copy()
                if image.image_id != probe and subscriber.confirm(image):
                    assert np.array_equal(data, ramp(image.image_id, config.shape, config.dtype))
                    taken.append(image.image_id)
            sender.join(10)
    finally:
        push.close(0)
        ctx.term()
    assert taken == sent


def test_in_order_with_window_0_holds_nothing() -> None:
    order = InOrder(window=0, n_slots=10)
    assert _released(order, [3, 1, 2, 2, 0]) == [3, 1, 2, 2, 0]
    assert len(order) == 0


@pytest.mark.parametrize("args,message", [
    (["array-1.0", "-t", "router"], "-t/--type 'router' is not allowed (allowed: pull, sub)"),
    (["bsread", "-n", "0"], "-n/--n_connections"),
    (["array-1.0", "-n", "x"], "-n/--n_connections"),
    (["array-1.0", "-n", "5000"], "-n 5000 is not allowed: must be 1..256 connections"),  # was: Too many open files
])
def test_cli_bad_input_exits_2(make_config, service, args: list, message: str) -> None:
    config, path = make_config()
    fmt, *options = args
    proc = service("stddaq.services.receiver", fmt, path, "tcp://127.0.0.1:5999", *options)
    assert proc.wait(timeout=30) == 2
    _, err = proc.output()
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_receives_and_stops_cleanly(make_config, service) -> None:
    config, path = make_config(image_pixel_height=8, image_pixel_width=12)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        with ImageSubscriber(config, ctx=ctx) as subscriber:
            proc = service("stddaq.services.receiver", "array-1.0", path, f"tcp://127.0.0.1:{port}", "-n", "2")
            ok = wait_until(lambda: (push.send_multipart(array10.encode(7, ramp(7, config.shape, config.dtype)),
                                                         zmq.NOBLOCK) if push.poll(0, zmq.POLLOUT) else None) is None
                            and (image := subscriber.receive(timeout=0.2)) is not None
                            and np.array_equal(image.data, ramp(7, config.shape, config.dtype)), timeout=15)
            assert ok
        assert proc.stop() == 0
    finally:
        push.close(0)
        ctx.term()
    _, err = proc.output()
    assert "receiving array-1.0" in err and json  # log line of the start


# ---------------------------------------------------------------------- values the formats must refuse
def _bsread_message(config, pulse_id: int, stamp) -> list[bytes]:
    parts = bsread.BsreadEncoder(config.shape, config.dtype).parts(
        pulse_id, "X:CAM", 1, 2, bitshuffle_lz4_encode(np.zeros(config.shape, config.dtype)))
    main = json.loads(parts[0])
    main["global_timestamp"] = stamp
    return [json.dumps(main).encode()] + [bytes(memoryview(part)) for part in parts[1:]]


@pytest.mark.parametrize("stream_type,image_id", [("array-1.0", 2**63), ("array-1.0", 2**64), ("bsread", 2**63)])
def test_an_id_the_ring_cannot_guard_is_refused_and_the_receiver_goes_on(make_config, stream_type, image_id) -> None:
    """The overwrite guard stores 2 * id + 2 in a uint64: a larger id is an invalid message,
    counted and named, not an exception that stops the receiver."""
    config, _ = make_config(image_pixel_height=4, image_pixel_width=4)
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", stream_type=stream_type, n_connections=1, ctx=ctx).start()
    try:
        if stream_type == "array-1.0":
            header = {"htype": "array-1.0", "shape": [4, 4], "type": "uint16", "frame": image_id}
            parts = [json.dumps(header).encode(), bytes(32)]
        else:
            parts = _bsread_message(config, image_id, {"sec": 1, "ns": 2})
        assert receiver.handle(parts) is False
        assert receiver.stats()["invalid"] == 1 and "expected an integer 0..9223372036854775806" in receiver.last_error
        assert receiver.handle(_bsread_message(config, 3, None) if stream_type == "bsread"
                               else array10.encode(3, np.zeros(config.shape, config.dtype)))  # the next one goes in
    finally:
        receiver.close()
        ctx.term()


@pytest.mark.parametrize("detector_type,stamp", [("gigafrost", 5), ("gigafrost", [1, 2]), ("pco", {"sec": -1, "ns": 0}),
                                                 ("pco", {"sec": 1.5, "ns": 0}), ("pco", {"sec": "1", "ns": 0})])
def test_a_bad_bsread_timestamp_is_refused_and_named(make_config, detector_type, stamp) -> None:
    config, _ = make_config(image_pixel_height=4, image_pixel_width=4, detector_type=detector_type)
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", stream_type="bsread", n_connections=1, ctx=ctx).start()
    try:
        assert receiver.handle(_bsread_message(config, 7, stamp)) is False
        assert receiver.stats()["invalid"] == 1 and "global_timestamp" in receiver.last_error
    finally:
        receiver.close()
        ctx.term()


def test_a_gigafrost_headers_own_fields_go_into_the_metadata(make_config, caplog) -> None:
    """A GigaFRoST camera's array-1.0 header carries exposure_time, timestamp, scan_id, scan_time,
    sync_time and do_not_store; upstream's receiver puts them into ImageMetadata.gf (a C++
    std_delay_filter forwards only images with store_image). They were dropped."""
    config, _ = make_config(image_pixel_height=4, image_pixel_width=4)  # a gigafrost
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", stream_type="array-1.0", n_connections=1, ctx=ctx).start()
    subscriber = ImageSubscriber(config, ctx=ctx).connect(wait=10)
    subscriber.attach()  # now: the ring goes with the receiver's close, the messages come after

    def message(image_id: int, **fields) -> list:
        header = {"htype": "array-1.0", "shape": [4, 4], "type": "uint16", "frame": image_id, **fields}
        return [json.dumps(header).encode(), ramp(image_id, config.shape, config.dtype).tobytes()]

    try:
        camera = {"exposure_time": 1000, "timestamp": 2**40, "scan_id": 7, "scan_time": 5, "sync_time": 6}
        assert receiver.handle(message(1, **camera, do_not_store=False))
        assert receiver.handle(message(2, **camera, do_not_store=True))
        assert receiver.handle(message(3))  # a sender without them: none, not the ones before
        # a value a field cannot hold costs that field, not the image; an integral float is taken
        assert receiver.handle(message(4, scan_id=-1, timestamp=1.5e9))
        assert "array-1.0 header field 'scan_id' is -1, expected an integer 0..4294967295" in caplog.text
        receiver.close()  # what is held goes out
        images = [subscriber.receive(timeout=5) for _ in range(4)]
    finally:
        subscriber.close()
        receiver.close()
        ctx.term()
    gf = [image.metadata.gf for image in images[:2]]
    assert [(g.exposure_time, g.frame_timestamp, g.scan_id, g.scan_time, g.sync_time) for g in gf] == \
        [(1000, 2**40, 7, 5, 6)] * 2
    assert [g.store_image for g in gf] == [True, False]
    assert images[2].image_id == 3 and images[2].metadata.WhichOneof("image_metadata") is None
    fourth = images[3].metadata.gf
    assert (fourth.scan_id, fourth.frame_timestamp, fourth.store_image) == (0, 1_500_000_000, True)


def test_other_detectors_headers_keep_their_own_fields(make_config) -> None:
    """An Eiger's or a PCO's sender with a float "timestamp" in its header had every image
    refused once GigaFRoST fields were read from any header."""
    config, _ = make_config(detector_type="eiger", bit_depth=16, image_pixel_height=4, image_pixel_width=4)
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", stream_type="array-1.0", n_connections=1, ctx=ctx).start()
    try:
        header = {"htype": "array-1.0", "shape": [4, 4], "type": "uint16", "frame": 1, "timestamp": 1701612345.25}
        assert receiver.handle([json.dumps(header).encode(), bytes(32)])
        assert not receiver._metadata.HasField("gf")
    finally:
        receiver.close()
        ctx.term()


def _huge_bsread_claim(config) -> list:
    """A few hundred bytes whose data header claims a 131072x131072 uint32 image."""
    parts = bsread.BsreadEncoder((16, 16), np.dtype("uint32")).parts(
        5, "X", 1, 2, bitshuffle_lz4_encode(np.zeros((16, 16), np.uint32)))
    data_header = bytes(parts[1]).replace(b"[16,16]", b"[131072,131072]")
    main = json.loads(parts[0])
    main["hash"] = hashlib.md5(data_header).hexdigest()
    blob = bytearray(bytes(memoryview(parts[2])))
    blob[:8] = (131072 * 131072 * 4).to_bytes(8, "big")
    return [json.dumps(main).encode(), data_header, bytes(blob), bytes(memoryview(parts[3]))]


@pytest.mark.parametrize("stream_type,bad,counter,message", [
    ("array-1.0", lambda config: [b"[" * 100_000, b""], "invalid", "array-1.0 header is JSON nested too deeply"),
    ("bsread", lambda config: [b"[" * 100_000, b"", b"", b""], "invalid",
     "bsread main header is JSON nested too deeply"),
    ("bsread", _huge_bsread_claim, "mismatch", "image 5: shape [131072, 131072] is not the config's [16, 16]"),
])
def test_a_hostile_message_costs_only_itself(make_config, stream_type, bad, counter, message) -> None:
    """A header of 100000 '[' (RecursionError) ended either receiver, the stream client and
    `stddaq watch`; a bsread message claiming a huge image was decompressed before its shape was
    checked (OverflowError here, MemoryError on a smaller host) and ended std_bsread_recv."""
    from stddaq.client.stream import decode as client_decode

    config, _ = make_config(image_pixel_height=16, image_pixel_width=16)
    ctx = zmq.Context()
    receiver = StreamReceiver(config, "tcp://127.0.0.1:1", stream_type=stream_type, n_connections=1, ctx=ctx).start()
    try:
        assert receiver.handle(bad(config)) is False
        assert receiver.stats()[counter] == 1 and message in receiver.last_error, receiver.last_error
        good = (array10.encode(3, np.zeros(config.shape, config.dtype)) if stream_type == "array-1.0" else
                bsread.BsreadEncoder(config.shape, config.dtype).parts(
                    3, "X", 1, 2, bitshuffle_lz4_encode(np.zeros(config.shape, config.dtype))))
        assert receiver.handle(good)  # the next one goes in
    finally:
        receiver.close()
        ctx.term()
    with pytest.raises(FormatError):  # the stream client: one message refused, not a RecursionError out of it
        client_decode(bad(config))


def test_messages_queued_in_the_connections_at_stop_are_written(make_config) -> None:
    """At stop only the decoded heads were written; what the connections' queues held (it had
    reached the receiver) was dropped without a word: 56 of 60 images with -n 4, all with -n 1."""
    config, _ = make_config(image_pixel_height=4, image_pixel_width=4, ram_buffer_slots=100)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    receiver = StreamReceiver(config, address, n_connections=4, ctx=ctx).start()  # started, not running
    subscriber = ImageSubscriber(config, ctx=ctx).connect(wait=10)
    subscriber.attach()
    try:
        for frame in range(60):  # (a PUSH waits for a connection; it deals out to those that are up)
            push.send_multipart(array10.encode(frame, ramp(frame, config.shape, config.dtype)))
        assert receiver._poller.poll(5000)
        time.sleep(0.5)  # all in the receiver's queues now
        receiver.close()
        ids = []
        while (image := subscriber.receive(timeout=1)) is not None:
            ids.append(image.image_id)
    finally:
        subscriber.close()
        push.close(0)
        receiver.close()
        ctx.term()
    assert ids == list(range(60))


def test_what_the_close_cannot_write_in_time_is_counted_lost_and_said(make_config, caplog) -> None:
    """Past the close's drain time the rest of the connections' queues went with the sockets,
    counted nowhere and said nowhere, though it had reached the receiver."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=8, ram_buffer_slots=1000)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{push.bind_to_random_port('tcp://127.0.0.1')}"
    receiver = StreamReceiver(config, address, n_connections=4, ctx=ctx).start()
    written = []
    try:
        for frame in range(300):
            push.send_multipart(array10.encode(frame, ramp(frame, config.shape, config.dtype)))
        assert receiver._poller.poll(5000)
        time.sleep(0.5)  # all in the receiver's queues now
        write_image = receiver.publisher.write_image

        def slow(metadata, pixels):  # a ring this slow writes about 50 in the close's 0.5 s
            time.sleep(0.01)
            written.append(metadata.image_id)
            return write_image(metadata, pixels)

        receiver.publisher.write_image = slow
        receiver.close()
        totals = receiver.stats()
    finally:
        push.close(0)
        receiver.close()
        ctx.term()
    assert 0 < len(written) < 300 and totals["lost"] == 300 - len(written), (len(written), dict(totals))
    assert f"{300 - len(written)} message(s) that had reached this receiver were not written" in caplog.text
