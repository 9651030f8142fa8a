"""RamBuffer: the shared-memory ring of image slots, and its overwrite guard (SPEC section 3).

Layout (compatible with the C++ std_daq): POSIX shm object ``<detector>-<suffix>``; image
``image_id`` lives at byte offset ``(image_id % n_slots) * slot_size``; the object is
``n_slots * slot_size`` rounded up to 2 MiB. One writer (the owner, who creates and unlinks the
object) and any number of readers.

The overwrite guard (beyond upstream) is a side-car shm object ``<channel>.seq`` of one uint64
per slot, a seqlock: before copying image ``id`` into its slot the writer stores ``2*id + 1``
(odd: being written), after the copy ``2*id + 2`` (even: complete). A reader that finds anything
but ``2*id + 2`` before or after it used the slot knows the slot no longer holds that image. The
main object stays byte-identical to upstream; a buffer made by a C++ writer simply has no
side-car, and readers then say once that they cannot detect overwrites.

After the per-slot words, the side-car holds the layout its writer made (``LAYOUT_MAGIC``, slot
bytes, slots, ``RUN_WORDS``). The main object is a whole number of 2 MiB, so its size alone does not tell a
reader whose config implies another slot size or count (a camera's ROI changed, the writer
restarted with the new config, a reader did not): it would read every image at the wrong offset
with the guard saying complete. ``attach`` compares the record with its own layout first.

The guard words hold ids, not runs: a writer that begins its ids again in the same ring (a new
acquisition) writes ``2*id + 2`` into a slot that held the same id of the run before. So after
the layout record come one uint64 per slot, the **run** whose image the slot holds (0 while it
is being written, stamped just before the image's metadata is sent), then two header words:
the writer's current run and 1 + the id it sent last. The writer's run goes up by one each
time an id it sends is not above the one it sent before; readers follow the same rule on the
message stream they get (see ImageSubscriber), so a reader still reading an earlier run's
metadata finds another run in the slot instead of the image it was told about. The fourth
word of the layout record says the run words are there (an older writer's buffer has 0).
"""

from __future__ import annotations

import _posixshmem
import fcntl
import logging
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

from stddaq.config import SHM_ALIGNMENT, DetectorConfig
from stddaq.errors import BufferLayoutError, BufferMissingError, BusError, ConfigError

log = logging.getLogger(__name__)

GUARD_SUFFIX = ".seq"
#: the first word of the layout record after the guard's per-slot words ("stddaqL1")
LAYOUT_MAGIC = int.from_bytes(b"stddaqL1", "little")
_LAYOUT_WORDS = 4  # magic, slot bytes, slots, RUN_WORDS
#: the layout record's fourth word in a buffer whose guard holds a run per slot and the run header
RUN_WORDS = 1
_HEADER_WORDS = 2  # the writer's current run, 1 + the id it sent last (0: none yet)
#: madvise advice (Linux 5.14); Python's mmap module has no name for it
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_BYTE = np.dtype(np.uint8)


def _guard_n_bytes(layout: BufferLayout) -> int:
    return _round_up(8 * (2 * layout.n_slots + _LAYOUT_WORDS + _HEADER_WORDS))


def _layout_problem(layout: BufferLayout, guard: mmap.mmap | None) -> str | None:
    """Why the buffer whose guard is ``guard`` was not made with ``layout`` (None: it was)."""
    mine = f"{layout.n_slots} slots of {layout.slot_n_bytes} bytes"
    if guard is None or len(guard) < 8 * (layout.n_slots + _LAYOUT_WORDS):
        return f"has an overwrite guard too small for this config's {mine}: made with fewer slots"
    magic, slot_n_bytes, n_slots, _ = (int(v) for v in np.frombuffer(guard, np.uint64, _LAYOUT_WORDS,
                                                                          8 * layout.n_slots))
    if magic != LAYOUT_MAGIC:
        return (f"was not made with this config's {mine} (its overwrite guard has no layout where this "
                f"config expects it: made with another number of slots, or by an older stddaq)")
    if (slot_n_bytes, n_slots) != (layout.slot_n_bytes, layout.n_slots):
        return f"was made with {n_slots} slots of {slot_n_bytes} bytes, this config implies {mine}"
    return None


