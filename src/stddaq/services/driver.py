"""std_det_driver: the websocket-controlled writer driver (SPEC 8).

Two threads, one job each:

- the **data loop** (the service's ``run()``, a plain blocking pyzmq loop) records: it sends
  ``create_file`` to every writer and waits (bounded) for their answers, reads ``<det>-<suffix>``
  and hands the k-th recorded image to writer ``k % N`` as a ``record_image`` WriterAction (with
  ``-m`` every image also to the metadata writer), then ``confirm_last_image`` and ``close_file``,
  and finally writes the merged ``<prefix>_master.h5``;
- the **control plane** (an asyncio websocket server in its own thread) parses commands, runs the
  pre-flight checks, and pushes statuses to every client at 10 Hz and on every change. Each client
  has its own bounded queue and sender task, so a slow client delays nobody, least of all the
  data loop, which only ever hands a status over with ``call_soon_threadsafe``.

Sockets are upstream's: the driver binds PUSH ``ipc:///tmp/<det>-driver-<i>`` and connects PULL
to ``ipc:///tmp/<det>-writer-<i>`` (the writer binds that one). A socket monitor on each PUSH
tells the data loop at once when a writer's process goes away, so a dead writer ends the run in
``error`` naming the writer instead of a hang; a writer that reports a failure (disk full) does
the same. On every error the remaining writers are told to close their files first, so what was
written stays readable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
from stddaq.bus.sockets import bind, unlink_ipc
from stddaq.bus.subscriber import ImageSubscriber
from stddaq.config import STAGE_SUFFIXES, DetectorConfig
from stddaq.errors import BufferMissingError, BusError, UsageError
from stddaq.protocol import ResponseCode, WriterAction, WriterResponse
from stddaq.services.base import (
    ArgumentParser,
    Service,
    non_negative_float,
    port_number,
    service_main,
)
from stddaq.services.driver_control import (
    BUSY,
    CommandError,
    PreflightError,
    StartCommand,
    Status,
    StopCommand,
    parse_command,
    preflight,
    status_message,
)

log = logging.getLogger(__name__)

STATUS_PERIOD = 0.1  # seconds between status pushes when nothing changes (10 Hz)
CHECK_PERIOD = 0.05  # seconds between liveness checks of the writers while recording
CLIENT_QUEUE = 256  # status messages buffered per websocket client; a slower client loses the oldest
FAIL_CLOSE_TIMEOUT = 2.0  # after an error: how long the surviving writers get to close their files

CONFIRM_PERIOD = 0.5  # seconds between confirm_last_image requests while recording (failures come back in them)
CONFIRM_LAST_IMAGE = WriterAction(confirm_last_image={}).SerializeToString()

MasterWriter = Callable[[StartCommand, int, Path | None, DetectorConfig], None]


def record_image_bytes(metadata_bytes: bytes, run: int | None = None) -> bytes:
    """``WriterAction{record_image{image_metadata, run}}`` serialized around already serialized
    metadata (``run``: the image's run, see RecordImage.run; None or 0: not known, left out).

    Per image this saves building and serializing a nested message; the bytes are exactly what
    protobuf would produce (a test compares them).
    """
    inner = b"\x0a" + _varint(len(metadata_bytes)) + metadata_bytes
    if run:
        inner += _RUN_TAG + _varint(run)
    return b"\x12" + _varint(len(inner)) + inner


_RUN_TAG = b"\xa0\x06"  # RecordImage.run: field 100, varint


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class WriterLink:
    """The driver's end of one writer: actions out (PUSH, bound), answers in (PULL), liveness."""

    def __init__(self, ctx: zmq.Context, config: DetectorConfig, key: str, hwm: int) -> None:
        self.key = key
        self.name = "the metadata writer" if key == "meta" else f"writer {key}"
        self.action_address = config.ipc_address(f"driver-{key}")
        self.response_address = config.ipc_address(f"writer-{key}")
        self.peers = 0
        #: checks in a row that found more than one process connected (see ``crowded``)
        self.crowded_checks = 0
        self.outstanding = 0  # requests sent whose answer has not come yet (answers come in order)
        self.asked_at = 0.0  # when the oldest outstanding request was sent
        self.last_sent_id = -1  # the id of the last image handed to this writer (this run)
        self.asked_after_id = -1  # the last image sent before the oldest outstanding request
        self.push: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.pull: zmq.Socket | None = None
        self._bound = False
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, hwm)
        self.push = push
        try:
            self.monitor = push.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            bind(push, self.action_address, f"the action socket of {self.name}")
            self._bound = True
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RECONNECT_IVL, 20)
            pull.connect(self.response_address)
            self.pull = pull
        except BaseException:  # its sockets left open would hang the context's term() for ever
            self.close()
            raise

    def update(self) -> int:
        """Read the monitor's connect/disconnect events; returns the writers connected now."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.peers += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.peers = max(0, self.peers - 1)
                if self.peers == 0:  # what it owed goes with its process: a new one answers only its own
                    self.outstanding = 0
        return self.peers

    def crowded(self) -> str | None:
        """Why this link cannot be trusted with images: more than one process connected at two
        checks in a row (a second process of this writer id gets every other image from the PUSH).
        One check is not enough: a probe whether the name is in use (``bind``'s, ``stddaq up``'s)
        connects for a moment, takes nothing and goes."""
        self.crowded_checks = self.crowded_checks + 1 if self.peers > 1 else 0
        return self.crowding() if self.crowded_checks >= 2 else None

    def crowding(self) -> str:
        return (f"{self.peers} processes are connected as {self.name} to {self.action_address}: the images are "
                f"shared between them (is a second std_det_writer {self.key} running?)")

    def send(self, payload: bytes) -> bool:
        try:
            self.push.send(payload, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def response(self) -> WriterResponse | None:
        try:
            frame = self.pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return None
        response = WriterResponse()
        try:
            response.ParseFromString(frame)
        except Exception:  # noqa: BLE001 - garbage from a peer is an answer we cannot use
            response = WriterResponse(code=ResponseCode.FAILURE, reason=f"sent {len(frame)} bytes that are no WriterResponse")
        return response

    def request(self, payload: bytes, now: float) -> bool:
        """Send a request that gets one answer (create_file, confirm_last_image, close_file)."""
        if not self.send(payload):
            return False
        if self.outstanding == 0:
            self.asked_at = now
            self.asked_after_id = self.last_sent_id
        self.outstanding += 1
        return True

    def answer(self, now: float) -> WriterResponse | None:
        """The next answer, if one came; keeps ``outstanding`` in step."""
        response = self.response()
        if response is not None and self.outstanding:
            self.outstanding -= 1
            self.asked_at = now
            self.asked_after_id = self.last_sent_id
        return response

    def drain(self) -> int:
        """Take the answers left from an earlier run (a writer late with them); returns how many.
        Answers are matched to requests by their order, so a new request may go only once
        ``outstanding`` is 0: until then the writer still owes answers to requests sent before."""
        n = 0
        while self.response() is not None:
            n += 1
            self.outstanding = max(0, self.outstanding - 1)
        if not self.outstanding:
            self.last_sent_id = self.asked_after_id = -1
        return n

    def close(self) -> None:
        if self._bound:  # the name first: it goes even if what follows takes its time
            unlink_ipc(self.action_address)
            self._bound = False
        if self.push is not None:
            try:
                self.push.disable_monitor()
            except zmq.ZMQError:
                pass
            self.push.close(0)
            self.push = None
        if self.monitor is not None:
            self.monitor.close(0)
            self.monitor = None
        if self.pull is not None:
            self.pull.close(0)
            self.pull = None


class RunFailed(Exception):
    """A recording cannot go on; the message is the ``reason`` of the error status."""


def _check_answer(link: WriterLink, response: WriterResponse, what: str) -> None:
    if response.code != ResponseCode.SUCCESS:
        reason = response.reason or f"answered {ResponseCode.Name(response.code)}"
        raise RunFailed(f"{link.name}: {what} failed: {reason}")


class WriterDriver(Service):
    """The driver: websocket control in a thread, the recording loop in ``run()``."""

    name = "std_det_driver"

    def __init__(self, config: DetectorConfig, *, suffix: str = "image", host: str = "0.0.0.0", port: int = 8080,
                 with_meta: bool = False, ack_timeout: float = 5.0, confirm_timeout: float = 30.0,
                 hold: float = 1.0, master_writer: MasterWriter | None = None, **kw) -> None:
        super().__init__(config, **kw)
        if config.number_of_writers < 1:
            raise UsageError(f"number_of_writers is {config.number_of_writers} in the config of "
                             f"{config.detector_name}: the driver needs at least 1 writer")
        self.suffix = suffix
        config.channel(suffix)  # a bad suffix fails here, before anything is bound
        self.host = host
        self.port = port
        self.with_meta = with_meta
        self.ack_timeout = ack_timeout
        self.confirm_timeout = confirm_timeout
        self.hold = hold
        self.master_writer = master_writer
        self.counters.declare("recorded", "skipped", "runs", "failed_runs")
        self.links: list[WriterLink] = []
        self.meta_link: WriterLink | None = None
        # shared between the threads: the status (under _lock) and the queue of accepted starts
        self._lock = threading.Lock()
        self._status = Status.idle
        self._reason: str | None = None
        self._status_since = 0.0
        self.count = 0
        # queue.Queue, not SimpleQueue: CPython 3.11's SimpleQueue.get(timeout) waits for ever when a
        # signal lands just before its deadline (the data loop then never saw SIGTERM: a driver that
        # did not stop, seen in CI now and then since the fourth session)
        self._starts: queue.Queue[StartCommand] = queue.Queue()
        self._stop_recording = threading.Event()
        # control plane
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._serve_error: BaseException | None = None
        self._clients: set[asyncio.Queue] = set()

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        hwm = max(1000, self.config.n_slots)  # a deeper queue than the ring is of no use
        if self.with_meta:
            self.meta_link = WriterLink(self.ctx, self.config, "meta", hwm)
        for i in range(self.config.number_of_writers):  # one by one: _close closes those made if one fails
            self.links.append(WriterLink(self.ctx, self.config, str(i), hwm))
        self._thread = threading.Thread(target=self._control_thread, name="driver-websocket", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._ready.wait(0.05):  # in slices: a stop while it starts is not kept waiting
            if self.stopping:
                log.info("stopped while starting")
                return
            if time.monotonic() > deadline:
                raise BusError(f"the websocket server on {self.host}:{self.port} did not start within 10 s")
        if self._serve_error is not None:
            raise BusError(f"cannot serve the websocket on {self.host}:{self.port}: {self._serve_error}")
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        shown = f"[{shown}]" if ":" in shown else shown  # an IPv6 address, as a URL writes it
        self.endpoints = {"websocket": f"ws://{shown}:{self.port}", "source": self.config.ipc_address(self.suffix)}
        for link in self._all_links():
            self.endpoints[f"{link.key}-actions"] = link.action_address
            self.endpoints[f"{link.key}-responses"] = link.response_address
        log.info("websocket control on ws://%s:%d (port %d); %d writers%s; images from %s", shown, self.port,
                 self.port, len(self.links), " + metadata writer" if self.with_meta else "",
                 self.config.ipc_address(self.suffix))

    def _close(self) -> None:
        # the writer links first (their sockets are the data loop's, which has ended): their ipc
        # names are gone at once, even if the websocket thread below takes its time or a
        # supervisor kills this process while it does
        for link in self._all_links():
            link.close()
        loop, shutdown = self._loop, self._shutdown
        if loop is not None and shutdown is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(shutdown.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.links, self.meta_link = [], None

    def _all_links(self) -> list[WriterLink]:
        return ([self.meta_link] if self.meta_link else []) + self.links

    # ------------------------------------------------------------------ status (both threads)
    @property
    def status(self) -> Status:
        return self._status

    def snapshot(self) -> dict[str, Any]:
        """The status message clients get now."""
        with self._lock:
            return status_message(self._status, count=self.count, reason=self._reason)

    def _set_status(self, status: Status, reason: str | None = None, *, unless: Status | None = None) -> bool:
        """Change the status and push it to every client at once (thread-safe)."""
        with self._lock:
            if unless is not None and self._status is not unless:
                return False
            self._status = status
            self._reason = reason
            self._status_since = self.clock()
            message = status_message(status, count=self.count, reason=reason)
        log.info("status %s%s", status, f": {reason}" if reason else "")
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._broadcast, message)
            except RuntimeError:
                pass  # the control thread is shutting down
        return True

    # ------------------------------------------------------------------ data loop
    def _step(self) -> bool:
        try:
            start = self._starts.get(timeout=0.05)
        except queue.Empty:
            with self._lock:
                status, since = self._status, self._status_since
            if status in (Status.file_saved, Status.error) and self.clock() - since >= self.hold:
                self._set_status(Status.idle, unless=status)
            return True
        self._record(start)
        return not self.stopping

    def _record(self, start: StartCommand) -> None:
        self.counters.add("runs")
        subscriber: ImageSubscriber | None = None
        before = dict(self.counters.totals())
        try:
            self._create_files(start)
            subscriber = ImageSubscriber(self.config, self.suffix, ctx=self.ctx, stats=self.counters).connect()
            if not self._stop_requested():
                self._set_status(Status.waiting_for_first_image)
                self._record_images(start, subscriber)
            if self._stop_requested():
                self._set_status(Status.stop)
            subscriber.close()
            self._set_status(Status.saving_file)
            self._call_all("confirm_last_image", WriterAction(confirm_last_image={}), self.confirm_timeout)
            self._call_all("close_file", WriterAction(close_file={}), self.ack_timeout)
            self._write_master(start)
        except RunFailed as exc:
            self._fail("; ".join([str(exc), *self._losses(before, subscriber)]))
            return
        except Exception as exc:  # noqa: BLE001 - whatever else goes wrong ends this run, not the driver
            log.exception("recording into %s failed", start.path)
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        finally:
            if subscriber is not None:
                subscriber.close()
        problems = self._losses(before, subscriber)
        if self.stopping and not self._stop_recording.is_set() and self.count < start.n_image:
            problems.append(f"the driver was shut down after {self.count} of {start.n_image} images (no stop "
                            "command)")
        if problems:
            self.counters.add("failed_runs")
            reason = f"{'; '.join(problems)}; the files hold the {self.count} images recorded"
            log.error("recording into %s: %s", start.path, reason)
            self._set_status(Status.error, reason)
            return
        log.info("recorded %d images into %s", self.count, start.path)
        self._set_status(Status.file_saved)

    def _losses(self, before: dict[str, int], subscriber: ImageSubscriber | None) -> list[str]:
        """What the run's reader could not hand on, from its counters since ``before``."""
        after = self.counters.totals()
        lost, invalid, missed = (after.get(key, 0) - before.get(key, 0) for key in ("lost", "invalid", "missed"))
        problems = []
        if lost:  # published, but overwritten before the driver read them: the files have holes
            problems.append(f"{lost} image(s) lost: overwritten in the RAM buffer before the driver read them "
                            "(driver too slow, or RAM buffer too small)")
        if missed:  # published, but their metadata never came (a restarted source, before the driver reconnected)
            problems.append(f"{missed} image(s) missed: complete in the RAM buffer, but their metadata never reached "
                            "the driver (its connection to the source was down, e.g. a restarted source)")
        if invalid:  # e.g. a source re-created with another config: none of its images could be read
            last_error = subscriber.last_error if subscriber is not None else None
            problems.append(f"{invalid} message(s) on {self.config.ipc_address(self.suffix)} were no image the "
                            f"driver could read (last: {last_error})")
        return problems

    def _stop_requested(self) -> bool:
        return self._stop_recording.is_set() or self.stopping

    def _create_files(self, start: StartCommand) -> None:
        for link in self._all_links():
            link.crowded_checks = 0  # a new count: a probe seen at the last check of the run before is gone
            if link.update() > 1:  # maybe a probe of the name (see crowded): look again a moment later
                time.sleep(CHECK_PERIOD)
                if link.update() > 1:
                    raise RunFailed(link.crowding())
            if link.drain():  # after update(): a writer gone since owes nothing
                log.warning("%s: dropped answers left from an earlier run", link.name)
            if link.outstanding:
                self._wait_for_owed_answers(link)
            if link.update() == 0:
                raise RunFailed(f"{link.name} is not running: nothing is connected to {link.action_address} "
                                f"(start: std_det_writer <config> {link.key})")
        for link in self._all_links():
            path = start.meta_file if link is self.meta_link else start.raw_file(int(link.key))
            action = WriterAction(create_file={"path": str(path), "writer_id": start.writer_id})
            self._send(link, action.SerializeToString(), "create_file", request=True)
        self._collect(self._all_links(), "create_file", self.ack_timeout)

    def _wait_for_owed_answers(self, link: WriterLink) -> None:
        """A writer that did not answer in an earlier run (it hung, and that run failed) answers
        late, in order: its answers would be taken for this run's (a failure of the last run
        reported as this one's, or a file this run never created counted as done). Wait up to
        ack_timeout for them; a writer that still owes answers then cannot take this run."""
        deadline = self.clock() + self.ack_timeout
        while link.outstanding and link.update() > 0 and self.clock() < deadline:
            link.pull.poll(CHECK_PERIOD * 1000)
            link.drain()
        if link.outstanding:
            raise RunFailed(f"{link.name} still owes {link.outstanding} answer(s) to requests of an earlier run after "
                            f"{self.ack_timeout:g} s: it is stuck (a stopped process, a hung file system) and can "
                            "take no new run until it answers")

    def _call_all(self, what: str, action: WriterAction, timeout: float) -> None:
        payload = action.SerializeToString()
        for link in self._all_links():
            self._send(link, payload, what, request=True)
        self._collect(self._all_links(), what, timeout)

    def _send(self, link: WriterLink, payload: bytes, what: str, *, request: bool = False) -> None:
        """Send, waiting (bounded) while the writer's queue is full; RunFailed if it is gone."""
        send = link.request if request else (lambda data, _now: link.send(data))
        if send(payload, self.clock()):
            return
        deadline = self.clock() + self.ack_timeout
        while True:
            if link.update() == 0:
                raise RunFailed(f"{link.name} disconnected (did its process die?) before it got {what}")
            if link.push.poll(50, zmq.POLLOUT) and send(payload, self.clock()):
                return
            if self.clock() >= deadline:
                raise RunFailed(f"{link.name} took no {what} for {self.ack_timeout:g} s (its queue is full: "
                                f"is it stuck?)")

    def _collect(self, links: Sequence[WriterLink], what: str, timeout: float) -> None:
        """Wait until every link answered all its requests, at most ``timeout`` s after the last answer.

        Any FAILURE ends the run with the writer's reason; so does a writer that disconnects.
        """
        pending = [link for link in links if link.outstanding]
        poller = zmq.Poller()
        for link in pending:
            poller.register(link.pull, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
        while pending:
            now = self.clock()
            for link in list(pending):
                response = link.answer(now)
                if response is not None:
                    _check_answer(link, response, what)
                    if not link.outstanding:
                        pending.remove(link)
                    continue
                if link.update() == 0:
                    raise RunFailed(f"{link.name} disconnected (did its process die?) before it answered {what}")
                if now - link.asked_at > timeout:
                    raise RunFailed(f"{link.name} did not answer {what} within {timeout:g} s")
            if pending:
                poller.poll(CHECK_PERIOD * 1000)
                self.counters.tick()

    def _record_images(self, start: StartCommand, subscriber: ImageSubscriber) -> None:
        links, meta = self.links, self.meta_link
        n_links = len(links)
        n_image, start_id = start.n_image, start.start_id
        counters, clock = self.counters, self.clock
        stop_recording, service_stop = self._stop_recording, self._stop
        receive = subscriber.receive
        count = 0
        last_id = -1
        next_check = clock() + CHECK_PERIOD
        while count < n_image and not (stop_recording.is_set() or service_stop.is_set()):
            image = receive(timeout=CHECK_PERIOD)
            if image is None or clock() >= next_check:
                self._check_writers(subscriber.buffer)
                counters.tick()
                next_check = clock() + CHECK_PERIOD
                if image is None:
                    continue
            metadata = image.metadata
            image_id = metadata.image_id
            if image_id < start_id:
                counters.add("skipped")
                continue
            if image_id <= last_id:
                raise RunFailed(f"the source's ids went back from {last_id} to {image_id} after {count} images (a "
                                "restarted source or a new acquisition): the run stops, its files hold the images "
                                "before")
            last_id = image_id
            payload = record_image_bytes(metadata.SerializeToString(), image.run)
            if meta is not None and not meta.send(payload):  # it reads no pixels: no last_sent_id (_check_writers)
                self._send(meta, payload, f"image {image_id}")
            link = links[count % n_links]
            if not link.send(payload):
                self._send(link, payload, f"image {image_id}")
            link.last_sent_id = image_id
            count += 1
            self.count = count
            counters.add("recorded")
            if count == 1:
                self._set_status(Status.recording)

    def _check_writers(self, ring: RamBuffer | None = None) -> None:
        """While recording: a writer that died, failed to write, or stopped answering ends the run.

        Writers answer nothing to record_image; a failure is told in the answer to the next
        request, so each writer is asked confirm_last_image every CONFIRM_PERIOD s. A writer
        answers in order, so one that has not answered has not taken the image sent before the
        question either: once the source's ``ring`` (guarded) no longer holds that image, the
        writer has lost it, and the run ends then (a hung writer: within a ring's time at a
        fast source), not after confirm_timeout.
        """
        now = self.clock()
        guarded = ring is not None and ring.sequence is not None
        for link in self._all_links():
            while (response := link.answer(now)) is not None:
                _check_answer(link, response, "writing")
            if link.update() == 0:
                raise RunFailed(f"{link.name} disconnected while recording (did its process die?) "
                                f"after {self.count} images")
            if (crowded := link.crowded()) is not None:
                raise RunFailed(f"{crowded}; images sent to {link.name} may be in no file")
            if link.outstanding == 0:
                if now - link.asked_at >= CONFIRM_PERIOD:
                    link.request(CONFIRM_LAST_IMAGE, now)
                continue
            # (a source re-created since, its ids begun again, does not count: the ids going back say that)
            overtaken = (guarded and link.asked_after_id >= 0 and not ring.holds(link.asked_after_id)
                         and ring.newest_id() > link.asked_after_id)
            if overtaken and link.pull.poll(100):  # an answer on its way: the writer was just in time
                continue
            if overtaken:
                raise RunFailed(f"{link.name} has not taken image {link.asked_after_id} in "
                                f"{now - link.asked_at:.1f} s, and the source has overwritten its slot since: "
                                "the writer is stuck or too slow")
            if now - link.asked_at > self.confirm_timeout:
                raise RunFailed(f"{link.name} has not confirmed its images for {self.confirm_timeout:g} s (stuck?)")

    def _write_master(self, start: StartCommand) -> None:
        meta_file = start.meta_file if self.meta_link is not None else None
        writer = self.master_writer or default_master_writer
        try:
            writer(start, len(self.links), meta_file, self.config)
        except Exception as exc:  # noqa: BLE001 - any failure is the run's error reason
            log.debug("master file failed", exc_info=True)
            raise RunFailed(f"writing {start.master_file} failed: {type(exc).__name__}: {exc}") from None

    def _fail(self, reason: str) -> None:
        """Close what the surviving writers have open (bounded), then report the error."""
        self.counters.add("failed_runs")
        log.error("recording failed: %s", reason)
        payload = WriterAction(close_file={}).SerializeToString()
        now = self.clock()
        alive = [link for link in self._all_links() if link.update() > 0 and link.request(payload, now)]
        deadline = now + FAIL_CLOSE_TIMEOUT
        while alive and self.clock() < deadline:  # every answer is taken, failures only logged
            for link in list(alive):
                while (response := link.answer(self.clock())) is not None:
                    if response.code != ResponseCode.SUCCESS:
                        log.warning("%s while closing after the error: %s", link.name, response.reason)
                if not link.outstanding or link.update() == 0:
                    alive.remove(link)
            if alive:
                time.sleep(0.02)
        for link in alive:
            log.warning("%s did not close its file within %g s after the error", link.name, FAIL_CLOSE_TIMEOUT)
        self._set_status(Status.error, reason)

    # ------------------------------------------------------------------ control plane (its own thread)
    def _control_thread(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by _start or logged
            self._serve_error = exc
            self._ready.set()
            log.debug("websocket server ended", exc_info=True)

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        async with serve(self._handle, self.host, self.port, ping_interval=20, close_timeout=1) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._shutdown.wait()
            server.close(close_connections=True)
        self._loop = None

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in self._clients:
            _put_latest(client, message)

    async def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        client: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
        _put_latest(client, self.snapshot())
        self._clients.add(client)
        sender = asyncio.create_task(self._sender(connection, client))
        try:
            async for frame in connection:
                try:
                    reply = await self._on_message(frame)
                except Exception as exc:  # noqa: BLE001 - a command must never cost the client its connection
                    log.exception("command failed")
                    reply = {"status": "error", "reason": f"the command failed: {type(exc).__name__}: {exc}"}
                if reply is not None:
                    _put_latest(client, reply)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _sender(self, connection, client: asyncio.Queue) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while True:
                try:
                    message = await asyncio.wait_for(client.get(), STATUS_PERIOD)
                except TimeoutError:
                    message = self.snapshot()
                await connection.send(json.dumps(message))
        except ConnectionClosed:
            pass

    async def _on_message(self, frame: str | bytes) -> dict[str, Any] | None:
        """One command -> the reply for this client only (None: statuses will tell)."""
        try:
            command = parse_command(frame)
        except CommandError as exc:
            log.warning("bad command: %s", exc)
            return {"status": "error", "reason": str(exc)}
        if isinstance(command, StopCommand):
            with self._lock:
                busy = self._status in BUSY
            if not busy:
                return self.snapshot()  # nothing to stop: say what the driver is doing
            self._stop_recording.set()
            return None
        if self.status in BUSY:
            return {"status": "rejected", "reason": "driver is busy!"}
        try:
            check = await asyncio.to_thread(self._preflight, command)
        except PreflightError as exc:
            log.warning("start refused: %s", exc)
            return {"status": "error", "reason": str(exc)}
        with self._lock:
            if self._status in BUSY:
                return {"status": "rejected", "reason": "driver is busy!"}
            self.count = 0
            self._stop_recording.clear()
        self._set_status(Status.creating_file)
        self._starts.put(command)
        n = "until stop" if not command.n_image_given else f"{command.n_image} images"
        log.info("start: %s into %s/%s*.h5 from image id %d (%.1f GB free, room for %d images)", n, command.path,
                 command.file_prefix, command.start_id, check.free_bytes / 1e9, check.images_that_fit)
        return None

    def _preflight(self, command: StartCommand):
        self._check_source()
        files = [command.raw_file(i) for i in range(len(self.links))] + [command.master_file]
        if self.with_meta:
            files.append(command.meta_file)
        return preflight(command, recording_bytes=self._recording_bytes, files=files,
                         switch_user=self.config.switch_user_active)

    def _recording_bytes(self, n_images: int) -> int:
        """At most the bytes a recording of ``n_images`` takes on disk (storage.hdf5.recording_bytes;
        imported late: h5py is heavy)."""
        from stddaq.storage.hdf5 import largest_blob, recording_bytes

        config = self.config
        itemsize = config.dtype.itemsize
        pixels_n_bytes = config.image_pixel_height * config.image_pixel_width * itemsize
        codec = {suffix: codec for codec, suffix in STAGE_SUFFIXES.items()}.get(self.suffix)
        blob = None if codec is None else largest_blob(codec, pixels_n_bytes, itemsize, config.image_n_bytes)
        return recording_bytes(n_images, pixels_n_bytes, n_writers=config.number_of_writers,
                               gpfs_block_size=config.gpfs_block_size, blob_n_bytes=blob,
                               detector_type=config.detector_type if self.with_meta else None)


    def _check_source(self) -> None:
        """PreflightError if the source's RAM buffer exists but cannot be read with this config
        (another size: a source started with another config; no permission): no image of it
        would ever be recorded. One not there yet is fine: the run waits for its first image."""
        try:
            RamBuffer.attach(BufferLayout.of(self.config, self.suffix)).close()
        except BufferMissingError:
            return
        except (BusError, OSError) as exc:
            raise PreflightError(f"the source cannot be recorded: {exc}") from None


def _put_latest(client: asyncio.Queue, message: dict[str, Any]) -> None:
    """Queue a message for one client; when it is that far behind, its oldest message goes."""
    if client.full():
        try:
            client.get_nowait()
        except asyncio.QueueEmpty:
            pass
    client.put_nowait(message)


def default_master_writer(start: StartCommand, n_writers: int, meta_file: Path | None,
                          config: DetectorConfig) -> None:
    """The merged ``<prefix>_master.h5`` (storage.hdf5.write_master; imported late: h5py is heavy).

    With switch_user_active it belongs to the run's user (writer_id) and the group of the writers'
    first file (their primary group, or a setgid directory's): written by the driver (root), the
    user could not change or remove it. A refused chown (root squashed on NFS) is only said."""
    from stddaq.storage.hdf5 import write_master

    master = write_master(start.path, start.file_prefix, config.detector_name, n_writers,
                          meta_file=meta_file.name if meta_file is not None else None)
    if config.switch_user_active and start.writer_id > 0 and os.geteuid() == 0:
        try:
            os.chown(master, start.writer_id, os.stat(start.raw_file(0)).st_gid)
        except OSError as exc:
            log.warning("%s stays root's: cannot give it to user id %d: %s", master, start.writer_id,
                        exc.strerror or exc)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Drive the HDF5 writers: start/stop recordings over a websocket.")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("-s", "--source_suffix", default="image", help="channel suffix to record (default: image)")
    parser.add_argument("-p", "--port", type=port_number, default=8080,
                        help="websocket port (default: 8080; 0 = any free port, logged)")
    parser.add_argument("--host", default="0.0.0.0", help="interface of the websocket (default: all)")
    parser.add_argument("-m", "--metadata", action="store_true",
                        help="also send every image's metadata to the metadata writer (<prefix>Meta.h5)")
    parser.add_argument("--ack-timeout", type=non_negative_float, default=5.0,
                        help="seconds a writer has to answer create_file/close_file (default: 5)")
    parser.add_argument("--confirm-timeout", type=non_negative_float, default=30.0,
                        help="seconds a writer has to confirm its last image at the end (default: 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("std_det_driver", build_parser(), lambda config, a: WriterDriver(
        config, suffix=a.source_suffix, host=a.host, port=a.port, with_meta=a.metadata,
        ack_timeout=a.ack_timeout, confirm_timeout=a.confirm_timeout), argv)


if __name__ == "__main__":
    raise SystemExit(main())
