"""The bus codecs: round trips, the filter-32008 header, independent decoders, bad input."""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import pytest

from stddaq.formats.compression import (
    CodecError,
    bitshuffle_lz4_decode,
    bitshuffle_lz4_encode,
    bitshuffle_lz4_header,
    blosc2_decode,
    blosc2_encode,
    check_block_bytes,
    decode,
)
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadata, ImageMetadataCompression, protocol_dtype


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 48)])
def test_round_trips(dtype: str, shape: tuple[int, int]) -> None:
    pixels = ramp(11, shape, dtype)
    assert np.array_equal(bitshuffle_lz4_decode(bitshuffle_lz4_encode(pixels), dtype, shape), pixels)
    assert np.array_equal(bitshuffle_lz4_decode(bitshuffle_lz4_encode(pixels, 64 * pixels.itemsize), dtype, shape),
                          pixels)
    assert np.array_equal(blosc2_decode(blosc2_encode(pixels), dtype, shape), pixels)


def test_bitshuffle_header_is_big_endian_bytes_and_block_bytes() -> None:
    blob = bitshuffle_lz4_encode(ramp(0, (100, 120), "uint16"))
    assert blob[:12].tobytes() == (100 * 120 * 2).to_bytes(8, "big") + (8192).to_bytes(4, "big")
    assert bitshuffle_lz4_header(blob) == (24000, 8192)
    blob = bitshuffle_lz4_encode(ramp(0, (100, 120), "uint32"), block_bytes=1024)
    assert bitshuffle_lz4_header(blob) == (48000, 1024)


def test_hdf5_filter_reads_our_chunks() -> None:
    pixels = ramp(3, (50, 60), "uint16")
    bs_blob = bitshuffle_lz4_encode(pixels)
    f = h5py.File("inmemory.h5", "w", driver="core", backing_store=False)
    with f:
        bs = f.create_dataset("bs", (1, 50, 60), "uint16", chunks=(1, 50, 60), **hdf5plugin.Bitshuffle(cname="lz4"))
        bs.id.write_direct_chunk((0, 0, 0), bs_blob.tobytes())
        assert np.array_equal(bs[0], pixels)


def test_decode_dispatches_on_metadata() -> None:
    pixels = ramp(8, (10, 12), "uint16")
    meta = ImageMetadata(image_id=8, height=10, width=12, dtype=protocol_dtype("uint16"))
    assert np.array_equal(decode(meta, pixels.tobytes()), pixels)
    meta.compression = ImageMetadataCompression.h5bitshuffle_lz4
    assert np.array_equal(decode(meta, bitshuffle_lz4_encode(pixels)), pixels)
    meta.compression = ImageMetadataCompression.blosc2
    assert np.array_equal(decode(meta, blosc2_encode(pixels)), pixels)
    meta.compression = 7
    with pytest.raises(CodecError, match="unknown compression 7"):
        decode(meta, b"")


def test_bad_blobs_and_options_are_named() -> None:
    pixels = ramp(8, (10, 12), "uint16")
    with pytest.raises(CodecError, match="shorter than its 12-byte header"):
        bitshuffle_lz4_decode(b"abc", "uint16", (10, 12))
    with pytest.raises(CodecError, match="header says 240 bytes"):
        bitshuffle_lz4_decode(bitshuffle_lz4_encode(pixels), "uint16", (20, 12))
    with pytest.raises(CodecError, match="blosc2"):
        blosc2_decode(b"not a blosc chunk at all", "uint16", (10, 12))
    with pytest.raises(CodecError, match="holds 240 bytes"):
        blosc2_decode(blosc2_encode(pixels), "uint16", (20, 12))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        check_block_bytes(100, 2)
    with pytest.raises(ValueError, match="must be 0"):
        check_block_bytes(-8, 1)
    with pytest.raises(ValueError, match="level 12"):
        blosc2_encode(pixels, level=12)


def test_truncated_or_corrupt_bitshuffle_blobs_are_refused_not_crashing() -> None:
    pixels = ramp(8, (100, 123), "uint16")  # 12300 elements: 3 blocks of 4096, 12 in a short block, 4 raw
    blob = bitshuffle_lz4_encode(pixels)
    assert np.array_equal(bitshuffle_lz4_decode(blob, "uint16", (100, 123)), pixels)
    for cut in (13, 100, len(blob) - 1):
        with pytest.raises(CodecError):
            bitshuffle_lz4_decode(blob[:cut], "uint16", (100, 123))
    corrupt = blob.copy()
    corrupt[12:16] = 255  # first block claims 4 GB
    with pytest.raises(CodecError, match="runs past the end"):
        bitshuffle_lz4_decode(corrupt, "uint16", (100, 123))


