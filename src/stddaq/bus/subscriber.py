"""ImageSubscriber: one reader of a bus channel, yielding (metadata, zero-copy view) images.

A reader is handed only images whose slot still holds them (overwrite guard, see ram_buffer).
An image whose slot was already reused when its metadata was read is counted ``lost`` and not
handed on; a consumer that used a view for a while asks ``image.intact()`` (or
``subscriber.confirm(image)``) afterwards to know the bytes it used were not overwritten meanwhile.

Runs: a writer that begins its ids again writes the same ids into the same slots, so the guard
alone would vouch for the new run's image under a lagging reader's metadata of the run before.
The writer stamps each slot with the run of its image (``ImagePublisher``: the run goes up at
every message whose id is not above the one before), and the reader works out the run of each
message from the order it gets them in: it keeps a floor, "the next message is of run R or a
later one, and if of run R its id is above J". A message is taken only when the run stamped on
its slot is the one it must be: R with an id above J, or R + 1 with an id at most J (its ids
went back). Any other run there means the slot holds another run's image of that id: counted
``lost``. The floor starts from the writer's header read before the socket connects (messages
that reach this reader were sent after that), and moves with every message, taken or not.
A reader that missed messages over a change of run (its queue was full) can no longer tell the
runs apart: when it finds another run in the slot twice with nothing else queued, it reconnects
and takes a new floor (``_resubscribe``); what was sent meanwhile it misses (counted as gaps).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
import zmq
from google.protobuf.message import DecodeError

from stddaq.bus.publisher import METADATA_HWM
from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
from stddaq.config import DetectorConfig
from stddaq.errors import BufferMissingError, BusError
from stddaq.protocol import DTYPE_TO_NUMPY, ImageMetadata, ImageMetadataCompression, ImageMetadataStatus
from stddaq.stats import Stats

log = logging.getLogger(__name__)

#: Counters of a subscriber, all in ``stats``: processed_times: images handed on (and confirmed,
#: where the consumer calls confirm()); lost: slot overwritten before it was read (or, via
#: confirm(), while it was used); invalid: messages that are no usable ImageMetadata; gaps: image
#: ids never seen between two that were (dropped before they reached this reader, or never made:
#: ids that step); missed: of those, the ones the buffer holds complete, so their writer made and
#: published them and this reader lost them (its connection was down, or its queue full).
SUBSCRIBER_COUNTERS = ("lost", "invalid", "gaps", "missed")
_NONE = int(ImageMetadataCompression.none)
#: values of the enum fields a reader can act on (protobuf carries any int32 in them)
_STATUSES = frozenset(ImageMetadataStatus.values())
_COMPRESSIONS = frozenset(ImageMetadataCompression.values())
_RCVMORE = int(zmq.RCVMORE)
_NOBLOCK = int(zmq.NOBLOCK)


class Image:
    """One image on the bus: its metadata and a view of its slot (valid while ``intact()``).

    ``data`` is the (height, width) array for raw images, the uint8 blob of ``size`` bytes for
    compressed ones.
    """

    __slots__ = ("metadata", "data", "_buffer", "_run")

    def __init__(self, metadata: ImageMetadata, data: np.ndarray, buffer: RamBuffer, run: int | None = None) -> None:
        self.metadata = metadata
        self.data = data
        self._buffer = buffer
        self._run = run  # the run its slot must hold (None: not checked)

    @property
    def image_id(self) -> int:
        return self.metadata.image_id

    @property
    def run(self) -> int | None:
        """The run of its writer this image is of (its slot holds it); None where not checked."""
        return self._run

    @property
    def address(self) -> int:
        """Memory address of ``data`` (the start of its slot), for C calls."""
        return self._buffer.slot_address(self.metadata.image_id)

    def intact(self) -> bool:
        """True if the slot still holds this image complete, so what was read of it is good."""
        return self._buffer.holds(self.metadata.image_id, self._run)

    def copy(self) -> np.ndarray:
        """A private copy of the pixels; raises if the slot changed during the copy."""
        out = self.data.copy()
        if not self.intact():
            raise RuntimeError(f"image {self.metadata.image_id} was overwritten while it was copied")
        return out


class ImageSubscriber:
    """Connects SUB to ``ipc:///tmp/<channel>`` at once; maps the buffer when it exists."""

    def __init__(self, config: DetectorConfig, suffix: str = "image", *, ctx: zmq.Context | None = None,
                 created_by: str | None = None, stats: Stats | None = None,
                 metadata_suffix: str | None = None) -> None:
        """``metadata_suffix``: take the metadata from another channel than the ring's (upstream's
        -sm: a std_delay_filter republishes some images' metadata of ``<det>-image``)."""
        self.config = config
        self.suffix = suffix
        self.layout = BufferLayout.of(config, suffix)
        self.address = config.ipc_address(metadata_suffix or suffix)
        #: the metadata comes from the ring's own writer: an id it skipped is one it did not publish
        #: (not so behind a filter that republishes some images' metadata, -sm)
        self._same_channel = metadata_suffix in (None, suffix)
        self.created_by = created_by or ("the simulator or a receiver (std_sim, std_array10_recv)"
                                         if suffix == "image" else f"the service that writes {suffix!r}")
        self._ctx = ctx
        self._own_ctx = ctx is None
        self.socket: zmq.Socket | None = None
        self.buffer: RamBuffer | None = None
        self._buffer_inode: int | None = None
        self._next_inode_check = 0.0
        self._rcvtimeo = -1
        self.stats = stats or Stats(config.detector_name, f"subscriber-{suffix}", config.stats_collection_period)
        self.stats.declare(*SUBSCRIBER_COUNTERS)
        self.last_error: str | None = None
        self._last_id: int | None = None
        self._newest_stale = -1  # see overtaken_within
        #: for the missed count: ids up to this one may be an earlier run's leftovers in the buffer
        #: (the newest id in it when it was mapped, or when ids went back), until the reader has
        #: seen a ring's worth of consecutive ids since ``_gapless_since`` (every slot rewritten)
        self._missed_stale = -1
        self._gapless_since: int | None = None
        self._refused_inode: int | None = None  # a re-created buffer found unusable (see _replaced)
        self._slot = self.layout.slot_n_bytes
        # the run floor (module docstring): the next message is of run >= _run_floor, and if of
        # _run_floor its id is above _id_floor. _floor_at_connect: (buffer inode, run, id) read from
        # the writer's header before the socket connected, for the buffer mapped first
        self._run_floor, self._id_floor = 1, -1
        self._floor_at_connect: tuple[int, int, int] | None = None
        self._stuck = 0  # messages since the last image taken whose slot held another run, nothing else queued
        self._kept_old = False  # _replaced kept the old buffer: the message may be its gone writer's

    # ------------------------------------------------------------------ lifetime
    def connect(self, wait: float = 0.0) -> ImageSubscriber:
        """Connect; with ``wait`` > 0, return only once connected to the publisher (or raise
        BusError after ``wait`` seconds). A PUB drops what it sends before a subscriber's
        handshake is done, so a consumer that starts its source after this misses nothing."""
        self._ctx = self._ctx or zmq.Context()
        self._floor_at_connect = None
        if self._same_channel:
            with contextlib.suppress(BusError, OSError):
                self._attach(connecting=True)  # its header, before the socket connects (module docstring)
        sock = self._connect_socket(connect=not wait)
        if not wait:
            return self
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # before connect: no event missed
        try:
            sock.connect(self.address)
            connected = monitor.poll(wait * 1000)
        finally:
            sock.disable_monitor()
            monitor.close(0)
        if not connected:
            self.close()
            raise BusError(f"no publisher at {self.address} after {wait:g} s: start {self.created_by} first")
        return self

    def _connect_socket(self, connect: bool = True) -> zmq.Socket:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, METADATA_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 20)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket = sock
        self._rcvtimeo = None  # receive() sets it on this socket
        if connect:
            try:
                sock.connect(self.address)
            except zmq.ZMQError as exc:
                self.socket = None
                sock.close(0)  # a socket left open would make its context's term() wait forever
                raise BusError(f"cannot connect to {self.address}: {exc}") from None
        return sock

    def attach(self, wait: float = 0.0) -> RamBuffer:
        """Map the channel's buffer, waiting up to ``wait`` seconds for its writer to create it."""
        deadline = time.monotonic() + wait
        logged = False
        while True:
            try:
                return self._attach()
            except BufferMissingError:
                if time.monotonic() >= deadline:
                    raise
                if not logged:
                    log.info("waiting for /dev/shm/%s: start %s", self.layout.name, self.created_by)
                    logged = True
                time.sleep(0.05)

    def _attach(self, connecting: bool = False) -> RamBuffer:
        """Map the buffer now under the channel's name (BufferMissingError leaves the one mapped
        before as it was). The one before is let go, not closed: images of it still in use (a
        stage's threads compressing them) keep it mapped, and their bytes stay good (its writer
        is gone, so its guard words no longer change); it is unmapped with the last of them.

        The run floor: ``connecting`` (before the socket connects), the writer's run and last
        sent id now; later, that one if it is the same buffer, else run 1 from its first id (a
        buffer made after this reader connected: every message of its writer reached it)."""
        new = RamBuffer.attach(self.layout, created_by=self.created_by)
        self.buffer = new
        self._buffer_inode = inode = _inode(self.layout.name)
        self._newest_stale = self._missed_stale = self.buffer.newest_id()
        sent = new.sent_last()
        if connecting and sent is not None:
            self._floor_at_connect = (inode, sent[0], sent[1] - 1)  # that last message may still come
        floor = self._floor_at_connect
        self._run_floor, self._id_floor = (floor[1], floor[2]) if floor and floor[0] == inode else (1, -1)
        return self.buffer

    def _replaced(self, image_id: int, force: bool = False, last: int | None = None) -> bool:
        """The writer restarted: the name now points at a new shm object, re-map it.

        Checked when ids go back (forced) and at most every 0.2 s while slots look overwritten,
        so a reader that is simply behind does not pay a stat() per image. A new object its writer
        has not finished creating yet (size 0 for a moment) is not taken: False, and the buffer
        mapped before stays. ``last``: the last id this reader got from the old one. When ids went
        back (``force``), this message is the new writer's, and every message of the old one came
        before it (a SUB keeps one pipe across reconnects): what the old one holds complete after
        ``last`` was made and never reached this reader (its writer was killed before it sent
        them): counted missed. Not when an old message found its slot overwritten: the old one's
        later messages may still be on their way.

        Unless message ``image_id`` may still be the old writer's (``_may_be_old``): a reader more
        than a ring behind took the old writer's last messages for the new one's images of the same
        ids. Then the old buffer stays (the message is lost there), and the next message checks again.
        """
        self._kept_old = False
        now = time.monotonic()
        if not force and now < self._next_inode_check:
            return False
        self._next_inode_check = now + 0.2
        inode = _inode(self.layout.name)
        if inode is not None and inode != self._buffer_inode:
            old, stale = self.buffer, self._missed_stale
            if old is not None and self._may_be_old(old, image_id):
                self._next_inode_check = 0.0
                self._kept_old = True
                return False
            try:
                self._attach()
            except BufferMissingError:  # its writer is still creating it: not usable yet, try again later
                return False
            except (BusError, OSError) as exc:  # not usable at all (wrong size, no permission): said once
                if inode != self._refused_inode:
                    self._refused_inode = inode
                    log.warning("/dev/shm/%s was re-created by its writer but cannot be read: %s; its images are "
                                "counted lost until it is re-created again", self.layout.name, exc)
                    if self.buffer is not None:
                        self.buffer.close()  # the old writer's slots: nothing in them is vouched for any more
                return False
            log.info("/dev/shm/%s was re-created by its writer; re-attached", self.layout.name)
            if force and old is not None and last is not None:
                self._count_missed(old, max(last + 1, stale + 1), old.newest_id() + 1, "after")
            return True
        return False

    def _may_be_old(self, old: RamBuffer, image_id: int) -> bool:
        """True if message ``image_id`` may be one the writer of ``old`` sent (it is gone: its
        header says the run and id of its last message), by the run floor: its run is the floor's,
        or the next one when its id is not above the floor's id. False when ``old`` has no runs."""
        sent = old.sent_last() if self._same_channel else None
        if sent is None:
            return False
        old_run, old_last = sent
        run = self._least_run(image_id)
        return run < old_run or (run == old_run and image_id <= old_last)

    def _least_run(self, image_id: int) -> int:
        """The lowest run message ``image_id`` can be of, by the floor: the floor's if its id is
        above the floor's id, else the next."""
        return self._run_floor if image_id > self._id_floor else self._run_floor + 1

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def __enter__(self) -> ImageSubscriber:
        if self.socket is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def receive(self, timeout: float | None = 1.0) -> Image | None:
        """The next good-to-read image, or None when ``timeout`` seconds pass without one.

        The wait is a blocking recv with RCVTIMEO inside libzmq: no Python-level polling, so a
        reader that keeps up spends one call per image and no CPU while it waits.
        """
        sock = self.socket
        rcvtimeo = -1 if timeout is None else max(0, int(timeout * 1000))
        flags = 0
        if rcvtimeo == 0:
            flags = _NOBLOCK  # RCVTIMEO stays: consumers alternate receive(0) and a blocking receive
        elif rcvtimeo != self._rcvtimeo:
            sock.setsockopt(zmq.RCVTIMEO, rcvtimeo)
            self._rcvtimeo = rcvtimeo
        deadline = None
        while True:
            try:
                frame = sock.recv(flags)
            except zmq.Again:
                return None
            image = self._accept(frame)
            if image is not None:
                return image
            if sock is not self.socket:  # re-subscribed (see _other_run)
                sock = self.socket
                if not flags:
                    sock.setsockopt(zmq.RCVTIMEO, rcvtimeo)
                    self._rcvtimeo = rcvtimeo
            # a message that gave no image: keep waiting, but not past the caller's timeout
            if timeout is not None:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout
                elif now >= deadline:
                    return None

    def __iter__(self) -> Iterator[Image]:
        while True:
            image = self.receive(timeout=None)
            if image is not None:
                yield image

    def confirm(self, image: Image) -> bool:
        """After using ``image``: True if it was not overwritten meanwhile; else counted lost."""
        if image.intact():
            return True
        self.give_up(image)
        return False

    def overtaken_within(self, image: Image, margin: int) -> bool:
        """True if ``image``'s slot is overwritten within ``margin`` images
        (``RamBuffer.overtaken_within``). Ids left in the buffer by an earlier run are not taken
        for a writer far ahead: when this reader maps the buffer, ids up to the highest one in it
        prove nothing; when ids go back in the same buffer, ids below the new run's first plus
        the ring's size prove nothing (after that many images every slot holds the new run)."""
        return image._buffer.overtaken_within(image.metadata.image_id, margin, self._newest_stale)

    def give_up(self, image: Image) -> None:
        """Count ``image`` (handed on by ``receive``) as lost: it was not, or will not be, used.
        It leaves the processed images and their bytes (the stage's stats line counted the bytes of
        images it then gave up: 342 images' worth beside 15 processed)."""
        self.stats.add("lost")
        self.stats.unprocessed(image.data.nbytes)  # what _accept counted: the blob, or the pixels

    def _invalid(self, reason: str) -> None:
        """Count a message that gives no image. Multi-part messages are found here, not on every
        message: asking libzmq for RCVMORE costs pyzmq 1-2 us (it builds an enum per call), more
        than receiving the message. A multi-part message whose first part reads as metadata gives
        that image (its data is checked as any other's) and its other parts come here."""
        more = 0
        while self.socket is not None and self.socket.getsockopt(_RCVMORE):
            self.socket.recv()
            more += 1
        if more:
            reason = f"expected 1 message part, got {more + 1} ({reason})"
        self.stats.add("invalid")
        self.last_error = reason
        self.stats.warn("invalid", log, "%s: ignoring message: %s", self.address, reason)

    def _accept(self, frame: bytes) -> Image | None:
        """Check one metadata message and make its Image; the hot path of every consumer."""
        metadata = ImageMetadata()
        try:
            metadata.ParseFromString(frame)
        except DecodeError as exc:
            self._invalid(f"not an ImageMetadata ({len(frame)} bytes: {exc})")
            return None
        image_id = metadata.image_id
        dtype = DTYPE_TO_NUMPY.get(metadata.dtype)
        if dtype is None:
            self._invalid(f"image {image_id}: unknown dtype {metadata.dtype}")
            return None
        status, compression = metadata.status, metadata.compression
        if status not in _STATUSES:
            self._invalid(f"image {image_id}: unknown status {status}")
            return None
        if compression not in _COMPRESSIONS:
            self._invalid(f"image {image_id}: unknown compression {compression}")
            return None
        size = metadata.size
        height, width = metadata.height, metadata.width
        raw_bytes = height * width * dtype.itemsize
        if not raw_bytes:  # the decoders and formats refuse an image without pixels; it goes no further
            self._invalid(f"image {image_id}: shape {height}x{width} has no pixels")
            return None
        compressed = compression != _NONE
        if compressed and size == 0:
            self._invalid(f"image {image_id}: compressed with size 0 (a compressed image has bytes)")
            return None
        if size > self._slot or (not compressed and raw_bytes > self._slot):
            self._invalid(f"image {image_id}: {max(size, raw_bytes)} bytes do not fit a slot of {self._slot}")
            return None
        if not compressed and size != raw_bytes and size != 0:
            self._invalid(f"image {image_id}: size {size} is not height*width*itemsize = {raw_bytes}")
            return None

        buffer = self.buffer
        if buffer is None:
            try:
                buffer = self._attach()
            except BusError as exc:  # missing, or not the size the config says (another config's source)
                self._invalid(str(exc))
                return None
            except OSError as exc:
                self._invalid(f"cannot map /dev/shm/{self.layout.name}: {exc.strerror or exc}")
                return None
        last = self._last_id
        gap_from = None
        if last is not None and image_id != last + 1:
            if image_id <= last:
                previous = buffer
                self._replaced(image_id, force=True, last=last)  # ids went back: a new run, maybe a new buffer
                buffer = self.buffer
                if buffer is previous:  # the same buffer: until the new run has filled every slot
                    # once (ids are consecutive), a slot may still hold a higher id of the run before
                    self._newest_stale = image_id + self.layout.n_slots - 1
                    self._missed_stale = buffer.newest_id()
                self._gapless_since = image_id
            else:
                self.stats.add("gaps", image_id - last - 1)
                gap_from = last + 1
        elif last is None:
            self._gapless_since = image_id
        self._last_id = image_id
        run = buffer.held_run(image_id)
        if run == -1:
            if not self._replaced(image_id, last=last) or (run := self.buffer.held_run(image_id)) == -1:
                self._past(image_id)
                self.stats.add("lost")
                if self._kept_old:
                    self._lost_track()
                return None
            buffer = self.buffer  # re-created by its writer: every id complete in it is that writer's
            self._gapless_since = image_id
        elif gap_from is not None:
            gap_from = self._unstale(gap_from, last, image_id)
        if gap_from is not None:
            self._count_missed(buffer, gap_from, image_id, "below")
        if run is not None and self._same_channel:
            floor, above = self._run_floor, self._id_floor
            if run != (floor if image_id > above else floor + 1):  # _least_run, inline: the hot path
                if not self._replaced(image_id, last=last):
                    self._other_run(image_id, run)
                    return None
                buffer, run = self.buffer, self.buffer.held_run(image_id)  # re-created: check it there
                self._gapless_since = image_id
                if run == -1:
                    self._past(image_id)
                    self.stats.add("lost")
                    return None
                if run is not None and run != self._least_run(image_id):
                    self._other_run(image_id, run)
                    return None
            if run is not None:
                self._run_floor, self._id_floor = run, image_id
            self._stuck = 0
        else:
            run = None
        self.stats.processed(size or raw_bytes)
        if compressed:
            return Image(metadata, buffer.slot_bytes(image_id, size), buffer, run)
        return Image(metadata, buffer.slot_array(image_id, (height, width), dtype), buffer, run)

    def _past(self, image_id: int) -> None:
        """Move the run floor past a message not taken (module docstring): of ``_least_run`` or later."""
        self._run_floor, self._id_floor = self._least_run(image_id), image_id

    def _other_run(self, image_id: int, run: int) -> None:
        """The slot of ``image_id`` holds that id complete, but stamped with another run than this
        message's: counted lost. Another run there with nothing else queued, twice with no image
        taken in between, means this reader lost track of the runs (it missed messages over a change
        of run: only a full queue drops them): it takes a new floor. (Once may be a run of one
        image, the next run's first message still on its way.)"""
        least = self._least_run(image_id)
        self._past(image_id)
        self.stats.add("lost")
        empty = self._lost_track()
        if empty is None:
            why = ("this reader cannot tell its run any more (it missed messages while its queue was full): "
                   "reconnected")
        elif empty:
            why = "the next run of its writer took the slot, or this reader missed a change of run"
        elif run > least:
            why = "a later run of its writer took the slot before this reader got to it"
        else:
            why = "being written again, or the buffer's writer does not stamp runs as this reader expects"
        self.stats.warn("lost", log, "%s: image %d: its slot in /dev/shm/%s holds image %d of run %d, not of the "
                        "run this message is of (%d or later): counted lost; %s", self.address, image_id,
                        self.layout.name, image_id, run, least, why)

    def _lost_track(self) -> bool | None:
        """After a message lost to another run in its slot, or kept for a gone writer that may have
        sent it: with nothing else queued, twice with no image taken in between, this reader has
        lost track of the runs and re-subscribes (None then); else whether nothing was queued."""
        empty = self.socket is not None and not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
        self._stuck += empty
        if self._stuck < 2:
            return empty
        self._stuck = 0
        self._resubscribe()
        return None

    def _resubscribe(self) -> None:
        """A new SUB socket, and the floor read before it connects from the header of the buffer
        under the channel's name now (re-mapped if its writer re-created it): every message that
        reaches the new socket was sent after that. The last id stays: what is sent while it
        connects makes a gap (and, complete in the buffer, counts missed)."""
        if _inode(self.layout.name) != self._buffer_inode:
            with contextlib.suppress(BusError, OSError):
                self._attach()
        sent = self.buffer.sent_last() if self.buffer is not None else None
        old, self.socket = self.socket, None
        old.close(0)
        if sent is not None:
            self._run_floor, self._id_floor = sent[0], sent[1] - 1
        self._connect_socket()

    def _unstale(self, first: int, last: int, image_id: int) -> int:
        """The first id of the gap ``first`` .. ``image_id - 1`` that cannot be an earlier run's
        leftover (see ``_missed_stale``); the gap ends a stretch of consecutive ids at ``last``."""
        since, self._gapless_since = self._gapless_since, image_id
        if since is not None and last - since + 1 >= self.layout.n_slots:
            self._missed_stale = -1  # a ring's worth of consecutive ids rewrote every slot
        return max(first, self._missed_stale + 1)

    def _count_missed(self, buffer: RamBuffer, first: int, stop: int, where: str) -> None:
        """Of the ids ``first`` .. ``stop - 1`` this reader never got, count those the buffer
        holds complete: made and published, and lost here (gaps alone cannot tell, ids may step).
        ``where``: "below" the id that came after them, or "after" the last one of a replaced buffer."""
        if not self._same_channel:  # behind a filter that republishes some images, skipped ids are normal
            return
        missed = buffer.count_complete(first, stop)
        if missed:
            self.stats.add("missed", missed)
            self.stats.warn("missed", log, "%s: %d image(s) %s %d are complete in /dev/shm/%s but their metadata "
                            "never reached this reader (its connection was down, its queue full, or its writer was "
                            "killed before it sent them): counted missed", self.address, missed, where,
                            stop if where == "below" else first - 1, self.layout.name)


def _inode(name: str) -> int | None:
    try:
        return os.stat(f"/dev/shm/{name}").st_ino
    except FileNotFoundError:
        return None
