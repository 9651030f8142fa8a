"""The HDF5 layout without sockets: chunks, filters, file size, SWMR, failure, master and Meta files."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the filters for reading
import numpy as np
import pytest

from stddaq.errors import StorageError, WriteFailed
from stddaq.formats.compression import bitshuffle_lz4_encode, blosc2_encode
from stddaq.patterns import Noise, ramp
from stddaq.protocol import GFImageMetadata, ImageMetadata, PcoImageMetadata
from stddaq.storage import ImageFile, MetadataFile, write_master
from stddaq.storage.hdf5 import (
    BITSHUFFLE_LZ4,
    BLOSC2,
    COMPRESSED_CHUNK_EXTRA,
    FILE_OVERHEAD,
    METADATA_CHUNK_ROWS,
    METADATA_RESERVE,
    _strided_runs,
    chunk_alignment,
    chunk_images,
    largest_blob,
    recording_bytes,
)

SHAPE = (48, 32)
DT = np.dtype("<u2")
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * 2


def _read(path: Path, det: str = "det") -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f[f"{det}/data"][:], f[f"{det}/metadata"][:]


@pytest.mark.parametrize("direct", [True, False])
def test_raw_images_in_whole_chunks_of_several_images(tmp_path, direct) -> None:
    path = tmp_path / "f.h5"
    with ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES + 100, direct=direct) as f:
        assert f.images_per_chunk == 4
        for image_id in range(10):
            assert f.append(image_id + 50, 1, ramp(image_id + 50, SHAPE, DT))
        assert f.count == 10 and f.written == 8  # two chunks on disk, two images in the third
    data, meta = _read(path)
    assert data.shape == (10, *SHAPE)
    assert all(np.array_equal(data[k], ramp(k + 50, SHAPE, DT)) for k in range(10))
    assert list(meta["image_id"]) == list(range(50, 60)) and set(meta["status"]) == {1}
    with h5py.File(path, "r") as h:
        assert h["det/data"].chunks == (4, *SHAPE)
        assert h["det/metadata"].dtype.names == ("image_id", "status")


def test_flush_shows_a_partly_filled_chunk_that_is_rewritten_when_full(tmp_path) -> None:
    path = tmp_path / "f.h5"
    f = ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES)
    for image_id in range(2):
        f.append(image_id, 1, ramp(image_id, SHAPE, DT))
    f.flush()
    with h5py.File(path, "r", swmr=True) as h:
        assert h["det/data"].shape[0] == 2 and np.array_equal(h["det/data"][1], ramp(1, SHAPE, DT))
    for image_id in range(2, 6):
        f.append(image_id, 1, ramp(image_id, SHAPE, DT))
    f.close()
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == list(range(6))
    assert all(np.array_equal(data[k], ramp(k, SHAPE, DT)) for k in range(6))


@pytest.mark.parametrize("compressed", [False, True])
def test_metadata_rows_across_metadata_chunks_with_flushes_between(tmp_path, compressed) -> None:
    """Metadata chunks are kept in memory and rewritten whole while they fill: rows crossing a
    chunk boundary, flushes at odd places, and a SWMR reader in between all see every row."""
    path = tmp_path / "f.h5"
    rows = METADATA_CHUNK_ROWS
    n_images = 2 * rows + 77
    flush_at = {5, rows - 1, rows, rows + 3, 2 * rows + 10}
    kw = {"compression": BITSHUFFLE_LZ4} if compressed else {"gpfs_block_size": 7 * IMAGE_BYTES}
    with ImageFile.create(path, "det", SHAPE, DT, **kw) as f:
        for k in range(n_images):
            pixels = ramp(k, SHAPE, DT)
            f.append(1000 + k, 1 + k % 3, bitshuffle_lz4_encode(pixels) if compressed else pixels)
            if k in flush_at:
                f.flush()
                with h5py.File(path, "r", swmr=True) as h:
                    meta = h["det/metadata"][:]
                assert [int(i) for i in meta["image_id"]] == [1000 + i for i in range(k + 1)]
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == [1000 + k for k in range(n_images)]
    assert [int(s) for s in meta["status"]] == [1 + k % 3 for k in range(n_images)]
    assert all(np.array_equal(data[k], ramp(k, SHAPE, DT)) for k in (0, rows - 1, rows, n_images - 1))


def test_raw_bytes_and_intact_guard(tmp_path) -> None:
    path = tmp_path / "f.h5"
    with ImageFile.create(path, "det", SHAPE, DT) as f:
        assert f.append(1, 1, ramp(1, SHAPE, DT).tobytes())
        assert not f.append(2, 1, ramp(2, SHAPE, DT), intact=lambda: False)  # overwritten while copied
        assert f.append(3, 1, ramp(3, SHAPE, DT), intact=lambda: True)
        with pytest.raises(StorageError, match="7 bytes"):
            f.append(4, 1, b"1234567")
        assert f.count == 2
    data, meta = _read(path)
    assert list(meta["image_id"]) == [1, 3] and np.array_equal(data[1], ramp(3, SHAPE, DT))


class _Ring:
    """A ring of slots in one buffer with a per-slot sequence, like RamBuffer (for borrowed appends)."""

    def __init__(self, n_slots: int) -> None:
        self.data = np.zeros((n_slots, *SHAPE), DT)
        self.seq = np.zeros(n_slots, np.int64)

    def put(self, image_id: int) -> np.ndarray:
        slot = image_id % len(self.seq)
        self.data[slot] = ramp(image_id, SHAPE, DT)
        self.seq[slot] = image_id
        return self.data[slot]

    def overwrite(self, image_id: int) -> None:
        self.put(image_id + len(self.seq))

    def intact(self, image_id: int):
        return lambda: self.seq[image_id % len(self.seq)] == image_id


def test_borrowed_slots_in_a_row_are_written_without_copy(tmp_path) -> None:
    """Whole chunks straight from the ring, a chunk across the ring's end copied, a flushed partial
    chunk copied: the file is the same as with copies."""
    ring = _Ring(10)
    path = tmp_path / "f.h5"
    with ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES) as f:
        for image_id in range(15):
            assert f.append(image_id, 1, ring.put(image_id), ring.intact(image_id), borrowed=True)
            if image_id == 3:
                assert f.written == 4 and not f._chunk[0].any()  # written from the ring, never copied
            if image_id == 12:
                f.flush()
                assert f.written == 13
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == list(range(15))
    assert all(np.array_equal(data[k], ramp(k, SHAPE, DT)) for k in range(15))


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_borrowed_slot_overwritten_is_dropped_never_written(tmp_path, when) -> None:
    ring = _Ring(8)
    dropped: list[int] = []
    path = tmp_path / "f.h5"
    f = ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES)
    f.on_dropped = lambda image_id, reason: dropped.append(image_id)
    for image_id in range(3):
        assert f.append(image_id, 1, ring.put(image_id), ring.intact(image_id), borrowed=True)
    if when == "before":
        ring.overwrite(1)  # taken, then overwritten before its chunk is written
    else:  # overwritten while the chunk is written: the second check after the write sees it
        write = f._dsid.write_direct_chunk

        class Dsid:
            def __getattr__(self, name):
                return getattr(write.__self__, name)

            def write_direct_chunk(self, offset, chunk):
                write(offset, chunk)
                ring.overwrite(1)

        f._dsid = Dsid()
    assert f.append(3, 1, ring.put(3), ring.intact(3), borrowed=True)
    assert dropped == [1] and f.count == 3 and f.written == 0
    for image_id in range(4, 6):
        f.append(image_id, 1, ring.put(image_id), ring.intact(image_id), borrowed=True)
    f.close()
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == [0, 2, 3, 4, 5]
    assert all(np.array_equal(data[k], ramp(i, SHAPE, DT)) for k, i in enumerate([0, 2, 3, 4, 5]))


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_borrowed_compressed_slot_is_written_in_place_and_taken_back_when_overwritten(tmp_path, when) -> None:
    """A compressed blob borrowed from its slot is written from the slot (no copy); one whose slot
    is overwritten before or while it is written is not kept (False), and the next image takes its
    place: the file holds exactly the intact images, decoded exact."""
    n_slots = 4
    slots = np.zeros((n_slots, IMAGE_BYTES), np.uint8)
    seq = np.full(n_slots, -1, np.int64)

    def put(image_id: int) -> np.ndarray:
        blob = bitshuffle_lz4_encode(ramp(image_id, SHAPE, DT))
        slot = image_id % n_slots
        slots[slot, :blob.size] = blob
        seq[slot] = image_id
        return slots[slot, :blob.size]

    def intact(image_id: int):
        return lambda: seq[image_id % n_slots] == image_id

    path = tmp_path / "c.h5"
    f = ImageFile.create(path, "det", SHAPE, DT, compression=BITSHUFFLE_LZ4)
    write, sources = f._dsid.write_direct_chunk, []

    class Dsid:  # sees what is written; overwrites image 1's slot while it is written ("during")
        def __getattr__(self, name):
            return getattr(write.__self__, name)

        def write_direct_chunk(self, offset, chunk):
            sources.append(chunk)
            write(offset, chunk)
            if when == "during" and seq[1] == 1:
                put(1 + n_slots)

    f._dsid = Dsid()
    assert f.append(0, 1, put(0), intact(0), borrowed=True)
    assert np.shares_memory(sources[0], slots)  # written from the slot
    blob = put(1)
    if when == "before":
        put(1 + n_slots)
    assert not f.append(1, 1, blob, intact(1), borrowed=True)
    assert f.count == 1 and f.written == 1
    for image_id in (2, 3):
        assert f.append(image_id, 1, put(image_id), intact(image_id), borrowed=True)
    # a borrowed blob that is no flat contiguous byte view (h5py would refuse it) is copied instead
    strided = np.repeat(bitshuffle_lz4_encode(ramp(4, SHAPE, DT)), 2)[::2]
    assert f.append(4, 1, strided, lambda: True, borrowed=True)
    f.close()
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == [0, 2, 3, 4]
    assert all(np.array_equal(data[k], ramp(i, SHAPE, DT)) for k, i in enumerate([0, 2, 3, 4]))


@pytest.mark.parametrize("compression,encode", [(BITSHUFFLE_LZ4, bitshuffle_lz4_encode), (BLOSC2, blosc2_encode)])
def test_compressed_blobs_decode_with_plain_h5py_and_hdf5plugin(tmp_path, compression, encode) -> None:
    path = tmp_path / "c.h5"
    noise = Noise(SHAPE, DT)
    images = [noise.fill(k, np.empty(SHAPE, DT)) + np.uint16(k) for k in range(9)]
    blobs = [encode(image) for image in images]
    with ImageFile.create(path, "det", SHAPE, DT, compression=compression) as f:
        for k, blob in enumerate(blobs):
            assert f.append(k, 1, blob)
    code = textwrap.dedent(f"""
        import h5py, hdf5plugin, numpy, sys
        with h5py.File({str(path)!r}, "r") as f:
            sys.stdout.buffer.write(f["det/data"][:].tobytes())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True).stdout
    assert np.array_equal(np.frombuffer(out, DT).reshape(9, *SHAPE), np.stack(images))
    size = os.path.getsize(path)
    assert size <= sum(len(b) for b in blobs) * 1.01 + 64 * 1024  # not padded to any alignment