def _round_up(n_bytes: int) -> int:
    return -(-n_bytes // SHM_ALIGNMENT) * SHM_ALIGNMENT


@dataclass(frozen=True)
class BufferLayout:
    """Where slots are: everything a reader needs to find image bytes in the shm object."""

    name: str
    slot_n_bytes: int
    n_slots: int

    @property
    def n_bytes(self) -> int:
        return _round_up(self.slot_n_bytes * self.n_slots)

    def slot(self, image_id: int) -> int:
        return image_id % self.n_slots

    def offset(self, image_id: int) -> int:
        return (image_id % self.n_slots) * self.slot_n_bytes

    @classmethod
    def of(cls, config: DetectorConfig, suffix: str) -> BufferLayout:
        return cls(config.channel(suffix), config.image_n_bytes, config.n_slots)


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _claim(name: str) -> int:
    """Create the slots object with 0 bytes (FileExistsError if the name is taken); returns its fd."""
    return _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o660)


def _abandoned(name: str) -> bool:
    """True if ``name`` is a stddaq buffer whose owner is gone (nobody holds its guard's lock), or a
    0-byte claim whose creator died before it made the guard."""
    try:
        fd = _posixshmem.shm_open("/" + name + GUARD_SUFFIX, os.O_RDWR, mode=0)
    except FileNotFoundError:
        try:
            return os.stat(f"/dev/shm/{name}").st_size == 0
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we got
    return True


def _open_shm(name: str, n_bytes: int, create: bool, writable: bool,
              also: int | None = None) -> tuple[mmap.mmap, int]:
    """The mapping and the object's inode (a re-created object has another one). An existing
    object may also be ``also`` bytes long (and is mapped at its size)."""
    flags = (os.O_CREAT | os.O_EXCL | os.O_RDWR) if create else (os.O_RDWR if writable else os.O_RDONLY)
    fd = _posixshmem.shm_open("/" + name, flags, mode=0o660)
    try:
        info = os.fstat(fd)
        if create:
            os.ftruncate(fd, n_bytes)
        else:
            actual = info.st_size
            if actual == 0:  # claimed by its writer, not sized yet (see RamBuffer.create)
                raise FileNotFoundError(name)
            if actual == also:
                n_bytes = also
            elif actual != n_bytes:
                raise BufferLayoutError(
                    f"shared memory /dev/shm/{name} has {actual} bytes but this config implies {n_bytes} "
                    f"(check image size, bit_depth, ram_buffer_gb/ram_buffer_slots against the service that created it)"
                )
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if (create or writable) else 0)
        return mmap.mmap(fd, n_bytes, mmap.MAP_SHARED, prot), info.st_ino
    finally:
        os.close(fd)


def shm_allocated(name: str) -> int:
    """Bytes of /dev/shm the object ``name`` takes now (0 if there is none): the pages written,
    not its size (a ring whose slots were never all written takes less)."""
    try:
        return os.stat(f"/dev/shm/{name}").st_blocks * 512
    except OSError:
        return 0


def check_shm_room(n_bytes: int, what: str, reclaimed: int = 0, hint: str | None = None) -> None:
    """ConfigError if /dev/shm cannot hold ``n_bytes`` of RAM buffers (``what``) now. A buffer's
    pages are taken only as slots are first written, so a buffer larger than the room left would
    be made, and its writer killed by SIGBUS (no message; restarted, again and again) once
    /dev/shm is full, taking every other buffer there down with it. ``reclaimed``: the size of
    the buffers these replace (a crashed writer's), counted free: their readers let them go once
    they follow: the pages they hold (``shm_allocated``), not their size. ``hint``: what to do
    (default: the config keys that size a ring)."""
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize + reclaimed
    if n_bytes > free:
        raise ConfigError(f"no room in /dev/shm for {what}: {_size(n_bytes)} needed, {_size(free)} free ({hint or 'lower ram_buffer_gb or ram_buffer_slots, or free /dev/shm'})")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