def test_encoders_are_set_up_for_threads() -> None:
    """What lets -t N compress in parallel: blosc2 releases the GIL (set on import of the codecs)
    and single_threaded_openmp() limits bitshuffle's OpenMP team of the calling thread to 1."""
    import threading

    import blosc2

    from stddaq.formats import compression

    assert blosc2.set_releasegil(True) is True  # it was already on
    seen: list[int] = []

    def worker() -> None:
        assert compression.single_threaded_openmp()
        seen.extend(lib.omp_get_max_threads() for lib in compression._openmp_runtimes())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen and set(seen) == {1}


def _blosc2_at(pixels: np.ndarray, out: np.ndarray) -> int:
    """blosc2_encoder_at's encoder called with the arrays' addresses, as the stage calls it."""
    from stddaq.formats.compression import blosc2_encoder_at
    return blosc2_encoder_at(5)(pixels.ctypes.data, pixels.nbytes, pixels.itemsize, out.ctypes.data, out.nbytes)


def test_encode_into_writes_the_chunk_or_says_it_does_not_fit() -> None:
    from stddaq.formats.compression import _blosc2_direct, bitshuffle_lz4_encode_into, blosc2_encode_into

    # blosc2 writes straight into ``out`` through libblosc2 (checked against compress2 at load)
    assert _blosc2_direct() is not None
    for shape, dtype in (((30, 40), "uint16"), ((7, 13), "uint8"), ((64, 48), "float32")):
        pixels = ramp(4, shape, dtype)
        for encode_into, make in ((bitshuffle_lz4_encode_into, bitshuffle_lz4_encode),
                                  (blosc2_encode_into, blosc2_encode), (_blosc2_at, blosc2_encode)):
            expected = np.frombuffer(make(pixels), np.uint8)  # byte for byte what the plain encoder makes
            out = np.full(expected.nbytes + 16, 0xAB, np.uint8)
            n_bytes = encode_into(pixels, out)
            assert n_bytes == expected.nbytes and np.array_equal(out[:n_bytes], expected)
            assert (out[n_bytes:] == 0xAB).all()
            small = np.full(n_bytes - 1, 0xCD, np.uint8)
            assert encode_into(pixels, small) == 0
            if encode_into is bitshuffle_lz4_encode_into:  # blosc2 may have written part of a chunk
                assert (small == 0xCD).all()
        noise = np.random.default_rng(3).integers(0, 1 << 16, shape, dtype=np.uint16)
        for encode_into in (bitshuffle_lz4_encode_into, blosc2_encode_into, _blosc2_at):
            assert encode_into(noise, np.empty(noise.nbytes, np.uint8)) == 0


def test_check_chunk_reads_the_size_a_header_holds() -> None:
    from stddaq.formats import compression

    pixels = np.arange(24 * 16, dtype=np.uint16).reshape(24, 16)
    n_bytes = pixels.nbytes
    shuffled = compression.bitshuffle_lz4_encode(pixels)
    packed = np.frombuffer(compression.blosc2_encode(pixels), np.uint8)
    compression.check_chunk(ImageMetadataCompression.h5bitshuffle_lz4, shuffled, n_bytes, 2)
    compression.check_chunk(ImageMetadataCompression.blosc2, packed, n_bytes, 2)
    cases = [
        (ImageMetadataCompression.h5bitshuffle_lz4, shuffled, n_bytes * 2, "chunk holds 768 bytes of pixels, the image has 1536"),
        (ImageMetadataCompression.h5bitshuffle_lz4, shuffled[:8], n_bytes, "shorter than its 12-byte header"),
        (ImageMetadataCompression.h5bitshuffle_lz4, np.concatenate([shuffled[:8], np.frombuffer(b"\0\0\0\x0a", np.uint8),
                                                                    shuffled[12:]]), n_bytes, "block size 10 bytes"),
        (ImageMetadataCompression.blosc2, packed, n_bytes // 2, "chunk holds 768 bytes of pixels, the image has 384"),
        (ImageMetadataCompression.blosc2, packed[:-1], n_bytes, f"header says {packed.nbytes} bytes, the blob has"),
        (ImageMetadataCompression.blosc2, packed[:10], n_bytes, "shorter than a chunk header"),
        (ImageMetadataCompression.none, packed, n_bytes, "is not a compressed chunk"),
    ]
    for kind, blob, expected, message in cases:
        with pytest.raises(compression.CodecError, match=message):
            compression.check_chunk(kind, blob, expected, 2)


def test_blosc2_into_less_room_than_a_chunk_header_does_not_fit() -> None:
    """An image of a few bytes in a slot of its size: under blosc2's 32-byte header, libblosc2
    answers an error (-35), which is "does not fit" (the stage counts too_big), not a failure."""
    from stddaq.formats.compression import blosc2_encode_into

    for n_bytes in (1, 8, 31):
        pixels = np.arange(n_bytes, dtype=np.uint8)
        assert blosc2_encode_into(pixels, np.zeros(n_bytes, np.uint8)) == 0
        assert _blosc2_at(pixels, np.zeros(n_bytes, np.uint8)) == 0
    pixels = np.arange(8, dtype=np.uint8)
    assert blosc2_encode_into(pixels, np.zeros(64, np.uint8)) == len(blosc2_encode(pixels))
