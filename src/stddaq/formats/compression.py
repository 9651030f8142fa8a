"""The two image codecs of the bus (SPEC sections 7 and 9), on top of the kept libraries.

- ``h5bitshuffle_lz4``: the chunk format of HDF5 filter 32008 (bitshuffle + LZ4): a 12-byte
  header (u64 big-endian uncompressed bytes, u32 big-endian block size in bytes), then what
  ``bitshuffle.compress_lz4`` makes (per block a u32 big-endian length and an LZ4 block, then the
  last ``n % 8`` elements raw). The element size is not stored: it is the image dtype's.
- ``blosc2``: one Blosc2 chunk, LZ4 codec, bitshuffle filter, typesize = bytes per pixel.

``decode(metadata, blob)`` gives back the pixels of any bus image, whatever its compression.

The compression stages run these encoders in several threads at once (SPEC 7, ``-t THREADS``),
so this module makes both libraries fit for that: blosc2 is told to release the GIL while it
compresses (it holds it by default), and ``single_threaded_openmp()`` stops bitshuffle's
OpenMP build from spreading every call over all cores (its idle OpenMP threads also spin and
steal the CPU the stage's own threads need). Both release the GIL in their C part, so N
threads compress N images in parallel; ``*_encode_into`` write straight into a ring slot.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import struct
import threading
from collections.abc import Callable

import bitshuffle
import blosc2
import numpy as np

from stddaq.formats import (  # noqa: F401 - the block rules live with the light format helpers (config uses them)
    DEFAULT_BLOCK_BYTES,
    MAX_BLOCK_BYTES,
    check_block_bytes,
    default_block_elements,
)
from stddaq.protocol import ImageMetadataCompression, numpy_dtype

log = logging.getLogger(__name__)

HEADER = struct.Struct(">QI")
BLOSC2_MAX_LEVEL = 9


class CodecError(ValueError):
    """A blob that is not what its metadata says (names the image and what is wrong)."""


# ---------------------------------------------------------------- bitshuffle-lz4 (filter 32008)
def bitshuffle_lz4_encode(pixels: np.ndarray, block_bytes: int = 0) -> np.ndarray:
    """The filter-32008 chunk of ``pixels`` (header included) as a uint8 array."""
    pixels = np.ascontiguousarray(pixels)
    block = check_block_bytes(block_bytes, pixels.dtype.itemsize)
    body = bitshuffle.compress_lz4(pixels.reshape(-1), block)
    out = np.empty(HEADER.size + body.nbytes, np.uint8)
    _store_bitshuffle_chunk(out, pixels, block, body)
    return out


def bitshuffle_lz4_encode_into(pixels: np.ndarray, out: np.ndarray, block_bytes: int = 0) -> int:
    """Write the filter-32008 chunk of ``pixels`` at the start of ``out`` (uint8, e.g. a ring slot).

    Returns the chunk's size in bytes, or 0 when it does not fit ``out`` (then ``out`` is left
    untouched). bitshuffle's C encoder takes no output capacity (it assumes room for its worst
    case, more than the raw image), so it cannot write into a slot of image size directly: it
    compresses into its own buffer and only a chunk that fits is copied (a fraction of the image).
    """
    pixels = np.ascontiguousarray(pixels)
    block = check_block_bytes(block_bytes, pixels.dtype.itemsize)
    body = bitshuffle.compress_lz4(pixels.reshape(-1), block)
    n_bytes = HEADER.size + body.nbytes
    if n_bytes > out.nbytes:
        return 0
    _store_bitshuffle_chunk(out, pixels, block, body)
    return n_bytes


def bitshuffle_lz4_bound(n_bytes: int, block_bytes: int) -> int:
    """The largest filter-32008 chunk of ``n_bytes`` in blocks of ``block_bytes``: its 12-byte
    header, and per block its 4-byte length and LZ4's bound (LZ4_COMPRESSBOUND: the block + 1/255
    of it + 16). The smaller the blocks, the larger the bound."""
    n_blocks = -(-n_bytes // block_bytes)
    return HEADER.size + n_bytes + n_bytes // 255 + n_blocks * (4 + 16 + 1)


def _store_bitshuffle_chunk(out: np.ndarray, pixels: np.ndarray, block: int, body: np.ndarray) -> None:
    HEADER.pack_into(out, 0, pixels.nbytes, block * pixels.dtype.itemsize)
    out[HEADER.size:HEADER.size + body.nbytes] = body


def bitshuffle_lz4_header(blob: np.ndarray | bytes | memoryview) -> tuple[int, int]:
    """(uncompressed bytes, block size in bytes) of a filter-32008 chunk."""
    if len(blob) < HEADER.size:
        raise CodecError(f"bitshuffle-lz4 blob of {len(blob)} bytes is shorter than its 12-byte header")
    return HEADER.unpack_from(blob, 0)


def bitshuffle_lz4_decode(blob: np.ndarray | bytes | memoryview, dtype: np.dtype,
                          shape: tuple[int, ...]) -> np.ndarray:
    """Pixels of a filter-32008 chunk; CodecError if the header does not fit ``shape``/``dtype``."""
    dtype = np.dtype(dtype)
    n_bytes, block_bytes = bitshuffle_lz4_header(blob)
    expected = int(np.prod(shape)) * dtype.itemsize
    if n_bytes != expected:
        raise CodecError(f"bitshuffle-lz4 header says {n_bytes} bytes, image {shape} {dtype} has {expected}")
    block = block_bytes // dtype.itemsize if block_bytes else default_block_elements(dtype.itemsize)
    if block <= 0 or block % 8:
        raise CodecError(f"bitshuffle-lz4 header block size {block_bytes} bytes is not a multiple of "
                         f"8 x {dtype.itemsize} bytes")
    body = np.frombuffer(blob, np.uint8)[HEADER.size:]
    _check_blocks(body, expected // dtype.itemsize, block, dtype.itemsize)
    try:
        return bitshuffle.decompress_lz4(body, tuple(shape), dtype, block)
    except (ValueError, RuntimeError, OverflowError, MemoryError) as exc:  # a huge claimed size, too
        raise CodecError(f"bitshuffle-lz4 blob does not decode to {shape} {dtype}: {exc}") from None


_BLOCK_LENGTH = struct.Struct(">I")


def _check_blocks(body: np.ndarray, n_elements: int, block: int, itemsize: int) -> None:
    """Walk the block lengths before the C decoder does: it trusts them and would read past the end
    of a truncated or corrupt blob."""
    end = len(body)
    position = 0
    full, rest = divmod(n_elements, block)
    last = (rest // 8) * 8
    for _ in range(full + (1 if last else 0)):
        if position + 4 > end:
            raise CodecError(f"bitshuffle-lz4 blob is truncated at byte {position + HEADER.size}")
        (length,) = _BLOCK_LENGTH.unpack_from(body, position)
        position += 4 + length
        if position > end:
            raise CodecError(f"bitshuffle-lz4 block of {length} bytes runs past the end of the blob")
    if end - position != (n_elements - full * block - last) * itemsize:
        raise CodecError(f"bitshuffle-lz4 blob has {end - position} bytes after its blocks, "
                         f"expected {(n_elements - full * block - last) * itemsize}")


# ---------------------------------------------------------------- blosc2
def _check_level(level: int) -> None:
    if not 0 <= level <= BLOSC2_MAX_LEVEL:
        raise ValueError(f"blosc2 level {level} is not allowed (allowed: 0..{BLOSC2_MAX_LEVEL})")


def blosc2_encode(pixels: np.ndarray, level: int = 5, nthreads: int = 1) -> bytes:
    """One Blosc2 chunk: LZ4, bitshuffle, typesize = bytes per pixel."""
    _check_level(level)
    pixels = np.ascontiguousarray(pixels)
    return blosc2.compress2(pixels, typesize=pixels.dtype.itemsize, clevel=level, codec=blosc2.Codec.LZ4,
                            filters=[blosc2.Filter.BITSHUFFLE], filters_meta=[0], nthreads=nthreads)


def blosc2_encode_into(pixels: np.ndarray, out: np.ndarray, level: int = 5) -> int:
    """Write the Blosc2 chunk of ``pixels`` at the start of ``out`` (uint8, e.g. a ring slot).

    Returns the chunk's size in bytes, or 0 when it does not fit ``out``; then ``out`` may hold
    part of a chunk, which must not be published. Single-threaded inside: the caller's threads
    give the parallelism. python-blosc2 has no compress-into-a-buffer call, so this calls
    libblosc2 (the wheel's own shared library) the way ``compress2`` does (same parameters, a
    fresh context, so byte for byte the same chunk) but with ``out`` as destination: 10-15%
    faster per image than ``compress2`` and a copy. If that library cannot be used here, it
    falls back to ``compress2`` and a copy.
    """
    _check_level(level)
    pixels = np.ascontiguousarray(pixels)
    direct = _blosc2_direct()
    if direct is not None:
        return direct.compress_into(pixels, out, level)
    chunk = blosc2_encode(pixels, level)
    if len(chunk) > out.nbytes:
        return 0
    out[:len(chunk)] = np.frombuffer(chunk, np.uint8)
    return len(chunk)


def blosc2_encoder_at(level: int = 5) -> Callable[[int, int, int, int, int], int] | None:
    """``blosc2_encode_into`` between raw addresses, for callers that know them (ring slots:
    ``RamBuffer.slot_address``): ``encode(source, n_bytes, itemsize, out, capacity) -> bytes
    written`` (0 = does not fit). numpy takes about 2 us to tell an array's address, twice per
    image: at 480x128 that is 5% of compressing it. None when the direct path is not usable here.
    The source must be ``n_bytes`` of contiguous pixels of ``itemsize`` bytes each."""
    _check_level(level)
    direct = _blosc2_direct()
    if direct is None:
        return None
    compress_at = direct.compress_at
    return lambda source, n_bytes, itemsize, out, capacity: compress_at(source, n_bytes, itemsize, out, capacity,
                                                                        level)


#: what compress2 allows a chunk beyond its data (BLOSC2_MAX_OVERHEAD): the same destination
#: capacity gives the same chunk (with more room, blosc2 may store noise differently)
BLOSC2_MAX_OVERHEAD = 32
_MAX_CHUNK_SOURCE = 0x7FFFFFFF - BLOSC2_MAX_OVERHEAD
#: what blosc2_compress_ctx answers for a destination under BLOSC2_MAX_OVERHEAD bytes
_BLOSC2_ERROR_MAX_BUFSIZE_EXCEEDED = -35


class _Blosc2CParams(ctypes.Structure):
    """``blosc2_cparams`` of the blosc2.h shipped in the wheel (checked against compress2 at load)."""

    _fields_ = [("compcode", ctypes.c_uint8), ("compcode_meta", ctypes.c_uint8), ("clevel", ctypes.c_uint8),
                ("use_dict", ctypes.c_int), ("typesize", ctypes.c_int32), ("nthreads", ctypes.c_int16),
                ("blocksize", ctypes.c_int32), ("splitmode", ctypes.c_int32), ("schunk", ctypes.c_void_p),
                ("filters", ctypes.c_uint8 * 6), ("filters_meta", ctypes.c_uint8 * 6),
                ("prefilter", ctypes.c_void_p), ("preparams", ctypes.c_void_p), ("tuner_params", ctypes.c_void_p),
                ("tuner_id", ctypes.c_int), ("instr_codec", ctypes.c_bool), ("codec_params", ctypes.c_void_p),
                ("filter_params", ctypes.c_void_p * 6)]


class _Blosc2Direct:
    """libblosc2's ``blosc2_compress_ctx`` into the caller's buffer, with its capacity (it never
    writes past it). A fresh context per call, as compress2 makes (a reused context adapts its
    block sizes and gives other chunks).

    The compression releases the GIL (a ``CDLL`` call); making and freeing the context keep it
    (a ``PyDLL`` handle of the same library): they take a microsecond, and every release is a
    chance for another thread to take the GIL, which this one must then wait to get back (with
    -t 2, each release cost a thread switch)."""

    def __init__(self) -> None:
        path = os.path.join(os.path.dirname(blosc2.__file__), "lib", "libblosc2.so")
        lib, keeps_gil = ctypes.CDLL(path), ctypes.PyDLL(path)
        lib.blosc2_init.restype = None
        lib.blosc2_get_blosc2_cparams_defaults.restype = _Blosc2CParams
        keeps_gil.blosc2_create_cctx.argtypes = [_Blosc2CParams]
        keeps_gil.blosc2_create_cctx.restype = ctypes.c_void_p
        lib.blosc2_compress_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                            ctypes.c_int32]
        lib.blosc2_compress_ctx.restype = ctypes.c_int
        keeps_gil.blosc2_free_ctx.argtypes = [ctypes.c_void_p]
        keeps_gil.blosc2_free_ctx.restype = None
        lib.blosc2_init()
        self._lib = lib
        self._create_context, self._free_context = keeps_gil.blosc2_create_cctx, keeps_gil.blosc2_free_ctx
        self._cparams: dict[tuple[int, int], _Blosc2CParams] = {}

    def _parameters(self, level: int, typesize: int) -> _Blosc2CParams:
        cparams = self._cparams.get((level, typesize))
        if cparams is None:  # as compress2 sets them from blosc2_encode's arguments
            cparams = self._lib.blosc2_get_blosc2_cparams_defaults()
            cparams.compcode, cparams.compcode_meta, cparams.clevel = int(blosc2.Codec.LZ4.value), 0, level
            cparams.use_dict, cparams.typesize, cparams.nthreads, cparams.blocksize = 0, typesize, 1, 0
            cparams.splitmode = int(blosc2.cparams_dflts["splitmode"].value)
            for i in range(6):
                cparams.filters[i] = 0
                cparams.filters_meta[i] = 0
            cparams.filters[0] = int(blosc2.Filter.BITSHUFFLE.value)
            cparams.tuner_id = int(blosc2.cparams_dflts["tuner"].value)
            self._cparams[(level, typesize)] = cparams
        return cparams

    def compress_into(self, pixels: np.ndarray, out: np.ndarray, level: int) -> int:
        return self.compress_at(pixels.ctypes.data, pixels.nbytes, pixels.dtype.itemsize, out.ctypes.data,
                                out.nbytes, level)

    def compress_at(self, source: int, n_bytes: int, itemsize: int, out: int, capacity: int, level: int) -> int:
        """``n_bytes`` at address ``source`` into ``capacity`` bytes at ``out`` (see
        ``blosc2_encoder_at``)."""
        if n_bytes > _MAX_CHUNK_SOURCE:
            raise ValueError(f"an image of {n_bytes} bytes is too large for one blosc2 chunk (< 2 GiB)")
        context = self._create_context(self._parameters(level, itemsize))
        if not context:
            raise RuntimeError("libblosc2 could not create a compression context")
        try:
            written = self._lib.blosc2_compress_ctx(context, source, n_bytes, out,
                                                    min(capacity, n_bytes + BLOSC2_MAX_OVERHEAD))
        finally:
            self._free_context(context)
        if written == _BLOSC2_ERROR_MAX_BUFSIZE_EXCEEDED:  # less room than a chunk's header: does not fit
            return 0
        if written < 0:
            raise RuntimeError(f"blosc2 compression failed (error {written})")
        return written


_direct_lock = threading.Lock()
_direct: _Blosc2Direct | None | bool = False  # False: not tried yet


def _blosc2_direct() -> _Blosc2Direct | None:
    """The direct path, if libblosc2 loads here and writes exactly the chunks compress2 writes."""
    global _direct
    if _direct is False:
        with _direct_lock:
            if _direct is False:
                _direct = _load_blosc2_direct()
    return _direct  # type: ignore[return-value]


def _load_blosc2_direct() -> _Blosc2Direct | None:
    rng = np.random.default_rng(0)
    samples = [np.arange(6000, dtype=np.uint16) % 977, np.arange(999, dtype=np.uint32) * 3,
               (np.arange(5000) % 313).astype(np.float32), np.arange(91, dtype=np.uint8),
               rng.integers(0, 1 << 16, 20_000, dtype=np.uint16)]  # noise: the does-not-fit path
    try:
        direct = _Blosc2Direct()
        for sample in samples:
            for level in (1, 5, 9):
                expected = blosc2_encode(sample, level)
                for room in (len(expected), sample.nbytes):
                    out = np.zeros(room, np.uint8)
                    n_bytes = direct.compress_into(sample, out, level)
                    fits = len(expected) <= room
                    if (n_bytes != (len(expected) if fits else 0)
                            or (fits and out[:n_bytes].tobytes() != expected)):
                        raise RuntimeError(f"its chunk of a {sample.dtype} sample at level {level} differs from "
                                           f"blosc2.compress2's")
    except (OSError, AttributeError, RuntimeError, ValueError) as exc:
        log.info("blosc2 compresses through compress2 and a copy (libblosc2's direct call is unusable: %s)", exc)
        return None
    return direct


def blosc2_decode(blob: np.ndarray | bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        raw = blosc2.decompress2(blob if isinstance(blob, bytes) else bytes(blob))
    except (ValueError, RuntimeError, SystemError) as exc:  # SystemError: some corrupt headers (a negative size)
        raise CodecError(f"blosc2 blob does not decode: {exc}") from None
    if len(raw) != expected:
        raise CodecError(f"blosc2 blob holds {len(raw)} bytes, image {shape} {dtype} has {expected}")
    return np.frombuffer(raw, dtype).reshape(shape)


# ---------------------------------------------------------------- threads
# blosc2 holds the GIL while it compresses unless told otherwise; releasing it costs nothing
# measurable on images and lets threads compress in parallel (2 threads: 1.9x on 2 cores).
blosc2.set_releasegil(True)

_openmp_lock = threading.Lock()
_openmp_libraries: list[ctypes.CDLL] | None = None


def _openmp_runtimes() -> list[ctypes.CDLL]:
    """The OpenMP runtimes bitshuffle may use: its wheel's own copy, else any loaded libgomp."""
    global _openmp_libraries
    with _openmp_lock:
        if _openmp_libraries is None:
            package = os.path.dirname(bitshuffle.__file__)
            paths = sorted(glob.glob(os.path.join(package + ".libs", "libgomp*.so*")))
            if not paths:
                try:
                    with open("/proc/self/maps") as maps:
                        paths = sorted({line.split()[-1] for line in maps if "libgomp" in line.split()[-1]})
                except OSError:
                    paths = []
            libraries = []
            for path in paths:
                try:
                    library = ctypes.CDLL(path)
                    library.omp_set_num_threads.argtypes = [ctypes.c_int]
                    libraries.append(library)
                except (OSError, AttributeError):
                    log.debug("cannot use OpenMP runtime %s", path, exc_info=True)
            _openmp_libraries = libraries
        return _openmp_libraries