class RamBuffer:
    """A view of one channel's ring buffer. ``create()`` owns and unlinks; ``attach()`` reads."""

    def __init__(self, layout: BufferLayout, data: mmap.mmap, guard: mmap.mmap | None, owner: bool) -> None:
        self.layout = layout
        self._data_map = data
        self._guard_map = guard
        self.owner = owner
        self._closed = False
        self.data = np.frombuffer(data, dtype=np.uint8)
        self.sequence = np.frombuffer(guard, dtype=np.uint64, count=layout.n_slots) if guard is not None else None
        #: the run of the image each slot holds (0: being written), and the writer's header (see the
        #: module docstring); None in a buffer without them (unguarded, or an older stddaq's)
        self.runs: np.ndarray | None = None
        self._header: np.ndarray | None = None
        if guard is not None:
            after = 8 * (layout.n_slots + _LAYOUT_WORDS)
            if (int(np.frombuffer(guard, np.uint64, 1, after - 8)[0]) == RUN_WORDS
                    and len(guard) >= after + 8 * (layout.n_slots + _HEADER_WORDS)):
                self.runs = np.frombuffer(guard, np.uint64, layout.n_slots, after)
                self._header = np.frombuffer(guard, np.uint64, _HEADER_WORDS, after + 8 * layout.n_slots)
        # the same words for single reads and writes: a memoryview takes 10-30 ns, numpy 70-130
        self._seq = None if self.sequence is None else memoryview(self.sequence)
        self._run_words = None if self.runs is None else memoryview(self.runs)
        self._head = None if self._header is None else memoryview(self._header)
        self._n_slots = layout.n_slots
        self._address = self.data.ctypes.data
        self._views: dict[tuple, list[np.ndarray | None]] = {}
        self._lock_fd: int | None = None
        self._populated = np.zeros(layout.n_slots, dtype=bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, layout: BufferLayout) -> RamBuffer:
        """Create the slots and the guard; fails if a live writer already owns that name.

        The owner holds an flock on the guard object for its lifetime, so a buffer left behind by
        a writer that was killed (SIGKILL, crash) is recognised and replaced when the writer is
        restarted, while a live writer's buffer never is. A buffer without a guard was made by
        another program (a C++ service) and is never touched.
        """
        # Order matters to readers: claim the name (0 bytes: readers wait), make and lock the
        # guard, then size and map the slots. A reader that finds the slots sized always finds
        # the guard too, so it can never map a stddaq buffer without its overwrite guard.
        reclaimed = 0
        try:
            fd = _claim(layout.name)
        except FileExistsError:
            if not _abandoned(layout.name):
                raise BusError(
                    f"shared memory /dev/shm/{layout.name} already exists: another service writes this channel "
                    f"(or a non-stddaq program left it behind: remove it with rm /dev/shm/{layout.name})"
                ) from None
            log.warning("/dev/shm/%s was left behind by a writer that is gone; replacing it", layout.name)
            reclaimed = shm_allocated(layout.name)  # its pages stay taken while readers still map it
            for name in (layout.name, layout.name + GUARD_SUFFIX):
                _unlink(name)
            fd = _claim(layout.name)
        lock_fd = guard = None
        try:
            _unlink(layout.name + GUARD_SUFFIX)  # stale guard of a crashed owner
            guard, _ = _open_shm(layout.name + GUARD_SUFFIX, _guard_n_bytes(layout), create=True, writable=True)
            np.frombuffer(guard, np.uint64, _LAYOUT_WORDS, 8 * layout.n_slots)[:] = (
                LAYOUT_MAGIC, layout.slot_n_bytes, layout.n_slots, RUN_WORDS)
            lock_fd = _posixshmem.shm_open("/" + layout.name + GUARD_SUFFIX, os.O_RDWR, mode=0)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            check_shm_room(layout.n_bytes, f"the RAM buffer /dev/shm/{layout.name}", reclaimed)
            os.ftruncate(fd, layout.n_bytes)
            data = mmap.mmap(fd, layout.n_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if guard is not None:
                guard.close()
            if lock_fd is not None:
                os.close(lock_fd)
            for name in (layout.name, layout.name + GUARD_SUFFIX):
                _unlink(name)
            raise
        finally:
            os.close(fd)
        buffer = cls(layout, data, guard, owner=True)
        buffer._lock_fd = lock_fd
        buffer._header[:] = (1, 0)  # run 1, nothing sent yet
        return buffer

    @classmethod
    def attach(cls, layout: BufferLayout, *, created_by: str = "the service that writes this channel") -> RamBuffer:
        """Map an existing buffer read-only; the errors say which object and who creates it.

        The slots and the guard are two objects, opened one after the other: if the slots'
        name no longer leads to the object mapped once the guard is open, their writer re-created
        the buffer in between, and the guard may be the new one's; BufferMissingError then (try
        again), never an old mapping under a new guard. (The writer makes the new guard only
        after unlinking the old slots, so slots still linked mean the guard is theirs.)
        """
        try:  # a C++ writer makes it exactly n_slots * slot_n_bytes long (ours round up to 2 MiB)
            data, inode = _open_shm(layout.name, layout.n_bytes, create=False, writable=False,
                                    also=layout.n_slots * layout.slot_n_bytes)
        except FileNotFoundError:
            raise BufferMissingError(
                f"shared memory /dev/shm/{layout.name} does not exist: start {created_by} first"
            ) from None
        guard = None
        try:
            fd = _posixshmem.shm_open("/" + layout.name + GUARD_SUFFIX, os.O_RDONLY, mode=0)
        except FileNotFoundError:
            log.info("%s has no overwrite guard (written by a C++ service?): overwritten slots cannot be detected",
                     layout.name)
        else:
            try:
                size = os.fstat(fd).st_size
                if size > 0:  # 0: its writer has claimed the name and not sized it yet
                    guard = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            problem = _layout_problem(layout, guard)
            if problem is not None:
                for m in (data, guard):
                    if m is not None:
                        m.close()
                raise BufferLayoutError(
                    f"shared memory /dev/shm/{layout.name} {problem} (check image size, bit_depth, "
                    f"ram_buffer_gb/ram_buffer_slots against the service that created it)")
        try:
            replaced = os.stat(f"/dev/shm/{layout.name}").st_ino != inode
        except FileNotFoundError:
            replaced = True
        if replaced:
            for m in (data, guard):
                if m is not None:
                    m.close()
            raise BufferMissingError(f"shared memory /dev/shm/{layout.name} is being re-created by its writer: "
                                     "try again")
        return cls(layout, data, guard, owner=False)

    def populate(self, image_id: int) -> None:
        """Map the pages of ``image_id``'s slot now, once per slot (MADV_POPULATE_READ, Linux >=
        5.14; else nothing).

        A reader that writes slots to a file otherwise takes the first pass's page faults inside
        the kernel's write path, where they cost far more (measured: a 1.2 GB pass of pwrite from a
        fresh mapping 0.5-1.5 GB/s, from a populated one 2-3 GB/s). Slot by slot, not the whole
        object at once: populating a slot the writer has not written yet would allocate its
        memory (measured: a 2 GiB ring never written took 2 GiB of RAM when populated whole).
        """
        slot = image_id % self.layout.n_slots
        if self._populated[slot]:
            return
        self._populated[slot] = True
        start = self.layout.offset(image_id)
        aligned = start - start % mmap.PAGESIZE
        try:
            self._data_map.madvise(MADV_POPULATE_READ, aligned, start + self.layout.slot_n_bytes - aligned)
        except (OSError, ValueError):
            pass

    @staticmethod
    def exists(name: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(f"/dev/shm/{name}").st_mode)
        except FileNotFoundError:
            return False

    # ------------------------------------------------------------------ slots
    def slot_bytes(self, image_id: int, n_bytes: int | None = None) -> np.ndarray:
        """uint8 view of the slot of ``image_id`` (its first ``n_bytes``), no copy."""
        whole = self.slot_array(image_id, (1, self.layout.slot_n_bytes), _BYTE)[0]
        return whole if n_bytes is None else whole[:n_bytes]

    def slot_address(self, image_id: int) -> int:
        """Memory address of the slot of ``image_id``, for C calls (numpy takes about 2 us to tell
        an array's). Valid while this buffer is open."""
        return self._address + (image_id % self.layout.n_slots) * self.layout.slot_n_bytes

    def slot_array(self, image_id: int, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """The slot of ``image_id`` as an array of ``shape``/``dtype``, no copy.

        Views are made once per slot and shape and then reused: making a numpy view costs about
        a microsecond, which at 100k images/s is a tenth of the budget.
        """
        key = (shape, dtype)
        views = self._views.get(key)
        if views is None:
            dtype = np.dtype(dtype)
            if shape[0] * shape[1] * dtype.itemsize > self.layout.slot_n_bytes:
                raise BufferLayoutError(f"image {shape} {dtype} does not fit a slot of {self.layout.slot_n_bytes} bytes")
            if len(self._views) > 16:
                self._views.clear()
            views = self._views[key] = [None] * self.layout.n_slots
        slot = image_id % self.layout.n_slots
        view = views[slot]
        if view is None:
            view = views[slot] = np.ndarray(shape, dtype, buffer=self.data, offset=slot * self.layout.slot_n_bytes)
        return view

    # ------------------------------------------------------------------ guard
    def begin_write(self, image_id: int) -> None:
        if self._seq is not None:
            slot = image_id % self._n_slots
            self._seq[slot] = 2 * image_id + 1
            if self._run_words is not None:
                self._run_words[slot] = 0

    def end_write(self, image_id: int) -> None:
        if self._seq is not None:
            self._seq[image_id % self._n_slots] = 2 * image_id + 2

    def stamp(self, image_id: int, run: int) -> None:
        """Just before the metadata of ``image_id`` is sent: its slot holds run ``run``'s image, and
        the header says it was the last sent (the id first, then the run: a reader that reads the
        run, the id, the run again never pairs an earlier run with a later run's id it could trust)."""
        if self._run_words is not None:
            self._run_words[image_id % self._n_slots] = run
            header = self._head
            header[1] = image_id + 1
            header[0] = run

    def sent_last(self) -> tuple[int, int] | None:
        """(the writer's current run, the id it sent last, -1: none yet) read consistently; None
        without run words."""
        header = self._head
        if header is None:
            return None
        while True:
            run, last = header[0], header[1] - 1
            if header[0] == run:
                return run, last

    def slot_run(self, image_id: int) -> int | None:
        """The run stamped on ``image_id``'s slot (0: being written or not sent yet); None without run words."""
        return None if self._run_words is None else self._run_words[image_id % self._n_slots]

    @property
    def guarded(self) -> bool:
        return self.sequence is not None

    def holds(self, image_id: int, run: int | None = None) -> bool:
        """True while the slot still holds image ``image_id`` complete (always True unguarded;
        False once closed: a view kept from before cannot be vouched for any more); with ``run``,
        also that it is that run's image (where the buffer has run words)."""
        held = self.held_run(image_id)
        return held != -1 and (run is None or held is None or held == run)

    def overtaken_within(self, image_id: int, margin: int, newest_stale: int = -1) -> bool:
        """True when the writer has already begun an image ``n_slots - margin`` or more ids after
        ``image_id``: the slot of ``image_id`` is then overwritten within ``margin`` images, so a
        reader that is this far behind should give the image up rather than start slow work on
        it (work that would be thrown away makes it fall further behind). False unguarded.

        The guard holds ids, not runs: after the writer's ids went back (a new acquisition into
        the same buffer), slots still hold higher ids of the run before, which would look like a
        writer far ahead. ``newest_stale`` is the highest id that may be such a leftover (see
        ``newest_id``): ids up to it prove nothing, and then this says False."""
        if self.sequence is None:
            return False
        n_slots = self.layout.n_slots
        ahead = image_id + n_slots - margin
        if ahead <= newest_stale:
            return False
        there = (int(self.sequence[ahead % n_slots]) - 1) // 2  # the id begun in that slot last
        if ahead <= there < image_id + n_slots:
            return True
        # a higher id there is a leftover of an earlier run (that slot's id of the new run never
        # came), or the writer is a ring ahead: then the image's own slot is overwritten already
        return int(self.sequence[image_id % n_slots]) != 2 * image_id + 2

    def held_run(self, image_id: int) -> int | None:
        """``holds`` and ``slot_run`` in one (a reader's hot path): -1 if the slot does not hold
        ``image_id`` complete, else its run (0: not stamped yet), None without run words."""
        seq = self._seq
        if seq is None:
            return None if not self._closed else -1
        slot = image_id % self._n_slots
        if seq[slot] != 2 * image_id + 2:  # the sequence word first: a rewrite of the same id in
            return -1  # another run ends with it again, and clears the run word before that
        return None if self._run_words is None else self._run_words[slot]

    def count_complete(self, first: int, stop: int) -> int:
        """How many of the ids ``first`` .. ``stop - 1`` their slots hold complete now (0 unguarded);
        only the last ``n_slots`` of them can be. A reader that never got the metadata of such an
        id missed an image its writer made and published."""
        if self.sequence is None:
            return 0
        n_slots = self.layout.n_slots
        first = max(first, stop - n_slots, 0)
        if stop <= first:
            return 0
        if stop - first <= 16:  # ids that step make a small gap at every image: numpy's set-up costs more
            sequence = self.sequence
            return sum(1 for k in range(first, stop) if sequence[k % n_slots] == 2 * k + 2)
        ids = np.arange(first, stop, dtype=np.uint64)
        return int(np.count_nonzero(self.sequence[ids % np.uint64(n_slots)] == ids * np.uint64(2) + np.uint64(2)))

    def newest_id(self) -> int:
        """The highest image id whose writing has begun in any slot (-1: none, or unguarded)."""
        if self.sequence is None:
            return -1
        return (int(self.sequence.max()) - 1) // 2

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Unmap; the owner also unlinks both objects. Slot views still held elsewhere keep the
        mapping alive until they go (they are made on ``self.data``, which holds the mmap's buffer:
        a view made on the mmap itself does not, and reading it after close was a SIGSEGV)."""
        if self._closed:
            return
        self._closed = True
        for words in (self._seq, self._run_words, self._head):
            if words is not None:
                words.release()
        self._seq = self._run_words = self._head = None
        self.data = self.sequence = self.runs = self._header = None  # type: ignore[assignment]
        self._views.clear()
        for m in (self._data_map, self._guard_map):
            if m is not None:
                try:
                    m.close()
                except BufferError:
                    log.debug("a numpy view of %s is still alive; the mapping goes with it", self.layout.name)
        if self.owner:
            for name in (self.layout.name, self.layout.name + GUARD_SUFFIX):
                _unlink(name)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RamBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
