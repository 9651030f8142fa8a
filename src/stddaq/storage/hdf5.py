"""The HDF5 files of a recording (SPEC section 8): one raw file per writer, a Meta file, a master.

- ``ImageFile``: ``/<det>/data`` (N, H, W) in the image dtype and ``/<det>/metadata`` compound
  (image_id u64, status u64), in recording order, readable while written (SWMR).
  Raw images are gathered into chunks of several images up to ``gpfs_block_size`` and each chunk
  is written whole with a direct chunk write (no HDF5 chunk cache, no type conversion); the last
  chunk is written partly filled by ``flush()``/``close()`` and rewritten in place when it fills.
  Compressed images (filter 32008 bitshuffle-lz4 or 32026 blosc2) are one chunk each, written
  as they are, so plain h5py + hdf5plugin decodes them.
- ``MetadataFile``: ``<prefix>Meta.h5``, every field of every image's ImageMetadata, the
  detector-specific ones (gf/jf/eg/pco, chosen by the detector type) included.
- ``write_master``: ``<prefix>_master.h5``, a virtual dataset over all raw files in image_id
  order (relative source paths, so the folder can be moved) plus the merged metadata.

Alignment: H5Pset_alignment to the GPFS block size would make a file of small compressed
chunks hundreds of times too big, and even for raw chunks of about a block it leaves a hole of up
to a block after the file header. So only raw chunks are aligned, to a power of two <= min(block
size, 1 MiB): the largest that divides the chunk size (480x128 images: 64 KiB; 2016x2016: 4 KiB),
so that chunks follow one another with no padding between them. Writing with a padding hole after
every chunk measured 5-10% slower on ext4 here (h5py, same chunks, 20 interleaved runs: 2016x2016
best 4.36 against 4.81 GB/s without holes, 480x128 4.45 against 4.70). A chunk size that is not a
multiple of a page gets the largest alignment that wastes at most 0.5% per chunk. Chunk starts
stay on page (and where possible GPFS sub-block) boundaries, and a file is at most 1% plus one
partly filled chunk above its image bytes (tested). Compressed chunks and metadata are never aligned.

Disk full: before writing, a file checks that the bytes it is about to write fit the free space
of its file system (and the process' RLIMIT_FSIZE) with a reserve for HDF5's own metadata, and
refuses with ``WriteFailed`` instead of writing; so a file stays closable and readable up to the
last image written. Writes that still fail (another process filled the disk) are reported the
same way. A failed file refuses further images; ``close()`` trims it to what is on disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from stddaq.errors import StorageError, WriteFailed
from stddaq.formats import compression as codecs
from stddaq.protocol import ImageMetadata, ImageMetadataCompression

log = logging.getLogger(__name__)

DEFAULT_GPFS_BLOCK_SIZE = 16 * 1024 * 1024
#: Bytes kept free for HDF5's own metadata (object headers, chunk index, superblock) so a file
#: whose disk is full can still be closed readable.
METADATA_RESERVE = 1024 * 1024
#: Re-read the free space after this many bytes at the latest (other writers share the disk).
FREE_SPACE_RECHECK = 256 * 1024 * 1024
#: Writers a file system is assumed shared by: one spends at most this fraction of the free space
#: it measured before measuring again, so up to this many (a run's N writers and its Meta
#: writer) never spend together more than there is, and each refuses a write cleanly (its file
#: closes readable) instead of HDF5 meeting ENOSPC inside (a file not even closable).
WRITERS_SHARING = 8
#: Metadata rows per chunk of the compound datasets (16 bytes a row in raw files).
METADATA_CHUNK_ROWS = 1024
#: Chunks are aligned to at most this (see the module docstring).
ALIGNMENT_CAP = 1024 * 1024
#: HDF5 file format bounds: SWMR needs >= v110; v110 files are readable by HDF5 1.10 and later.
LIBVER = ("v110", "v110")

NONE = int(ImageMetadataCompression.none)
BITSHUFFLE_LZ4 = int(ImageMetadataCompression.h5bitshuffle_lz4)
BLOSC2 = int(ImageMetadataCompression.blosc2)
COMPRESSIONS = {NONE: "none", BITSHUFFLE_LZ4: "h5bitshuffle_lz4", BLOSC2: "blosc2"}

RAW_METADATA_DTYPE = np.dtype([("image_id", "<u8"), ("status", "<u8")])


def _filter_options(compression: int) -> dict:
    if compression == BITSHUFFLE_LZ4:
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression == BLOSC2:
        return dict(hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.BITSHUFFLE))
    return {}


def chunk_images(image_n_bytes: int, gpfs_block_size: int) -> int:
    """Images per raw chunk: as many whole images as fit a GPFS block, at least one."""
    return max(1, gpfs_block_size // image_n_bytes)


def chunk_alignment(chunk_n_bytes: int, gpfs_block_size: int, max_waste: float = 0.005) -> int:
    """Where raw chunks start: a power of two <= min(block size, 1 MiB) (see the module docstring).

    The largest that divides the chunk size, if that is at least a page (4096): chunks then follow
    one another without padding. Else the largest whose padding wastes at most ``max_waste``.
    """
    cap = 1 << (max(min(gpfs_block_size, ALIGNMENT_CAP), 1).bit_length() - 1)
    dividing = min(cap, chunk_n_bytes & -chunk_n_bytes)
    if dividing >= 4096:
        return dividing
    alignment = cap
    while alignment > 4096:
        padding = -chunk_n_bytes % alignment
        if padding <= max_waste * chunk_n_bytes:
            return alignment
        alignment //= 2
    return 4096 if -chunk_n_bytes % 4096 <= max_waste * chunk_n_bytes else 1


def raw_chunk_layout(image_n_bytes: int, gpfs_block_size: int) -> tuple[int, dict[str, int]]:
    """Images per raw chunk, and the h5py.File alignment options of a raw file (see module docstring)."""
    per_chunk = chunk_images(image_n_bytes, gpfs_block_size)
    chunk_n_bytes = per_chunk * image_n_bytes
    alignment = chunk_alignment(chunk_n_bytes, gpfs_block_size)
    if alignment <= 1:
        return per_chunk, {}
    return per_chunk, {"alignment_threshold": chunk_n_bytes, "alignment_interval": alignment}


class blosc2_frame:  # noqa: N801 - used like a function
    """Wrap a Blosc2 chunk in the one-chunk super-chunk frame filter 32026 decodes, no recompression."""

    def __init__(self, typesize: int, n_bytes: int) -> None:
        import blosc2

        self._schunk = blosc2.SChunk(chunksize=n_bytes, contiguous=True, cparams={"typesize": typesize})
        self._empty = True

    def __call__(self, chunk: bytes) -> bytes:
        if self._empty:
            self._schunk.insert_chunk(0, chunk)
            self._empty = False
        else:
            self._schunk.update_chunk(0, chunk)
        return self._schunk.to_cframe()


def _describe_os_error(exc: BaseException, path: Path) -> str:
    """One line for an OSError from h5py, naming the disk-full case plainly."""
    err = getattr(exc, "errno", None)
    text = str(exc)
    if err == errno.ENOSPC or "No space left" in text:
        return f"disk full writing {path}: no space left on device"
    if err == errno.EFBIG or "File too large" in text:
        return f"file size limit reached writing {path}: file too large"
    return f"cannot write {path}: {text}"


#: At most this per file beyond its chunks and rows: superblock, object headers, the roots of its
#: indexes, free-space slack (files of a recording measured 10-60 KiB apart from those).
FILE_OVERHEAD = 256 * 1024
#: At most this per data chunk for its entry in the chunk index.
INDEX_BYTES_PER_CHUNK = 64
#: At most this per compressed chunk beyond its blob: the Blosc2 frame ImageFile puts around a
#: blosc2 chunk (172 bytes), and slack.
COMPRESSED_CHUNK_EXTRA = 512


def largest_blob(codec: str, pixels_n_bytes: int, itemsize: int, slot_n_bytes: int) -> int:
    """The most one compressed image of ``pixels_n_bytes`` can take: what a compression stage
    publishes (at most its slot, and at most the codec's worst case with any parameters a stage
    may be given: bitshuffle-lz4 blocks as small as 8 pixels) or what the writer compresses
    itself (a non-good raw image on a compressed channel, default parameters, no slot to cap
    it). ``codec``: "blosc2" or "h5bitshuffle_lz4". The slot is larger than the pixels on an
    8-bit GigaFRoST (2 bytes a pixel, as upstream sizes it): there small blocks on noise really
    give blobs up to the slot."""
    if codec == "blosc2":  # data it cannot compress is stored as it is, behind its header
        return pixels_n_bytes + codecs.BLOSC2_MAX_OVERHEAD
    by_stage = min(slot_n_bytes, codecs.bitshuffle_lz4_bound(pixels_n_bytes, 8 * itemsize))
    by_writer = codecs.bitshuffle_lz4_bound(pixels_n_bytes, codecs.default_block_elements(itemsize) * itemsize)
    return max(by_stage, by_writer)


def recording_bytes(n_images: int, image_n_bytes: int, *, n_writers: int, gpfs_block_size: int,
                    blob_n_bytes: int | None = None, detector_type: str | None = None) -> int:
    """At most the bytes a recording of ``n_images`` takes in its directory, for the driver's
    check before a start: the files of ``n_writers`` writers (the k-th image goes to writer
    k % n_writers; see ``_writer_file_bytes``), the Meta file when ``detector_type`` is given,
    the master (the merged rows), and the reserve each writer keeps free while it writes
    (``METADATA_RESERVE``, so that its file can be closed). ``image_n_bytes``: one image's pixels
    as the files hold them (height x width x the dtype's bytes; not the slot, which is larger
    for an 8-bit GigaFRoST). ``blob_n_bytes``: for a compressed source, the most one compressed
    image takes (``largest_blob``); None for a raw one.

    Images alone undercount: a start of images that just fit the free space was accepted and
    ended in disk full, its last images not written (with 16 MiB chunks of small images, a
    writer's last chunk alone is up to 16 MiB)."""
    if n_images <= 0:
        return 0
    base, extra = divmod(n_images, n_writers)
    total = sum(count * (_writer_file_bytes(images, image_n_bytes, gpfs_block_size, blob_n_bytes) + METADATA_RESERVE)
                for count, images in ((extra, base + 1), (n_writers - extra, base)))
    if detector_type is not None:
        total += _rows_bytes(n_images, metadata_dtype(detector_type).itemsize) + FILE_OVERHEAD + METADATA_RESERVE
    return total + _rows_bytes(n_images, RAW_METADATA_DTYPE.itemsize) + FILE_OVERHEAD  # the master


def _writer_file_bytes(n_images: int, image_n_bytes: int, gpfs_block_size: int, blob_n_bytes: int | None) -> int:
    """At most the bytes of one writer's file of ``n_images``: whole chunks (the last one is
    written whole even when partly filled) with their alignment padding and index entries, the
    metadata rows, and the holes alignment leaves: a data chunk that follows a small object HDF5
    put at the end of the file (a new block of its metadata or small-data aggregators, for the
    chunk indexes and the rows) starts at the next alignment boundary. How often that happens is
    HDF5's business; measured with 1 MiB alignment: about 1 hole per 160-270 data chunks, 1 per
    100 chunks of rows and a few as the indexes grow; bounded here by one per 64 data chunks, one
    per 16 chunks of rows and one per doubling of the data chunks, and by one per data chunk."""
    per_chunk, alignment = 1, 0
    if blob_n_bytes is not None:  # one compressed image a chunk
        chunk_bytes = blob_n_bytes + COMPRESSED_CHUNK_EXTRA
    else:
        per_chunk, options = raw_chunk_layout(image_n_bytes, gpfs_block_size)
        alignment = options.get("alignment_interval", 0)
        chunk_bytes = per_chunk * image_n_bytes
    n_chunks = -(-n_images // per_chunk)
    padding = -chunk_bytes % alignment if alignment else 0
    holes = alignment * min(n_chunks, -(-n_chunks // 64) + -(-n_images // (16 * METADATA_CHUNK_ROWS))
                            + n_chunks.bit_length() + 2)
    return (n_chunks * (chunk_bytes + padding + INDEX_BYTES_PER_CHUNK) + _rows_bytes(n_images, RAW_METADATA_DTYPE.itemsize)
            + holes + FILE_OVERHEAD)


def _rows_bytes(n_rows: int, itemsize: int) -> int:
    """Bytes of ``n_rows`` metadata rows in chunks of METADATA_CHUNK_ROWS (the last one whole)."""
    return -(-n_rows // METADATA_CHUNK_ROWS) * METADATA_CHUNK_ROWS * itemsize


class _SpaceGuard:
    """Refuses a write that would not fit the free space (or RLIMIT_FSIZE) with the reserve."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._budget = 0

    def _measure(self, file_size: int) -> int:
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            free = min(free, limit - file_size)
        return free - METADATA_RESERVE

    def check(self, n_bytes: int, file_size: int) -> None:
        if n_bytes > self._budget:
            available = self._measure(file_size)
            self._budget = min(available // WRITERS_SHARING, FREE_SPACE_RECHECK)
            if n_bytes > available:
                raise OSError(errno.ENOSPC, f"disk full: {max(available, 0) + METADATA_RESERVE} bytes free for "
                                            f"{self.path}, the next write needs {n_bytes} (+{METADATA_RESERVE} "
                                            f"kept for closing the file)")
        self._budget -= n_bytes


#: longest file name (one path component) in bytes on Linux file systems
_NAME_MAX = 255


def _check_directory(path: Path) -> None:
    directory = path.parent
    try:
        name_bytes = len(path.name.encode())
        if name_bytes > _NAME_MAX:
            raise StorageError(f"cannot create {path}: its name has {name_bytes} bytes, more than the "
                               f"{_NAME_MAX} a file name may have")
        if not directory.exists():
            raise StorageError(f"cannot create {path}: directory {directory} does not exist")
        if not directory.is_dir():
            raise StorageError(f"cannot create {path}: {directory} is not a directory")
    except OSError as exc:  # e.g. a directory name longer than the system allows
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        raise StorageError(f"cannot create {path}: directory {directory} is not writable by uid {os.geteuid()}")


@contextlib.contextmanager
def _laying_out(h5file: h5py.File, path: Path) -> Iterator[None]:
    """Datasets of a new file: on any failure the file is closed, HDF5 errors become StorageError."""
    try:
        yield
    except BaseException as exc:
        h5file.close()
        if isinstance(exc, (OSError, RuntimeError, ValueError)):
            raise StorageError(f"cannot create {path}: {_describe_os_error(exc, path)}") from None
        raise


def _create_h5(path: Path, **kw) -> h5py.File:
    _check_directory(path)
    free = _SpaceGuard(path)._measure(0)
    if free < 0:
        raise StorageError(f"cannot create {path}: disk full ({free + METADATA_RESERVE} bytes free, "
                           f"{METADATA_RESERVE} needed at least)")
    try:
        return h5py.File(path, "w", libver=LIBVER, **kw)
    except (OSError, RuntimeError, ValueError) as exc:
        raise StorageError(f"cannot create {path}: {_describe_os_error(exc, path)}") from None


class _Extent:
    """The first-axis length of an extensible dataset, kept here and set with ``H5Dset_extent``.

    h5py's ``shape`` and ``resize`` ask HDF5 for the dataspace on every call: 9 and 25 us, against
    3 us for ``set_extent`` alone. A compressed file grows its data by one image per image, a raw
    file its data and metadata once per chunk: that was most of the Python around each write.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._id = dataset.id
        self._rest = dataset.shape[1:]
        self.n = dataset.shape[0]

    def set(self, n: int) -> None:
        self._id.set_extent((n, *self._rest))
        self.n = n


class ImageFile:
    """One writer's raw file (see module docstring). Not thread-safe: one owner, one thread."""

    def __init__(self, h5file: h5py.File, path: Path, detector_name: str, shape: tuple[int, int],
                 dtype: np.dtype, compression: int, images_per_chunk: int, direct: bool) -> None:
        self.path = path
        self.detector_name = detector_name
        self.shape = shape
        self.dtype = dtype
        self.compression = compression
        self.images_per_chunk = images_per_chunk
        self.direct = direct
        self._file = h5file
        self._data = h5file[f"{detector_name}/data"]
        self._metadata = h5file[f"{detector_name}/metadata"]
        self._dsid = self._data.id
        self._data_extent = _Extent(self._data)
        self._metadata_extent = _Extent(self._metadata)
        self._image_n_bytes = shape[0] * shape[1] * dtype.itemsize
        self._guard = _SpaceGuard(path)
        self._count = 0          # images accepted (on disk or in the chunk being filled)
        self._written = 0        # images on disk and visible to readers
        self._rows = np.zeros(max(images_per_chunk, 64), RAW_METADATA_DTYPE)  # rows not yet on disk
        self._metadata_chunk = np.zeros(METADATA_CHUNK_ROWS, RAW_METADATA_DTYPE)  # the one being filled
        self._n_rows = 0
        self._chunk = np.zeros((images_per_chunk, *shape), dtype) if compression == NONE else None
        self._in_chunk = 0       # images in self._chunk
        self._chunk_on_disk = False  # the current chunk was written partly filled already
        # Borrowed run (zero copy): the images of the chunk being filled, not copied, while they sit
        # one after the other in one buffer (a run of RAM buffer slots): (view, id, status, intact).
        self._borrowed: list[tuple[np.ndarray, int, int, Callable[[], bool]]] = []
        self._next_address = 0  # where the next image of the borrowed run must start
        #: called with (image_id, reason) for an image append() accepted and that was dropped later
        #: (its borrowed slot was overwritten before its chunk was written); logged if None
        self.on_dropped: Callable[[int, str], None] | None = None
        self._frame = blosc2_frame(dtype.itemsize, self._image_n_bytes) if compression == BLOSC2 else None
        self.failure: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | Path, detector_name: str, shape: tuple[int, int], dtype: np.dtype | str,
               compression: int = NONE, gpfs_block_size: int = DEFAULT_GPFS_BLOCK_SIZE, *,
               direct: bool = True) -> ImageFile:
        """Create (truncate) ``path``; StorageError names why it cannot be created.

        ``direct=False`` writes raw chunks through ``H5Dwrite`` instead of direct chunk writes
        (kept for the benchmark that compares the two).
        """
        path = Path(path)
        dtype = np.dtype(dtype)
        shape = (int(shape[0]), int(shape[1]))
        if compression not in COMPRESSIONS:
            raise StorageError(f"compression {compression} is not allowed (allowed: 0 none, 1 h5bitshuffle_lz4, 2 blosc2)")
        image_n_bytes = shape[0] * shape[1] * dtype.itemsize
        per_chunk, kw = raw_chunk_layout(image_n_bytes, gpfs_block_size) if compression == NONE else (1, {})
        h5file = _create_h5(path, **kw)
        with _laying_out(h5file, path):
            group = h5file.create_group(detector_name)
            group.create_dataset("data", shape=(0, *shape), maxshape=(None, *shape), chunks=(per_chunk, *shape),
                                 dtype=dtype, **_filter_options(compression))
            group.create_dataset("metadata", shape=(0,), maxshape=(None,), chunks=(METADATA_CHUNK_ROWS,),
                                 dtype=RAW_METADATA_DTYPE)
            group.attrs["compression"] = COMPRESSIONS[compression]
            h5file.swmr_mode = True
        return cls(h5file, path, detector_name, shape, dtype, compression, per_chunk, direct)

    # ------------------------------------------------------------------ writing
    @property
    def count(self) -> int:
        """Images accepted so far (after a failure: images on disk)."""
        return self._count

    @property
    def written(self) -> int:
        """Images on disk and visible to SWMR readers."""
        return self._written

    def append(self, image_id: int, status: int, data: np.ndarray | bytes | memoryview,
               intact: Callable[[], bool] | None = None, *, borrowed: bool = False,
               address: int | None = None) -> bool:
        """Add one image; False (nothing added) if ``intact()`` says its source changed while read.

        ``data`` is the (H, W) pixel array for a raw file, the compressed blob for a compressed one
        (a raw blosc2 chunk: it is wrapped here). Raises WriteFailed (naming every image lost with
        it) when the file system refuses, StorageError when the file failed before.

        ``borrowed=True`` (with ``intact``): ``data`` is a view the caller keeps in place until
        ``intact()`` turns False (a slot of a guarded RAM buffer), so it need not be copied.
        Raw files: images that follow one another in that buffer are not copied: a whole chunk of
        them is written straight from the buffer, and ``intact()`` of each is checked before and
        after that write. An image found overwritten then is dropped from its chunk (never written
        as good) and reported through ``on_dropped``; the others are copied and kept. Copying a
        chunk costs about half as much CPU as writing it into the page cache, so without this a
        file cannot keep up with a raw write. Compressed files: a flat contiguous byte view is
        written from the slot, ``intact()`` checked before and after; an overwritten one is taken
        back (False).
        ``address``: where ``data`` starts, if the caller knows it (``RamBuffer.slot_address`` of
        the slot ``data`` views; numpy takes about 2 us to tell it). It must be exact: borrowed runs
        are written from consecutive addresses.
        """
        if self.failure is not None:
            raise StorageError(f"image {image_id} not written: {self.path} failed earlier ({self.failure})")
        if self._closed:
            raise StorageError(f"image {image_id} not written: {self.path} is closed")
        if self._chunk is not None:
            if borrowed and intact is not None and self.direct and self._borrow(image_id, status, data, intact,
                                                                                address):
                return True
            if self._borrowed:
                self._unborrow()
            return self._append_raw(image_id, status, data, intact)
        return self._append_compressed(image_id, status, data, intact, borrowed)

    # ------------------------------------------------------------------ borrowed (zero-copy) chunks
    def _borrow(self, image_id: int, status: int, data, intact: Callable[[], bool], address: int | None) -> bool:
        """Take ``data`` as the next image of a borrowed run; False if it cannot continue one."""
        if not (isinstance(data, np.ndarray) and data.shape == self.shape and data.dtype == self.dtype
                and data.flags.c_contiguous and data.base is not None):
            return False
        run = self._borrowed
        if address is None:
            address = data.ctypes.data
        if run:
            if data.base is not run[0][0].base or address != self._next_address:
                return False
        elif self._in_chunk:
            return False  # the chunk has copied images already: it stays a copied chunk
        if not intact():
            return False  # the copy path reports it as overwritten
        self._add_row(image_id, status)  # first: a row it refuses leaves the run as it was
        self._next_address = address + self._image_n_bytes
        run.append((data, image_id, status, intact))
        self._in_chunk += 1
        self._count += 1
        if self._in_chunk == self.images_per_chunk:
            self._write_borrowed()
        return True

    def _write_borrowed(self) -> None:
        """Write the full borrowed run as one chunk straight from its buffer (see append)."""
        run = self._borrowed

        def all_intact() -> bool:
            return all(intact() for _, _, _, intact in run)

        if all_intact():
            first = run[0][0]
            # one view over the run: same buffer, consecutive addresses (checked in _borrow)
            view = np.lib.stride_tricks.as_strided(first, shape=(len(run), *self.shape),
                                                   strides=(self._image_n_bytes, *first.strides))
            if self._write_chunk(view, all_intact):
                self._borrowed = []
                self._in_chunk = 0
                self._chunk_on_disk = False
                return
            self._chunk_on_disk = True  # its place is taken: the copied chunk is written there
        self._unborrow()

    def release_borrowed(self) -> None:
        """Copy the borrowed images now (those still intact; the others are dropped and reported):
        for a caller about to let go of the buffer they are in."""
        if self._borrowed:
            self._unborrow()

    def _unborrow(self) -> None:
        """Turn the borrowed run into a copied chunk: copy each image that is still intact after
        its copy, drop (and report) the others."""
        run, self._borrowed = self._borrowed, []
        n = len(run)
        self._n_rows -= n  # the run's rows are the last ones, none on disk
        self._count -= n
        self._in_chunk -= n
        for view, image_id, status, intact in run:
            np.copyto(self._chunk[self._in_chunk], view, casting="no")
            if not intact():
                self._dropped(image_id, "overwritten in the RAM buffer before its chunk was written")
                continue
            self._add_copied(image_id, status)

    def _add_copied(self, image_id: int, status: int) -> None:
        """Count the image just copied into the chunk; write the chunk when it is full."""
        self._add_row(image_id, status)
        self._in_chunk += 1
        self._count += 1
        if self._in_chunk == self.images_per_chunk:
            self._write_chunk()
            self._in_chunk = 0
            self._chunk_on_disk = False

    def _dropped(self, image_id: int, reason: str) -> None:
        if self.on_dropped is not None:
            self.on_dropped(image_id, reason)
        else:
            log.warning("%s: image %d not written: %s", self.path, image_id, reason)

    def _append_raw(self, image_id: int, status: int, data, intact) -> bool:
        target = self._chunk[self._in_chunk]
        if isinstance(data, np.ndarray) and data.shape == self.shape and data.dtype == self.dtype:
            np.copyto(target, data, casting="no")
        else:
            raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
            if raw.nbytes != self._image_n_bytes:
                raise StorageError(f"image {image_id}: {raw.nbytes} bytes, the file holds {self.shape} {self.dtype} "
                                   f"images of {self._image_n_bytes} bytes")
            target.reshape(-1).view(np.uint8)[:] = raw
        if intact is not None and not intact():
            return False
        self._add_copied(image_id, status)
        return True

    def _append_compressed(self, image_id: int, status: int, data, intact, borrowed: bool) -> bool:
        # A borrowed blob (a slot the caller keeps in place, see append) that is a flat contiguous
        # byte view (h5py refuses other arrays) is written from where it is, its guard checked
        # before and after the write as for a borrowed raw run: copying it first cost about as
        # much as the rest of the Python around the write (6 us for a 60 kB blob).
        in_place = (borrowed and intact is not None and self._frame is None and isinstance(data, np.ndarray)
                    and data.ndim == 1 and data.dtype == np.uint8 and data.flags.c_contiguous)
        if not len(data):
            raise StorageError(f"image {image_id}: a compressed image of 0 bytes cannot be written (HDF5 "
                               "chunks have bytes); not written")
        try:
            codecs.check_chunk(self.compression, data, self._image_n_bytes, self.dtype.itemsize)
        except codecs.CodecError as exc:
            if intact is not None and not intact():
                return False  # overwritten while its header was read: what was read proves nothing
            raise StorageError(f"image {image_id}: {exc}; not written") from None
        if in_place:
            if not intact():
                return False  # overwritten already: not written at all
            blob = data
        else:
            blob = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
            if intact is not None and not intact():
                return False
            if self._frame is not None:
                blob = self._frame(blob)
        index = self._count
        self._add_row(image_id, status)
        self._count += 1
        try:
            self._guard.check(len(blob), self._file.id.get_filesize())
            self._data_extent.set(index + 1)
            self._dsid.write_direct_chunk((index, 0, 0), blob)
            if in_place and not intact():
                self._data_extent.set(index)  # the next image's chunk takes its place
                self._n_rows -= 1
                self._count -= 1
                return False
        except (OSError, RuntimeError) as exc:
            self._fail(exc, index)
        self._written = index + 1
        if self._n_rows >= METADATA_CHUNK_ROWS:
            try:
                self._write_rows()
            except (OSError, RuntimeError) as exc:
                self._fail(exc, self._written)
        return True

    def _add_row(self, image_id: int, status: int) -> None:
        if self._n_rows == len(self._rows):
            self._rows = np.resize(self._rows, 2 * len(self._rows))
        self._rows[self._n_rows] = (image_id, status)
        self._n_rows += 1

    def _write_chunk(self, source: np.ndarray | None = None, verify: Callable[[], bool] | None = None) -> bool:
        """Write the chunk being filled (whole or partly filled; from ``source``, a borrowed run,
        instead of the chunk buffer) and make its images visible, unless ``verify()`` says after
        the write that the source changed: then False, and the extent is back to the images
        written before (HDF5 needs the extent grown before a chunk is written)."""
        first = self._count - self._in_chunk
        n_bytes = self._chunk.nbytes if not self._chunk_on_disk else 0
        try:
            self._guard.check(n_bytes, self._file.id.get_filesize())
            if self._data_extent.n < self._count:
                self._data_extent.set(self._count)
            if self.direct:
                self._dsid.write_direct_chunk((first, 0, 0), self._chunk if source is None else source)
            else:
                self._data[first:self._count] = self._chunk[:self._in_chunk]
            if verify is not None and not verify():
                self._data_extent.set(self._written)
                return False
            self._written = self._count
            self._write_rows()
        except (OSError, RuntimeError) as exc:
            self._fail(exc, self._written)  # a partly filled chunk written before is still good
        return True

    def _write_rows(self) -> None:
        """Append the pending metadata rows. Each metadata chunk is kept in memory and written
        whole by a direct chunk write (rewritten in place while it fills): h5py's slice
        assignment costs about half a millisecond per call, a tenth of the time of a 16 MiB chunk."""
        n = self._n_rows
        if not n:
            return
        extent = self._metadata_extent
        start = extent.n
        rows, chunk, write = self._rows, self._metadata_chunk, self._metadata.id.write_direct_chunk
        try:
            extent.set(start + n)
            done = 0
            while done < n:
                first, offset = divmod(start + done, METADATA_CHUNK_ROWS)
                take = min(n - done, METADATA_CHUNK_ROWS - offset)
                chunk[offset:offset + take] = rows[done:done + take]
                write((first * METADATA_CHUNK_ROWS,), chunk)
                if offset + take == METADATA_CHUNK_ROWS:
                    chunk[:] = 0  # the next chunk starts empty
                done += take
        except (OSError, RuntimeError):
            # the images of these rows are not kept either: no image without its metadata row
            with contextlib.suppress(OSError, RuntimeError):
                extent.set(start)
            self._written = min(self._written, start)
            raise
        self._n_rows = 0

    def _fail(self, exc: BaseException, first_lost: int) -> None:
        """Remember the failure; the images from ``first_lost`` on are lost; raise WriteFailed."""
        lost_rows = self._rows[:self._n_rows]
        written_rows = max(0, first_lost - self._metadata_extent.n)
        lost_ids = tuple(int(i) for i in lost_rows["image_id"][written_rows:])
        self._n_rows = written_rows
        self._count = self._written = first_lost
        self._in_chunk = 0
        self._borrowed = []
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror and "disk full" in exc.strerror \
            else _describe_os_error(exc, self.path)
        self.failure = reason
        log.error("%s: %s; %d image(s) lost", self.path, reason, len(lost_ids))
        raise WriteFailed(f"{len(lost_ids)} image(s) not written ({_id_ranges(lost_ids)}): {reason}", lost_ids)

    def flush(self) -> None:
        """Everything appended so far on disk and visible to readers (raises WriteFailed if not)."""
        if self._closed:
            return
        self.release_borrowed()  # a partly filled chunk is copied: later images may not follow in the buffer
        if self._chunk is not None and self._in_chunk and self.failure is None:
            self._write_chunk()
            self._chunk_on_disk = True
        try:
            self._write_rows()  # after a failure: the rows of the images that are on disk
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            if self.failure is None:
                self._fail(exc, self._written)
            # it failed before: the images on disk whose rows cannot be written now are lost too
            # (close trims them: no image without its metadata row), and said so
            lost = tuple(int(i) for i in self._rows["image_id"][:self._n_rows])
            self._n_rows = 0
            reason = _describe_os_error(exc, self.path)
            if lost:
                log.error("%s: %s; %d more image(s) lost", self.path, reason, len(lost))
                raise WriteFailed(f"{len(lost)} image(s) not written ({_id_ranges(lost)}): {reason}", lost) from None
            raise StorageError(f"cannot flush {self.path}: {reason}") from None

    def close(self) -> None:
        """Flush, trim the extents to what is on disk, close. Raises WriteFailed/StorageError if the
        last images could not be written; the file is closed in any case."""
        if self._closed:
            return
        error: BaseException | None = None
        try:
            self.flush()
        except StorageError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - whatever it was, the file is still closed below
            error = StorageError(f"cannot flush {self.path}: {type(exc).__name__}: {exc}")
        try:
            if self.failure is not None:
                self._data_extent.set(self._written)
                self._metadata_extent.set(min(self._metadata_extent.n, self._written))
        except (OSError, RuntimeError) as exc:
            error = error or StorageError(f"cannot trim {self.path}: {exc}")
        finally:
            self._closed = True
            try:
                self._file.close()
            except (OSError, RuntimeError) as exc:
                error = error or StorageError(_describe_os_error(exc, self.path))
        if error is not None:
            raise error

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _id_ranges(ids: tuple[int, ...] | list[int], limit: int = 4) -> str:
    """'ids 3-7, 9' style summary of image ids (at most ``limit`` ranges)."""
    if not ids:
        return "no ids"
    ranges: list[list[int]] = []
    for i in sorted(ids):
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    more = ", ..." if len(ranges) > limit else ""
    return ("id " if len(ids) == 1 else "ids ") + ", ".join(parts) + more


# ---------------------------------------------------------------------- Meta file
_COMMON_FIELDS = [("image_id", "<u8"), ("status", "<u8"), ("height", "<u8"), ("width", "<u8"), ("size", "<u8"),
                  ("dtype", "<u4"), ("compression", "<u4")]
BSREAD_NAME_BYTES = 128
DETECTOR_FIELDS = {
    "gf": [("scan_id", "<u4"), ("scan_time", "<u4"), ("sync_time", "<u4"), ("frame_timestamp", "<u8"),
           ("exposure_time", "<u8"), ("store_image", "u1")],
    "jf": [("daq_rec", "<u8")],
    "eg": [("exptime", "<u8")],
    "pco": [("global_timestamp_sec", "<u8"), ("global_timestamp_ns", "<u8"), ("bsread_name", f"S{BSREAD_NAME_BYTES}")],
}
DETECTOR_KIND = {"gigafrost": "gf", "jungfrau-raw": "jf", "jungfrau-converted": "jf", "eiger": "eg", "pco": "pco"}


def metadata_dtype(detector_type: str) -> np.dtype:
    """Compound type of a Meta file row: the common fields, then the detector's own."""
    kind = DETECTOR_KIND[detector_type]
    return np.dtype(_COMMON_FIELDS + [(f"{kind}_{name}", t) for name, t in DETECTOR_FIELDS[kind]])


class MetadataFile:
    """``<prefix>Meta.h5``: ``/<det>/metadata``, one row per recorded image, every field (SWMR)."""

    def __init__(self, h5file: h5py.File, path: Path, detector_name: str, detector_type: str) -> None:
        self.path = path
        self.detector_name = detector_name
        self.kind = DETECTOR_KIND[detector_type]
        self._file = h5file
        self._dataset = h5file[f"{detector_name}/metadata"]
        self._extent = _Extent(self._dataset)
        self._dtype = self._dataset.dtype
        self._fields = [name for name, _ in DETECTOR_FIELDS[self.kind]]
        self._rows = np.zeros(METADATA_CHUNK_ROWS, self._dtype)
        self._n_rows = 0
        self._count = 0
        self._guard = _SpaceGuard(path)
        self.failure: str | None = None
        self._closed = False
        self._name_cut = False

    @classmethod
    def create(cls, path: str | Path, detector_name: str, detector_type: str) -> MetadataFile:
        path = Path(path)
        if detector_type not in DETECTOR_KIND:
            raise StorageError(f"detector type {detector_type!r} is not allowed (allowed: {', '.join(DETECTOR_KIND)})")
        h5file = _create_h5(path)
        with _laying_out(h5file, path):
            group = h5file.create_group(detector_name)
            group.create_dataset("metadata", shape=(0,), maxshape=(None,), chunks=(METADATA_CHUNK_ROWS,),
                                 dtype=metadata_dtype(detector_type))
            group.attrs["detector_type"] = detector_type
            h5file.swmr_mode = True
        return cls(h5file, path, detector_name, detector_type)

    @property
    def count(self) -> int:
        return self._count

    def append(self, metadata: ImageMetadata) -> None:
        """One image's metadata; fields of another detector kind than the file's are left 0."""
        if self.failure is not None:
            raise StorageError(f"image {metadata.image_id} not written: {self.path} failed earlier ({self.failure})")
        row = self._rows[self._n_rows]
        row["image_id"] = metadata.image_id
        row["status"] = metadata.status
        row["height"] = metadata.height
        row["width"] = metadata.width
        row["size"] = metadata.size
        row["dtype"] = metadata.dtype
        row["compression"] = metadata.compression
        if metadata.WhichOneof("image_metadata") == self.kind:
            group = getattr(metadata, self.kind)
            for name in self._fields:
                value = getattr(group, name)
                row[f"{self.kind}_{name}"] = self._fit_name(value) if isinstance(value, str) else value
        else:
            for name in self._fields:
                row[f"{self.kind}_{name}"] = b"" if name == "bsread_name" else 0
        self._n_rows += 1
        self._count += 1
        if self._n_rows == len(self._rows):
            self._write_rows()

    def _fit_name(self, name: str) -> bytes:
        """The name's UTF-8 in BSREAD_NAME_BYTES, cut at a character boundary (said once per file)."""
        encoded = name.encode()
        if len(encoded) <= BSREAD_NAME_BYTES:
            return encoded
        if not self._name_cut:
            self._name_cut = True
            log.warning("%s: bsread_name of %d bytes stored cut to %d (%r...)", self.path, len(encoded),
                        BSREAD_NAME_BYTES, name[:40])
        return encoded[:BSREAD_NAME_BYTES].decode("utf-8", "ignore").encode()

    def _write_rows(self) -> None:
        n = self._n_rows
        if not n:
            return
        start = self._extent.n
        try:
            self._guard.check(n * self._dtype.itemsize, self._file.id.get_filesize())
            self._extent.set(start + n)
            self._dataset[start:start + n] = self._rows[:n]
        except (OSError, RuntimeError) as exc:
            lost = tuple(int(i) for i in self._rows["image_id"][:n])
            self._n_rows = 0
            self._count = start
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror and "disk full" in exc.strerror \
                else _describe_os_error(exc, self.path)
            self.failure = reason
            try:
                self._extent.set(start)
            except (OSError, RuntimeError):
                pass
            raise WriteFailed(f"metadata of {len(lost)} image(s) not written ({_id_ranges(lost)}): {reason}", lost) from None
        self._n_rows = 0

    def flush(self) -> None:
        if self._closed or self.failure is not None:
            return
        self._write_rows()
        try:
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise StorageError(_describe_os_error(exc, self.path)) from None

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            try:
                self._file.close()
            except (OSError, RuntimeError) as exc:
                raise StorageError(_describe_os_error(exc, self.path)) from None

    def __enter__(self) -> MetadataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- master file
def writer_file_name(prefix: str, writer_index: int) -> str:
    return f"{prefix}{writer_index}.h5"


def meta_file_name(prefix: str) -> str:
    return f"{prefix}Meta.h5"


def master_file_name(prefix: str) -> str:
    return f"{prefix}_master.h5"


def _strided_runs(positions: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split target positions of consecutive source rows into (src_start, n, dst_start, step) runs.

    With N writers and image k going to writer k % N, each file is a single run of step N, so
    the virtual dataset needs N mappings, not one per image.
    """
    runs = []
    n = len(positions)
    i = 0
    while i < n:
        if i + 1 == n:
            runs.append((i, 1, int(positions[i]), 1))
            break
        step = int(positions[i + 1] - positions[i])
        j = i + 1
        if step > 0:
            while j + 1 < n and positions[j + 1] - positions[j] == step:
                j += 1
        else:
            j = i
        runs.append((i, j - i + 1, int(positions[i]), max(step, 1)))
        i = j + 1
    return runs


def _check_master(master: Path, detector_name: str, probes: list[tuple[int, Path, int]]) -> None:
    """Read one image of each writer file through the master's virtual dataset, against the file
    itself: a source HDF5 does not find reads as fill value, silently. StorageError if one differs."""
    with h5py.File(master, "r") as f:
        data = f[f"{detector_name}/data"]
        for row, path, source_row in probes:
            with h5py.File(path, "r") as source:
                expected = source[f"{detector_name}/data"][source_row]
            if data[row].tobytes() != expected.tobytes():
                raise StorageError(f"cannot write master {master.name.removeprefix('.').removesuffix('.tmp')}: "
                                   f"its image {row} does not read back as image {source_row} of {path.name} "
                                   "(the virtual dataset does not find that file)")


def write_master(directory: str | Path, prefix: str, detector_name: str, n_writers: int,
                 meta_file: str | None = None) -> Path:
    """Write ``DIR/<prefix>_master.h5`` over ``DIR/<prefix><i>.h5`` (i < n_writers); returns its path.

    ``/<det>/data`` is a virtual dataset of all images in image_id order, ``/<det>/metadata`` the
    merged (image_id, status) rows, ``/<det>/meta`` an external link to the Meta file's group when
    ``meta_file`` (a file name in DIR) is given. Written to a temporary name and renamed, so a
    reader never sees half a master file.
    """
    directory = Path(directory)
    if n_writers < 1:
        raise StorageError(f"n_writers {n_writers} is not allowed: a master needs at least one writer file")
    sources = []
    for index in range(n_writers):
        name = writer_file_name(prefix, index)
        path = directory / name
        if not path.is_file():
            raise StorageError(f"cannot write master: writer file {path} does not exist")
        try:
            with h5py.File(path, "r") as f:
                data = f[f"{detector_name}/data"]
                rows = f[f"{detector_name}/metadata"][:]
                sources.append((name, data.shape, data.dtype, rows, data.shape[0]))
        except (OSError, KeyError) as exc:
            raise StorageError(f"cannot write master: {path} is not a readable writer file ({exc})") from None
    shapes = {s[1][1:] for s in sources}
    dtypes = {s[2] for s in sources}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise StorageError(f"cannot write master: writer files disagree on image shape/dtype ({shapes}, {dtypes})")
    image_shape, dtype = shapes.pop(), dtypes.pop()
    # a file's metadata and data agree after a clean close; after a failure take the shorter
    counts = [min(len(s[3]), s[4]) for s in sources]
    ids = np.concatenate([s[3]["image_id"][:n] for s, n in zip(sources, counts, strict=True)]) \
        if sources else np.zeros(0, np.uint64)
    order = np.argsort(ids, kind="stable")
    total = len(ids)
    position = np.empty(total, np.int64)
    position[order] = np.arange(total)
    merged = np.concatenate([s[3][:n] for s, n in zip(sources, counts, strict=True)])[order]

    layout = h5py.VirtualLayout(shape=(total, *image_shape), dtype=dtype)
    offset = 0
    probes = []  # (row of the master, writer file, its row): one per writer file, checked once written
    for i, (name, shape, _, _, _) in enumerate(sources):
        n = counts[i]
        if n:
            # HDF5 reads a source file name as a printf-like pattern (%b: a block number): a % of
            # the prefix must be doubled, else the master's images read as fill (0) or it fails
            source = h5py.VirtualSource(name.replace("%", "%%"), f"{detector_name}/data",
                                        shape=(shape[0], *image_shape))
            for src, length, dst, step in _strided_runs(position[offset:offset + n]):
                layout[dst:dst + (length - 1) * step + 1:step] = source[src:src + length]
            probes.append((int(position[offset + n - 1]), directory / name, n - 1))
        offset += n

    final = directory / master_file_name(prefix)
    temporary = directory / f".{master_file_name(prefix)}.tmp"
    try:
        with h5py.File(temporary, "w", libver=LIBVER) as f:
            group = f.create_group(detector_name)
            group.create_virtual_dataset("data", layout, fillvalue=0)
            group.create_dataset("metadata", data=merged, dtype=RAW_METADATA_DTYPE)
            group.attrs["writer_files"] = [s[0] for s in sources]
            if meta_file is not None:
                group["meta"] = h5py.ExternalLink(meta_file, f"/{detector_name}")
        _check_master(temporary, detector_name, probes)
        os.replace(temporary, final)
    except (OSError, RuntimeError, ValueError, StorageError) as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"cannot write master {final}: {_describe_os_error(exc, final)}") from None
    return final