def single_threaded_openmp() -> bool:
    """Make bitshuffle use one core in the calling thread (OpenMP settings are per thread).

    bitshuffle's wheel is built with OpenMP: each call would otherwise use every core, and after
    it the idle OpenMP threads spin for a while, taking the cores from the stage's other threads.
    Call once at the start of each thread that compresses. False when no OpenMP runtime is
    found (a build without OpenMP is single threaded already).
    """
    libraries = _openmp_runtimes()
    for library in libraries:
        library.omp_set_num_threads(1)
    return bool(libraries)


def check_chunk(compression: int, blob: np.ndarray | bytes | memoryview, n_bytes: int, itemsize: int) -> None:
    """CodecError unless the compressed image ``blob`` says in its header that it holds ``n_bytes``
    of pixels of ``itemsize`` bytes (and, blosc2, that it is ``len(blob)`` bytes long).

    Its metadata and its blob can disagree (a blob cut short, an image of another shape): stored
    as it is, such an image reads back as garbage or not at all, with status good. Only the
    header is read (a few bytes); a blob corrupt inside still fails where it is decoded."""
    length = len(blob)
    head = blob[:_BLOSC2_MIN_HEADER]  # (any view: the header is read from a copy of its bytes)
    if type(head) is not bytes:
        head = head.tobytes() if type(head) is np.ndarray else bytes(head)
    if compression == _BITSHUFFLE_LZ4:
        if length < HEADER.size:
            raise CodecError(f"bitshuffle-lz4 blob of {length} bytes is shorter than its 12-byte header")
        held, block_bytes = HEADER.unpack_from(head)
        if block_bytes % (8 * itemsize):
            raise CodecError(f"bitshuffle-lz4 header block size {block_bytes} bytes is not a multiple of "
                             f"8 x {itemsize} bytes")
    elif compression == _BLOSC2:
        if length < _BLOSC2_MIN_HEADER:
            raise CodecError(f"blosc2 blob of {length} bytes is shorter than a chunk header ({_BLOSC2_MIN_HEADER})")
        held, _, stored = _BLOSC2_SIZES.unpack_from(head, 4)
        if stored != length:
            raise CodecError(f"blosc2 chunk header says {stored} bytes, the blob has {length}")
    else:
        raise CodecError(f"compression {compression} is not a compressed chunk (allowed: 1 h5bitshuffle_lz4, "
                         "2 blosc2)")
    if held != n_bytes:
        raise CodecError(f"{'blosc2' if compression == _BLOSC2 else 'bitshuffle-lz4'} "
                         f"chunk holds {held} bytes of pixels, the image has {n_bytes}")