@pytest.mark.parametrize("shape,n_images", [((128, 480), 300), ((1000, 1000), 20)])
def test_file_size_is_image_bytes_plus_one_percent_plus_one_chunk(tmp_path, shape, n_images) -> None:
    """gpfs_block_size 16 MiB: 123 KB images (136 per chunk) and 2 MB images (8 per chunk,
    16,000,000 bytes, which aligning to 16 MiB would pad by 5%)."""
    path = tmp_path / "big.h5"
    image = np.zeros(shape, DT)
    with ImageFile.create(path, "det", shape, DT, gpfs_block_size=16 * 1024 * 1024) as f:
        chunk_bytes = f.images_per_chunk * image.nbytes
        for image_id in range(n_images):
            image[0, 0] = image_id
            f.append(image_id, 1, image)
    size = os.path.getsize(path)
    assert size <= n_images * image.nbytes * 1.01 + chunk_bytes, (size, n_images * image.nbytes, chunk_bytes)
    with h5py.File(path, "r") as h:
        assert h["det/data"].shape[0] == n_images and int(h["det/data"][n_images - 1, 0, 0]) == n_images - 1


def test_chunk_sizing_and_alignment_rules() -> None:
    assert chunk_images(2016 * 2016 * 2, 16 << 20) == 2
    assert chunk_images(480 * 128 * 2, 16 << 20) == 136
    assert chunk_images(32 << 20, 16 << 20) == 1
    assert chunk_alignment(16 << 20, 16 << 20) == 1 << 20
    assert chunk_alignment(16 << 20, 64 << 10) == 64 << 10
    # chunks that are a multiple of a page follow one another with no padding between them
    assert chunk_alignment(136 * 480 * 128 * 2, 16 << 20) == 64 << 10
    assert chunk_alignment(2 * 2016 * 2016 * 2, 16 << 20) == 4096
    # else the largest alignment that wastes at most 0.5% per chunk
    odd = 15 * 514 * 1030 * 2 + 2  # not a multiple of a page
    alignment = chunk_alignment(odd, 16 << 20)
    assert 0 < -odd % alignment <= 0.005 * odd and alignment >= 4096


