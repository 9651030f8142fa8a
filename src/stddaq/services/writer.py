"""std_det_writer: one HDF5 writer process of a recording, driven by ``std_det_driver`` (SPEC 8).

``std_det_writer detector.json WRITER_ID [-s SUFFIX]``: image writer ``WRITER_ID`` (exits 0 at
once when ``WRITER_ID >= number_of_writers``, as upstream); it reads images of the RAM buffer
``<det>-<SUFFIX>``. ``std_det_writer detector.json meta``: the metadata writer (the driver's
``-m``), which writes every image's ImageMetadata to ``<prefix>Meta.h5`` and reads no pixels.

Sockets (as upstream): PULL connects to ``ipc:///tmp/<det>-driver-<i>`` (the driver binds PUSH
there), PUSH binds ``ipc:///tmp/<det>-writer-<i>`` (the driver connects PULL); ``<i>`` is the
writer id or ``meta``.

Answers, so that requests and responses never get out of step:
- ``create_file``: one WriterResponse, SUCCESS or FAILURE with the reason (directory missing or
  not writable, disk full, cannot switch user). An open file is closed first.
- ``record_image``: no answer (as upstream). The image is read from its slot and appended; one
  that was overwritten in the RAM buffer before it was read, or could not be written (disk full,
  no file open, wrong shape), is never written as good: it is counted and its reason is kept.
- ``confirm_last_image``: one answer once everything received before it is written and flushed
  (visible to SWMR readers): SUCCESS, or FAILURE naming the images lost since the last answer.
  A driver sends it now and then while recording to learn of a full disk early.
- ``close_file``: one answer after the file is closed and trimmed (SUCCESS with no file open).
- a message that is no WriterAction: FAILURE at once. A bad command never ends the writer.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zmq
from google.protobuf.message import DecodeError
from zmq.utils.monitor import recv_monitor_message

from stddaq.bus.ram_buffer import BufferLayout, RamBuffer
from stddaq.bus.sockets import bind, unlink_ipc
from stddaq.config import DetectorConfig
from stddaq.errors import BufferMissingError, BusError, StorageError, UsageError, WriteFailed
from stddaq.formats import compression as codecs
from stddaq.protocol import (
    DTYPE_TO_NUMPY,
    ImageMetadata,
    ImageMetadataStatus,
    ResponseCode,
    WriterAction,
    WriterResponse,
)
from stddaq.services.base import ArgumentParser, Service, ascii_int, die_with_supervisor, service_main
from stddaq.services.driver_control import groups_of
from stddaq.storage.hdf5 import BITSHUFFLE_LZ4, BLOSC2, NONE, ImageFile, MetadataFile

log = logging.getLogger(__name__)

META = "meta"
#: suffix of the source channel -> compression of the file written from it
SUFFIX_COMPRESSION = {"h5bitshuffle-lz4": BITSHUFFLE_LZ4, "blosc2": BLOSC2}
_COMPRESSION_NAMES = {NONE: "not compressed", BITSHUFFLE_LZ4: "h5bitshuffle_lz4", BLOSC2: "blosc2"}
GOOD = int(ImageMetadataStatus.good_image)
#: messages handled per step before the loop looks at its stop flag and stats again
BATCH = 1000
MAX_REASONS = 5
#: seconds an answer waits for a driver to connect before it is dropped (and logged)
ANSWER_TIMEOUT = 5.0
WRITER_COUNTERS = ("lost", "failed", "invalid", "files")


class Writer(Service):
    """Writer ``writer_index`` (an int, or ``"meta"`` for the metadata writer)."""

    name = "std_det_writer"

    def __init__(self, config: DetectorConfig, writer_index: int | str, *, suffix: str = "image", **kw) -> None:
        super().__init__(config, **kw)
        self.writer_index = writer_index
        self.is_meta = writer_index == META
        self.suffix = suffix
        self.compression = SUFFIX_COMPRESSION.get(suffix, NONE)
        self.layout = BufferLayout.of(config, suffix)
        self.command_address = config.ipc_address(f"driver-{writer_index}")
        self.response_address = config.ipc_address(f"writer-{writer_index}")
        self.counters.declare(*WRITER_COUNTERS)
        self.file: ImageFile | MetadataFile | None = None
        self.buffer: RamBuffer | None = None
        self._buffer_inode: int | None = None
        #: (buffer, run) the open file records when its driver does not say each image's run (a C++
        #: driver): a recording is one run of the ring's writer (the driver ends one whose ids go
        #: back), taken from the slot of its first image in that buffer (see _run_of)
        self._file_run: tuple[RamBuffer, int] | None = None
        self._pull: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None  # the command socket's disconnect events
        self._push: zmq.Socket | None = None
        self._bound = False
        self._action = WriterAction()
        self._pending: list[str] = []   # reasons of images lost since the last answer
        self._n_pending = 0
        self._switched: tuple[int, tuple[int, list[int]]] | None = None  # (uid, saved egid and groups)

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        # the answer socket first: binding it fails while another writer of this id runs, and it
        # must fail before this one connects for commands, or the driver's PUSH would hand some of
        # its images to this writer, which then exits with them (they would be in no file)
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.setsockopt(zmq.SNDHWM, 1000)
        # an answer waits for the driver to (re)connect rather than being dropped, within reason
        push.setsockopt(zmq.SNDTIMEO, int(ANSWER_TIMEOUT * 1000))
        self._push = push
        self.endpoints = {"commands": self.command_address,
                          "responses": bind(push, self.response_address, "the writer response socket")}
        self._bound = True
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 0)  # never drop a command: the driver's PUSH blocks instead
        pull.connect(self.command_address)
        self._pull = pull
        self._monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        log.info("writer %s of %s: commands from %s, answers on %s%s", self.writer_index, self.config.detector_name,
                 self.command_address, self.response_address,
                 "" if self.is_meta else f", images from /dev/shm/{self.layout.name}")

    def _step(self) -> bool:
        pull = self._pull
        if not pull.poll(100):
            self._driver_gone()
            return True
        for _ in range(BATCH):
            try:
                frame = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.handle(frame)
            if self._stop.is_set():
                break
        return True

    def _driver_gone(self) -> None:
        """Close the open file when the driver went away (checked once no command waits): a
        driver killed mid-run never sends close_file, and its restart knows nothing of the run,
        so the file stayed open for writing, unreadable without SWMR, until the next run."""
        monitor = self._monitor
        gone = False
        while monitor is not None and monitor.poll(0):
            gone |= recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        if gone and self.file is not None:
            log.warning("writer %s: the driver went away during a run; closing %s", self.writer_index, self.file.path)
            try:
                self._close_file()
            except StorageError as exc:
                log.error("%s", exc)

    def _close(self) -> None:
        """Close the file (as well as it can be), then the sockets whatever happened (an open
        socket would hang the context's term() for ever)."""
        try:
            if self.file is not None:
                self._close_file()
        except Exception as exc:  # noqa: BLE001 - reported; the sockets must still go
            log.error("closing the file: %s", exc)
        finally:
            if self._monitor is not None:
                self._pull.disable_monitor()
                self._monitor.close(0)
                self._monitor = None
            for sock in (self._pull, self._push):
                if sock is not None:
                    sock.close(0)
            self._pull = self._push = None
            if self._bound:
                unlink_ipc(self.response_address)
                self._bound = False
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    # ------------------------------------------------------------------ commands
    def handle(self, frame: bytes) -> None:
        """One WriterAction message (see the module docstring for what is answered)."""
        action = self._action
        try:
            action.ParseFromString(frame)
            kind = action.WhichOneof("action")
        except DecodeError as exc:
            kind = None
            why = f"not a WriterAction ({len(frame)} bytes: {exc})"
        else:
            why = f"not a WriterAction: no action set ({len(frame)} bytes)"
        if kind == "record_image":
            self._record(action.record_image.image_metadata, action.record_image.run)
        elif kind == "create_file":
            self._answer(*self._create(action.create_file.path, action.create_file.writer_id))
        elif kind == "confirm_last_image":
            self._answer(*self._confirm())
        elif kind == "close_file":
            self._answer(*self._close_command())
        else:
            self.counters.add("invalid")
            self.last_error = why
            self.counters.warn("invalid", log, "writer %s: %s", self.writer_index, why)
            self._answer(False, why)

    def _answer(self, ok: bool, reason: str = "") -> None:
        response = WriterResponse(code=ResponseCode.SUCCESS if ok else ResponseCode.FAILURE, reason=reason)
        try:
            self._push.send(response.SerializeToString())
        except zmq.Again:
            log.warning("writer %s: no driver took the answer within %g s; dropped: %s", self.writer_index,
                        ANSWER_TIMEOUT, reason or "SUCCESS")

    def _lost(self, image_id: int, reason: str, counter: str = "failed") -> None:
        self.counters.add(counter)
        self._n_pending += 1
        if len(self._pending) < MAX_REASONS:
            self._pending.append(f"image {image_id}: {reason}")
        self.last_error = f"image {image_id}: {reason}"
        self.counters.warn(counter, log, "writer %s: image %d not written: %s", self.writer_index, image_id, reason)

    def _dropped(self, image_id: int, reason: str) -> None:
        """An image the file took without copying and found overwritten before writing it."""
        self._lost(image_id, reason, "lost")

    def _failure(self, reason: str) -> None:
        """A failure of the file itself (flush, close), reported with the next answer."""
        self.counters.add("failed")
        self._pending.append(reason)
        self.last_error = reason
        log.error("writer %s: %s", self.writer_index, reason)

    def _write_failed(self, exc: WriteFailed) -> None:
        """Images the file accepted but could not write (a whole chunk, maybe): one reason for all."""
        n = max(1, len(exc.image_ids))
        self.counters.add("failed", n)
        self._n_pending += n
        if len(self._pending) < MAX_REASONS:
            self._pending.append(str(exc))
        self.last_error = str(exc)
        log.error("writer %s: %s", self.writer_index, exc)

    def _take_pending(self) -> str:
        if not self._pending:
            return ""
        text = "; ".join(self._pending)
        if self._n_pending:
            text = f"{self._n_pending} image(s) not written since the last answer: {text}"
        self._pending, self._n_pending = [], 0
        return text

    def _create(self, path_text: str, user_id: int) -> tuple[bool, str]:
        previous = ""
        if self.file is not None:
            try:
                self._close_file()
            except StorageError as exc:
                previous = f"; closing the previous file: {exc}"
        self._take_pending()  # a new file starts a new account
        self._file_run = None
        if not path_text:
            return False, "create_file without a path"
        path = Path(path_text)
        if not path.is_absolute():
            return False, f"create_file path {path_text!r} is not absolute"
        if not self.is_meta:
            try:  # mapped while still root: the switched user may not be allowed to read the ring
                self._source()
            except BufferMissingError:
                pass  # not there yet: mapped with the first image
            except (BusError, OSError) as exc:
                log.warning("writer %s: %s", self.writer_index, exc)
        try:
            self._switch_user(user_id)
            if self.is_meta:
                self.file = MetadataFile.create(path, self.config.detector_name, self.config.detector_type)
            else:
                self.file = ImageFile.create(path, self.config.detector_name, self.config.shape, self.config.dtype,
                                             self.compression, self.config.gpfs_block_size)
                self.file.on_dropped = self._dropped
        except StorageError as exc:
            self._restore_user()
            return False, str(exc) + previous
        self.counters.add("files")
        log.info("writer %s: recording into %s", self.writer_index, path)
        return True, previous.lstrip("; ")

    def _switch_user(self, user_id: int) -> None:
        """As upstream: with switch_user_active the file is written as ``user_id`` (0 = as is).

        With the user's groups and primary group too (a uid without a passwd entry: no groups,
        the group kept): the driver's pre-flight judges a directory by them, and only the uid
        would leave root's groups, so a directory the user may write through a group failed."""
        if not self.config.switch_user_active or user_id <= 0 or user_id == os.geteuid():
            return
        saved = (os.getegid(), os.getgroups())
        try:
            entry = pwd.getpwuid(user_id)
        except KeyError:
            entry = None
        try:
            os.setgroups(sorted(groups_of(user_id)))
            if entry is not None:
                os.setegid(entry.pw_gid)
            _set_euid(user_id)
        except OSError as exc:
            self._restore_groups(saved)
            raise StorageError(f"cannot write as user id {user_id}: {exc.strerror}") from None
        self._switched = (user_id, saved)

    def _restore_user(self) -> None:
        if self._switched is not None:
            _set_euid(0)
            self._restore_groups(self._switched[1])
            self._switched = None

    @staticmethod
    def _restore_groups(saved: tuple[int, list[int]]) -> None:
        os.setegid(saved[0])
        os.setgroups(saved[1])
        die_with_supervisor()

    def _confirm(self) -> tuple[bool, str]:
        if self.file is not None:
            try:
                self.file.flush()
            except WriteFailed as exc:
                self._write_failed(exc)
            except StorageError as exc:
                self._failure(str(exc))
        reason = self._take_pending()
        return not reason, reason

    def _close_command(self) -> tuple[bool, str]:
        if self.file is None:
            reason = self._take_pending()
            return not reason, reason
        try:
            self._close_file()
        except StorageError as exc:
            self._failure(str(exc))
        reason = self._take_pending()
        return not reason, reason

    def _close_file(self) -> None:
        file, self.file = self.file, None
        try:
            file.close()
            log.info("writer %s: closed %s with %d images", self.writer_index, file.path, file.count)
        except WriteFailed as exc:
            self._write_failed(exc)
        finally:
            self._restore_user()

    # ------------------------------------------------------------------ images
    def _record(self, metadata: ImageMetadata, run: int = 0) -> None:
        image_id = metadata.image_id
        file = self.file
        if file is None:
            self._lost(image_id, "no file open (create_file first)")
            return
        try:
            if self.is_meta:
                file.append(metadata)
            else:
                self._append_image(file, metadata, run)
        except _Skip:
            return  # counted as lost already
        except WriteFailed as exc:
            self._write_failed(exc)
            return
        except (StorageError, BusError, codecs.CodecError, ValueError, TypeError, OverflowError, RuntimeError,
                OSError) as exc:
            # ValueError .. OverflowError: a metadata value the file cannot hold; RuntimeError: data h5py
            # or blosc2 refuses; OSError: a ring it may not map; the next image goes on
            self._lost(image_id, str(exc))
            return
        self.counters.processed(metadata.size)

    def _source(self) -> RamBuffer:
        """The RAM buffer, re-mapped when its writer re-created it (a restarted simulator)."""
        try:
            inode = os.stat(f"/dev/shm/{self.layout.name}").st_ino
        except FileNotFoundError:
            inode = None
        if self.buffer is None or (inode is not None and inode != self._buffer_inode):
            if self.buffer is not None:
                if isinstance(self.file, ImageFile):
                    self.file.release_borrowed()  # checked against the old buffer while it is still there
                self.buffer.close()
                self.buffer = None
            switched = self._switched
            if switched is not None:
                _set_euid(0)  # the ring is read as the writer's own user, the file written as the other
            try:
                self.buffer = RamBuffer.attach(self.layout, created_by=f"the service that writes {self.suffix!r}")
            finally:
                if switched is not None:
                    _set_euid(switched[0])
            self._buffer_inode = inode
        return self.buffer

    def _append_image(self, file: ImageFile, metadata: ImageMetadata, run: int = 0) -> None:
        image_id = metadata.image_id
        shape = (metadata.height, metadata.width)
        dtype = DTYPE_TO_NUMPY.get(metadata.dtype)
        if shape != file.shape or dtype != file.dtype:
            raise StorageError(f"image is {shape[0]}x{shape[1]} {dtype}, the file holds "
                               f"{file.shape[0]}x{file.shape[1]} {file.dtype} (config)")
        if metadata.size > self.layout.slot_n_bytes:
            raise StorageError(f"size {metadata.size} does not fit a slot of {self.layout.slot_n_bytes} bytes")
        if metadata.compression != file.compression and (metadata.status == GOOD or metadata.compression != NONE):
            # a good image of another compression than this channel's is another channel's metadata: its
            # slot here holds something else (a compressed blob read as pixels went into files as good)
            raise StorageError(f"it is {_COMPRESSION_NAMES.get(metadata.compression, metadata.compression)}, but "
                               f"this writer reads {self.layout.name}, whose good images are "
                               f"{_COMPRESSION_NAMES[file.compression]}: the driver and the writers must read the "
                               "same channel (their -s)")
        buffer = self.buffer if self.buffer is not None else self._source()
        if not buffer.holds(image_id):
            buffer = self._source()  # maybe a new buffer of a restarted source
            if not buffer.holds(image_id):
                self._lost(image_id, "not in the RAM buffer: overwritten before the writer read it "
                                     "(writer too slow or RAM buffer too small)", "lost")
                raise _Skip
        run = self._run_of(buffer, image_id, run)
        buffer.populate(image_id)  # its page faults now, not inside the file write later
        compressed = metadata.compression != NONE
        if compressed:
            data = buffer.slot_bytes(image_id, metadata.size)
        else:
            data = buffer.slot_array(image_id, shape, dtype)
        if file.compression != metadata.compression:
            # a bad image the compressor forwarded raw into a compressed channel: convert
            pixels = np.array(data)
            if not buffer.holds(image_id, run):
                self._lost(image_id, "overwritten in the RAM buffer while it was read", "lost")
                raise _Skip
            data = _encode(file.compression, pixels)
            intact = None
        else:
            def intact() -> bool:
                return buffer.holds(image_id, run)
        # a guarded buffer says when a slot is overwritten, so the file may write it later (zero copy)
        if not file.append(image_id, metadata.status, data, intact, borrowed=intact is not None and buffer.guarded,
                           address=buffer.slot_address(image_id)):
            self._lost(image_id, "overwritten in the RAM buffer while it was read", "lost")
            raise _Skip


    def _run_of(self, buffer: RamBuffer, image_id: int, told: int) -> int | None:
        """The run the slot of ``image_id`` must hold (None: the buffer has no run words); _Skip,
        counted lost, if it holds that id of another run: its source began its ids again, and
        this is the new run's image under the old one's metadata.

        ``told``: the image's run, as the driver's reader found it (RecordImage.run). 0 (a driver
        that does not say, a C++ one): the run of the file's first image in this buffer, as its
        slot holds it then (a writer more than a run behind at a file's first image cannot tell)."""
        run = buffer.slot_run(image_id)
        if run is None:
            return None
        if told:
            expected = told
        else:
            if self._file_run is None or self._file_run[0] is not buffer:
                self._file_run = (buffer, run) if run else None
            expected = self._file_run[1] if self._file_run else 0
        if not run or run != expected:
            self._lost(image_id, f"its slot in the RAM buffer holds image {image_id} of another run of its writer "
                                 f"({run or 'being written'}) than {'the driver read' if told else 'this file records'} "
                                 f"({expected or 'none yet'}): its source began its ids again before the writer read "
                                 "it", "lost")
            raise _Skip
        return run


def _set_euid(uid: int) -> None:
    """seteuid, and ask again to end with the supervisor (an effective uid change clears that)."""
    os.seteuid(uid)
    die_with_supervisor()


class _Skip(StorageError):
    """An image already counted as lost; nothing more to report."""


def _encode(compression: int, pixels: np.ndarray) -> np.ndarray | bytes:
    if compression == BITSHUFFLE_LZ4:
        return codecs.bitshuffle_lz4_encode(pixels)
    if compression == BLOSC2:
        return codecs.blosc2_encode(pixels)
    return pixels


def parse_writer_id(text: str) -> int | str:
    if text == META:
        return META
    try:
        value = ascii_int(text)
    except ValueError:
        raise UsageError(f"writer_id {text!r} is not allowed: an integer >= 0, or 'meta' for the metadata writer") from None
    if value < 0:
        raise UsageError(f"writer_id {value} is not allowed: must be >= 0 (or 'meta')")
    return value


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Write the images a std_det_driver sends into an HDF5 file.")
    parser.add_argument("detector_json_filename", help="path to the detector config file")
    parser.add_argument("writer_id", help="index of this writer (< number_of_writers), or 'meta' for the metadata writer")
    parser.add_argument("-s", "--source_suffix", default="image",
                        help="RAM buffer to read: image (raw), h5bitshuffle-lz4 or blosc2 (stored compressed)")
    return parser


class _Done(Service):
    """Stands in for a writer that is not needed: runs no loop."""

    name = "std_det_writer"

    def _start(self) -> None:
        pass

    def _step(self) -> bool:
        return False

    def _close(self) -> None:
        pass


def build(config: DetectorConfig, args) -> Service:
    writer_id = parse_writer_id(args.writer_id)
    if writer_id != META and writer_id >= config.number_of_writers:
        log.info("writer %d is not needed (number_of_writers = %d): exiting", writer_id, config.number_of_writers)
        return _Done(config)
    config.channel(args.source_suffix)  # a bad suffix is a usage error before any socket exists
    return Writer(config, writer_id, suffix=args.source_suffix)


def main(argv: Sequence[str] | None = None) -> int:
    return service_main("std_det_writer", build_parser(), build, argv)


if __name__ == "__main__":
    raise SystemExit(main())