_BITSHUFFLE_LZ4 = int(ImageMetadataCompression.h5bitshuffle_lz4)
_BLOSC2 = int(ImageMetadataCompression.blosc2)
#: a Blosc2 chunk header: version, versionlz, flags, typesize, nbytes (<i4), blocksize, cbytes (<i4)
_BLOSC2_MIN_HEADER = 16
_BLOSC2_SIZES = struct.Struct("<iii")


# ---------------------------------------------------------------- any bus image
def decode(metadata, blob: np.ndarray | bytes | memoryview) -> np.ndarray:
    """The (height, width) pixels of a bus image given its ImageMetadata and its slot bytes."""
    dtype = numpy_dtype(metadata.dtype)
    shape = (metadata.height, metadata.width)
    compression = metadata.compression
    if compression == ImageMetadataCompression.none:
        return np.frombuffer(blob, dtype, count=shape[0] * shape[1]).reshape(shape)
    if compression == ImageMetadataCompression.h5bitshuffle_lz4:
        return bitshuffle_lz4_decode(blob, dtype, shape)
    if compression == ImageMetadataCompression.blosc2:
        return blosc2_decode(blob, dtype, shape)
    raise CodecError(f"image {metadata.image_id}: unknown compression {compression} (allowed: 0 none, "
                     f"1 h5bitshuffle_lz4, 2 blosc2)")