def test_swmr_reader_in_another_process_sees_the_count_grow(tmp_path) -> None:
    path = tmp_path / "live.h5"
    reader_code = textwrap.dedent(f"""
        import h5py, sys, time
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                f = h5py.File({str(path)!r}, "r", swmr=True)
                break
            except OSError:
                time.sleep(0.02)
        data = f["det/data"]
        while time.monotonic() < deadline:
            data.refresh()
            n = data.shape[0]
            if not seen or n != seen[-1]:
                seen.append(n)
                print(n, int(data[n - 1, 0, 0]) if n else -1, flush=True)
            if n >= 40:
                break
            time.sleep(0.01)
    """)
    f = ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES)
    reader = subprocess.Popen([sys.executable, "-c", reader_code], stdout=subprocess.PIPE, text=True)
    try:
        for image_id in range(40):
            f.append(image_id, 1, ramp(image_id, SHAPE, DT))
            if image_id % 10 == 9:
                f.flush()
                line = reader.stdout.readline()  # the reader saw this batch before the next is written
                n, first_pixel = map(int, line.split())
                assert n == image_id + 1 and first_pixel == int(ramp(image_id, SHAPE, DT)[0, 0]), line
        assert reader.wait(60) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.communicate()
        f.close()


def test_create_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        ImageFile.create(tmp_path / "nope" / "f.h5", "det", SHAPE, DT)
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="is not a directory"):
        ImageFile.create(tmp_path / "file" / "f.h5", "det", SHAPE, DT)
    with pytest.raises(StorageError, match="compression 7 is not allowed"):
        ImageFile.create(tmp_path / "f.h5", "det", SHAPE, DT, compression=7)
    with pytest.raises(StorageError, match="detector type 'x' is not allowed"):
        MetadataFile.create(tmp_path / "m.h5", "det", "x")


def test_a_long_bsread_name_is_cut_at_a_character_and_said(tmp_path, caplog) -> None:
    """A pco bsread_name over 128 bytes was cut without a word, mid-character: not UTF-8 any more."""
    name = "X" * 127 + "é" + "tail"
    with caplog.at_level(logging.WARNING), MetadataFile.create(tmp_path / "m.h5", "det", "pco") as meta:
        for image_id in range(2):
            meta.append(ImageMetadata(image_id=image_id, status=1, height=4, width=4, size=32, dtype=2,
                                      pco=PcoImageMetadata(bsread_name=name)))
    with h5py.File(tmp_path / "m.h5", "r") as f:
        stored = f["det/metadata"]["pco_bsread_name"]
    assert [value.decode() for value in stored] == ["X" * 127] * 2
    assert [r.getMessage() for r in caplog.records].count(
        f"{tmp_path / 'm.h5'}: bsread_name of 133 bytes stored cut to 128 ({name[:40]!r}...)") == 1


def test_disk_full_fails_before_writing_and_the_file_stays_readable(tmp_path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (test_writer covers RLIMIT_FSIZE)")
    target = tmp_path / "small"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], capture_output=True).returncode:
        pytest.skip("mount not allowed here")
    try:
        f = ImageFile.create(target / "f.h5", "det", (64, 128), DT, gpfs_block_size=2 * 64 * 128 * 2)
        with pytest.raises(WriteFailed, match="disk full") as failure:
            for image_id in range(200):
                f.append(image_id, 1, ramp(image_id, (64, 128), DT))
        lost = failure.value.image_ids
        assert len(lost) == 2 and lost[1] == lost[0] + 1  # the chunk that did not fit
        with pytest.raises(StorageError, match="failed earlier"):
            f.append(999, 1, ramp(999, (64, 128), DT))
        f.close()
        data, meta = _read(target / "f.h5")
        assert len(data) == len(meta) == lost[0] and len(data) > 20
        assert all(np.array_equal(data[k], ramp(k, (64, 128), DT)) for k in range(len(data)))
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.parametrize("compressed,flush_every", [(False, 40), (True, 0)])
def test_writers_sharing_a_disk_that_fills_leave_readable_files_and_say_every_loss(tmp_path, compressed,
                                                                                   flush_every) -> None:
    """Each file's guard spent a budget of all the free space it measured without measuring
    again: four writers on one disk together overran it, HDF5 met ENOSPC inside, and the files
    could not be closed (unreadable without h5clear), with images neither in them nor reported."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    target = tmp_path / "small"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(target)], capture_output=True).returncode:
        pytest.skip("mount not allowed here")
    shape, rng = (64, 128), np.random.default_rng(0)
    pixels = {i: rng.integers(0, 65535, shape, dtype=DT) for i in range(400)}  # incompressible
    try:
        files = [ImageFile.create(target / f"r{w}.h5", "det", shape, DT, BITSHUFFLE_LZ4 if compressed else 0,
                                  gpfs_block_size=2 * pixels[0].nbytes) for w in range(4)]
        accepted, lost = [set() for _ in files], [set() for _ in files]
        for image_id in range(400):
            w = image_id % 4
            if lost[w]:
                continue
            data = bitshuffle_lz4_encode(pixels[image_id]) if compressed else pixels[image_id]
            try:
                files[w].append(image_id, 1, data)
                accepted[w].add(image_id)
                if flush_every and len(accepted[w]) % flush_every == 0:
                    files[w].flush()
            except WriteFailed as failure:
                accepted[w].add(image_id)
                lost[w] |= set(failure.image_ids)
        assert all(lost), "the disk never filled"
        for w, file in enumerate(files):
            try:
                file.close()
            except WriteFailed as failure:
                lost[w] |= set(failure.image_ids)
        for w in range(4):
            data, meta = _read(target / f"r{w}.h5")  # plain h5py: the file was closed cleanly
            ids = [int(i) for i in meta["image_id"]]
            assert len(data) == len(ids) and set(ids) | lost[w] == accepted[w] and not set(ids) & lost[w]
            assert all(np.array_equal(data[k], pixels[i]) for k, i in enumerate(ids))
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)  # -l: a file left open fails no more


def _writer_files(directory: Path, ids_per_writer: list[list[int]], prefix: str = "run_") -> None:
    for index, ids in enumerate(ids_per_writer):
        with ImageFile.create(directory / f"{prefix}{index}.h5", "det", SHAPE, DT,
                              gpfs_block_size=3 * IMAGE_BYTES) as f:
            for image_id in ids:
                f.append(image_id, 1 if image_id % 5 else 2, ramp(image_id, SHAPE, DT))


def test_master_orders_all_writers_by_image_id_and_survives_a_move(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    ids = list(range(100, 131))  # 31 images over 3 writers, k-th recorded to writer k % 3; a 4th is empty
    _writer_files(run, [ids[0::3], ids[1::3], ids[2::3], []])
    with MetadataFile.create(run / "run_Meta.h5", "det", "gigafrost") as meta:
        for image_id in ids:
            meta.append(ImageMetadata(image_id=image_id, status=1, height=48, width=32, size=IMAGE_BYTES, dtype=2,
                                      gf=GFImageMetadata(scan_id=3, frame_timestamp=image_id * 10, store_image=True)))
    master = write_master(run, "run_", "det", 4, meta_file="run_Meta.h5")
    assert master == run / "run__master.h5"
    moved = tmp_path / "moved"
    run.rename(moved)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with h5py.File(moved / "run__master.h5", "r") as f:
            data = f["det/data"]
            assert data.shape == (31, *SHAPE) and data.is_virtual
            assert all(np.array_equal(data[k], ramp(image_id, SHAPE, DT)) for k, image_id in enumerate(ids))
            meta = f["det/metadata"][:]
            assert list(meta["image_id"]) == ids and list(meta["status"]) == [1 if i % 5 else 2 for i in ids]
            assert len(data.virtual_sources()) == 3  # one strided mapping per non-empty writer file
            linked = f["det/meta/metadata"][:]
            assert list(linked["image_id"]) == ids and list(linked["gf_frame_timestamp"]) == [i * 10 for i in ids]
            assert set(linked["gf_scan_id"]) == {3} and set(linked["gf_store_image"]) == {1}
    finally:
        os.chdir(cwd)


def test_master_of_irregular_and_empty_files(tmp_path) -> None:
    _writer_files(tmp_path, [[5, 1, 9], [2, 3], []])  # recording order need not be id order
    write_master(tmp_path, "run_", "det", 3)
    with h5py.File(tmp_path / "run__master.h5", "r") as f:
        assert list(f["det/metadata"]["image_id"]) == [1, 2, 3, 5, 9]
        assert all(np.array_equal(f["det/data"][k], ramp(i, SHAPE, DT)) for k, i in enumerate([1, 2, 3, 5, 9]))
    _writer_files(tmp_path, [[], []])
    write_master(tmp_path, "run_", "det", 2)
    with h5py.File(tmp_path / "run__master.h5", "r") as f:
        assert f["det/data"].shape == (0, *SHAPE) and len(f["det/metadata"]) == 0


@pytest.mark.parametrize("prefix", ["scan_100%%_", "scan_100%_", "a%b_"])
def test_master_of_a_prefix_with_percent_signs(tmp_path, prefix) -> None:
    """HDF5 reads a virtual source's file name as a printf-like pattern: with %% in the prefix
    the master's images all read as 0 after a run said file_saved; with % the master failed."""
    _writer_files(tmp_path, [[0, 2], [1, 3]], prefix)
    write_master(tmp_path, prefix, "det", 2)
    with h5py.File(tmp_path / f"{prefix}_master.h5", "r") as f:
        assert all(np.array_equal(f["det/data"][k], ramp(k, SHAPE, DT)) for k in range(4))


def test_a_master_whose_sources_do_not_read_back_is_refused(tmp_path, monkeypatch) -> None:
    """Whatever makes HDF5 miss a source file, its images would read as fill (0), silently."""
    import stddaq.storage.hdf5 as hdf5

    _writer_files(tmp_path, [[0, 2], [1, 3]])
    real = h5py.VirtualSource
    monkeypatch.setattr(hdf5.h5py, "VirtualSource", lambda name, *a, **k: real("elsewhere.h5", *a, **k))
    with pytest.raises(StorageError, match=r"cannot write master run__master.h5: its image 2 does not read back "
                                           r"as image 1 of run_0.h5 \(the virtual dataset does not find that file\)"):
        write_master(tmp_path, "run_", "det", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_0.h5", "run_1.h5"]


def test_master_errors(tmp_path) -> None:
    with pytest.raises(StorageError, match="run_0.h5 does not exist"):
        write_master(tmp_path, "run_", "det", 1)
    with pytest.raises(StorageError, match="at least one writer"):
        write_master(tmp_path, "run_", "det", 0)
    (tmp_path / "run_0.h5").write_text("not hdf5")
    with pytest.raises(StorageError, match="not a readable writer file"):
        write_master(tmp_path, "run_", "det", 1)


def test_strided_runs() -> None:
    assert _strided_runs(np.array([0, 3, 6, 9])) == [(0, 4, 0, 3)]
    assert _strided_runs(np.array([4])) == [(0, 1, 4, 1)]
    assert _strided_runs(np.array([3, 0, 4])) == [(0, 1, 3, 1), (1, 2, 0, 4)]


def test_create_on_a_full_disk_is_refused(tmp_path) -> None:
    """Under RLIMIT_FSIZE smaller than the reserve, in a subprocess (the limit is per process)."""
    code = textwrap.dedent(f"""
        import resource
        from stddaq.errors import StorageError
        from stddaq.storage import ImageFile
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            ImageFile.create({str(tmp_path / "f.h5")!r}, "det", (4, 4), "<u2")
        except StorageError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "disk full" in out and "f.h5" in out, out


def test_a_directory_the_switched_user_may_not_write_is_named(tmp_path) -> None:
    """The writer creates files under a switched effective uid; the check asked about the real
    one (root), so such a directory passed and HDF5's own 'Permission denied' came instead."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch the effective uid")
    directory = Path(tempfile.mkdtemp(prefix="root_only", dir="/tmp"))  # pytest's tmp_path is root's only
    directory.chmod(0o755)
    code = textwrap.dedent(f"""
        import os
        from stddaq.errors import StorageError
        from stddaq.storage import ImageFile
        os.seteuid(65534)
        try:
            ImageFile.create({str(directory / "f.h5")!r}, "det", (4, 4), "<u2")
        except StorageError as exc:
            print(exc)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    finally:
        directory.rmdir()
    assert f"directory {directory} is not writable by uid 65534" in out, out


def _failing_writes(dataset):
    """``dataset`` (a file's metadata), its chunk writes failing from now on (disk full)."""

    class FailingWrites:
        shape = property(lambda self: dataset.shape)
        resize = staticmethod(dataset.resize)

        class id:  # noqa: N801 - h5py's attribute name
            @staticmethod
            def write_direct_chunk(*args) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

    return FailingWrites()


def test_a_metadata_write_that_fails_leaves_no_image_without_its_row(tmp_path) -> None:
    """The data chunk is on disk but its metadata rows cannot be written: those images are
    reported lost and trimmed at close, so every image in the file keeps its metadata row."""
    path = tmp_path / "f.h5"
    f = ImageFile.create(path, "det", SHAPE, DT, gpfs_block_size=4 * IMAGE_BYTES)
    real = f._metadata
    for image_id in range(4):
        f.append(image_id, 1, ramp(image_id, SHAPE, DT))  # one whole chunk: data and rows on disk
    f._metadata = _failing_writes(real)
    for image_id in range(4, 7):
        f.append(image_id, 1, ramp(image_id, SHAPE, DT))
    with pytest.raises(WriteFailed) as failed:
        f.append(7, 1, ramp(7, SHAPE, DT))  # fills the chunk: its data is written, its rows are not
    assert failed.value.image_ids == (4, 5, 6, 7)
    f._metadata = real
    f.close()
    data, meta = _read(path)
    assert [int(i) for i in meta["image_id"]] == [0, 1, 2, 3] and data.shape[0] == 4
    assert all(np.array_equal(data[k], ramp(k, SHAPE, DT)) for k in range(4))


def test_rows_that_cannot_be_written_after_a_failure_name_their_images(tmp_path) -> None:
    """After a first failure (disk full), the rows of compressed images already on disk could
    not be written at close either: close trimmed those images away and said only 'cannot
    flush', naming none of them."""
    path = tmp_path / "c.h5"
    f = ImageFile.create(path, "det", SHAPE, DT, BITSHUFFLE_LZ4)
    real = f._metadata
    for image_id in range(5):  # on disk; their rows wait for a whole metadata chunk or a flush
        f.append(image_id, 1, bitshuffle_lz4_encode(ramp(image_id, SHAPE, DT)))

    def full(*_args) -> None:
        raise OSError(errno.ENOSPC, "disk full: 0 bytes free")

    f._guard.check = full
    with pytest.raises(WriteFailed) as first:
        f.append(5, 1, bitshuffle_lz4_encode(ramp(5, SHAPE, DT)))
    assert first.value.image_ids == (5,)

    f._metadata = _failing_writes(real)  # its writes failing now too
    with pytest.raises(WriteFailed) as closing:
        f.close()
    assert closing.value.image_ids == (0, 1, 2, 3, 4)
    data, meta = _read(path)
    assert len(data) == len(meta) == 0


def test_an_empty_compressed_blob_is_refused_without_a_row(tmp_path: Path) -> None:
    """A 0-byte blob cannot be an HDF5 chunk: refused before its row is added, so the file never
    shows a fill-value image under a real id, and the next image takes the next row."""
    file = ImageFile.create(tmp_path / "c.h5", "det", (8, 8), "uint16", BITSHUFFLE_LZ4)
    pixels = ramp(1, (8, 8), np.uint16)
    assert file.append(1, 1, bitshuffle_lz4_encode(pixels))
    with pytest.raises(StorageError, match="0 bytes"):
        file.append(2, 1, b"")
    assert file.append(3, 1, bitshuffle_lz4_encode(pixels))
    file.close()
    with h5py.File(tmp_path / "c.h5") as h5:
        assert [row[0] for row in h5["det/metadata"][:]] == [1, 3]
        assert h5["det/data"].shape[0] == 2 and np.array_equal(h5["det/data"][1], pixels)


def test_a_file_name_longer_than_the_system_allows_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="more than the 255"):
        ImageFile.create(tmp_path / ("x" * 300 + ".h5"), "det", (8, 8), "uint16")
    with pytest.raises(StorageError, match="File name too long"):
        ImageFile.create(tmp_path / ("d" * 300) / "f.h5", "det", (8, 8), "uint16")


@pytest.mark.parametrize("shape,n_images,n_writers,block,compression,detector_type", [
    ((8, 8), 3000, 2, 16 * 1024 * 1024, None, "gigafrost"),  # 128-byte images: the last chunk is most of 16 MiB
    ((128, 480), 301, 1, 16 * 1024 * 1024, None, None),  # 136 images a chunk, 64 KiB alignment
    ((8, 8), 2500, 3, 4096, None, "pco"),  # the rows weigh more than the pixels
    ((1000, 1000), 9, 2, 16 * 1024 * 1024, None, "eiger"),  # 2 MB images: 8 a chunk, 16,000,000 bytes
    ((48, 64), 200, 2, 16 * 1024 * 1024, BLOSC2, "gigafrost"),  # noise: compressed images as big as raw ones
    ((8, 8), 10_000, 2, 16 * 1024 * 1024, BLOSC2, None),  # noise: blob 32 bytes over, in a 172-byte frame
])
def test_recording_bytes_bounds_what_a_recording_takes(tmp_path, shape, n_images, n_writers, block, compression,
                                                       detector_type) -> None:
    _check_recording_bytes(tmp_path, shape, n_images, n_writers, block, compression, detector_type)


def test_recording_bytes_counts_the_holes_alignment_leaves(tmp_path, monkeypatch) -> None:
    """A raw chunk aligned to 1 MiB that follows a small object HDF5 put at the end of the file
    (a new block for the chunk indexes and the metadata rows) starts at the next MiB: a hole each
    time, counted by file systems that allocate whole blocks. With rows in chunks of 4 (1024 in
    the files) there are many of them: 20 holes in 50 data chunks of 1 MiB here."""
    from stddaq.storage import hdf5

    monkeypatch.setattr(hdf5, "METADATA_CHUNK_ROWS", 4)
    _check_recording_bytes(tmp_path, (32, 64), 12_800, 1, 1 << 20, None, None, slack_per_file=40 << 20)


def test_largest_blob_holds_every_blob_a_stage_or_a_writer_makes() -> None:
    """On noise, with any block a stage may be given (as small as 8 pixels), within the slot a
    stage fills (2 bytes a pixel for an 8-bit GigaFRoST), and with the writer's own defaults."""
    for dtype, slot_factor in ((np.uint8, 2), (np.uint16, 1), (np.uint32, 1)):
        dtype = np.dtype(dtype)
        pixels = Noise((64, 96), dtype).fill(3, np.empty((64, 96), dtype))
        pixels[:] = np.random.default_rng(5).integers(0, np.iinfo(dtype).max, pixels.shape, dtype=dtype)
        slot = pixels.nbytes * slot_factor
        shuffle_bound = largest_blob("h5bitshuffle_lz4", pixels.nbytes, dtype.itemsize, slot)
        for block_bytes in (0, 8 * dtype.itemsize, 64 * dtype.itemsize, 256 * dtype.itemsize):
            blob = bitshuffle_lz4_encode(pixels, block_bytes)
            if blob.nbytes <= slot or block_bytes == 0:  # a stage publishes only what fits; the writer any
                assert blob.nbytes <= shuffle_bound, (dtype, block_bytes, blob.nbytes, shuffle_bound)
        assert len(blosc2_encode(pixels)) <= largest_blob("blosc2", pixels.nbytes, dtype.itemsize, slot)
    # where the slot allows it, small blocks on noise go far above the pixels (why the bound is the slot)
    noise8 = np.random.default_rng(6).integers(0, 255, (64, 96), dtype=np.uint8)
    assert bitshuffle_lz4_encode(noise8, 8).nbytes > 1.5 * noise8.nbytes


def _check_recording_bytes(tmp_path, shape, n_images, n_writers, block, compression, detector_type,
                           slack_per_file: int = FILE_OVERHEAD + (1 << 20), dtype=DT, bound: int | None = None,
                           encode=blosc2_encode, slack: int = 0) -> None:
    """The driver refuses a start whose recording would not fit (SPEC 8). Counting the images'
    bytes alone let a recording through that then ended in disk full: ``recording_bytes`` (or
    ``bound``, the driver's figure) must hold every file of the recording (whole last chunks,
    alignment, rows, headers) plus the reserve each writer keeps free while it writes, and stay
    close to it (a start is not refused for room it does not need)."""
    image = np.zeros(shape, dtype)
    noise = Noise(shape, dtype)
    files = []
    for index in range(n_writers):
        path = tmp_path / f"run_{index}.h5"
        files.append(path)
        with ImageFile.create(path, "det", shape, dtype, compression=compression or 0, gpfs_block_size=block) as f:
            for image_id in range(index, n_images, n_writers):  # the k-th image to writer k % N
                if compression:
                    f.append(image_id, 1, encode(noise.fill(image_id, image)))
                else:
                    image.flat[0] = image_id % 256
                    f.append(image_id, 1, image)
    meta = None
    if detector_type:
        meta = "run_Meta.h5"
        files.append(tmp_path / meta)
        with MetadataFile.create(tmp_path / meta, "det", detector_type) as m:
            for image_id in range(n_images):
                m.append(ImageMetadata(image_id=image_id, status=1, height=shape[0], width=shape[1],
                                       size=image.nbytes, dtype=2))
    files.append(write_master(tmp_path, "run_", "det", n_writers, meta_file=meta))
    taken = sum(max(path.stat().st_size, path.stat().st_blocks * 512) for path in files)
    reserves = (n_writers + (detector_type is not None)) * METADATA_RESERVE
    if bound is None:
        blob = largest_blob("blosc2", image.nbytes, image.itemsize, image.nbytes) if compression else None
        bound = recording_bytes(n_images, image.nbytes, n_writers=n_writers, gpfs_block_size=block,
                                blob_n_bytes=blob, detector_type=detector_type)
    assert taken + reserves <= bound, (taken, reserves, bound)
    # not far above: what the bound adds per file, and a little per image
    per_image = 160 + (COMPRESSED_CHUNK_EXTRA if compression else 0)
    assert bound <= taken + reserves + len(files) * slack_per_file + n_images * per_image + slack, (taken, bound)
