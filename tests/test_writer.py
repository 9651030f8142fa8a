"""std_det_writer as a real subprocess, driven through its real ipc sockets by a test driver."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers filters 32008/32026 for reading
import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.bus import ImagePublisher, image_metadata
from stddaq.bus.sockets import unlink_ipc
from stddaq.formats.compression import bitshuffle_lz4_encode, blosc2_encode
from stddaq.patterns import Noise, ramp
from stddaq.protocol import (
    CloseFile,
    ConfirmLastImageWritten,
    CreateFileCommand,
    ImageMetadataCompression,
    ImageMetadataStatus,
    RecordImage,
    ResponseCode,
    WriterAction,
    WriterResponse,
)

WRITER = "stddaq.services.writer"


class FakeDriver:
    """The driver's side of one writer: PUSH bound on driver-<i>, PULL connected to writer-<i>."""

    def __init__(self, config, index: int | str = 0) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.address = config.ipc_address(f"driver-{index}")
        self.push.bind(self.address)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.connect(config.ipc_address(f"writer-{index}"))

    def send(self, action: WriterAction) -> None:
        assert self.push.poll(10_000, zmq.POLLOUT), "the writer does not take commands"
        self.push.send(action.SerializeToString())

    def answer(self, timeout: float = 15) -> WriterResponse:
        assert self.pull.poll(timeout * 1000), "no answer from the writer"
        return WriterResponse.FromString(self.pull.recv())

    def create(self, path: Path | str, user_id: int = 0) -> WriterResponse:
        self.send(WriterAction(create_file=CreateFileCommand(path=str(path), writer_id=user_id)))
        return self.answer()

    def record(self, metadata) -> None:
        self.send(WriterAction(record_image=RecordImage(image_metadata=metadata)))

    def confirm(self) -> WriterResponse:
        self.send(WriterAction(confirm_last_image=ConfirmLastImageWritten()))
        return self.answer()

    def close_file(self) -> WriterResponse:
        self.send(WriterAction(close_file=CloseFile()))
        return self.answer()

    def close(self) -> None:
        self.push.close(0)
        self.pull.close(0)
        self.ctx.term()
        unlink_ipc(self.address)


@pytest.fixture
def driver():
    made: list[FakeDriver] = []

    def make(config, index: int | str = 0) -> FakeDriver:
        made.append(FakeDriver(config, index))
        return made[-1]

    yield make
    for d in made:
        d.close()


def _publish(publisher: ImagePublisher, config, image_id: int, pixels=None, status=ImageMetadataStatus.good_image):
    metadata = image_metadata(config, image_id)
    metadata.status = status
    publisher.publish_image(metadata, ramp(image_id, config.shape, config.dtype) if pixels is None else pixels)
    return metadata


def test_records_images_from_the_ram_buffer_exactly(make_config, service, driver, tmp_path) -> None:
    config, path = make_config(number_of_writers=1, ram_buffer_slots=64, gpfs_block_size=48 * 32 * 2 * 5)
    with ImagePublisher(config) as publisher:
        proc = service(WRITER, path, 0)
        d = driver(config)
        answer = d.create(tmp_path / "file0.h5")
        assert answer.code == ResponseCode.SUCCESS, answer.reason
        ids = list(range(1000, 1023))
        for image_id in ids:
            d.record(_publish(publisher, config, image_id,
                              status=ImageMetadataStatus.missing_packets if image_id == 1005 else ImageMetadataStatus.good_image))
        answer = d.confirm()
        assert answer.code == ResponseCode.SUCCESS, answer.reason
        with h5py.File(tmp_path / "file0.h5", "r", swmr=True) as f:  # readable while open: all 23 there
            assert f[f"{config.detector_name}/data"].shape == (23, *config.shape)
        answer = d.close_file()
        assert answer.code == ResponseCode.SUCCESS, answer.reason
    with h5py.File(tmp_path / "file0.h5", "r") as f:
        data = f[f"{config.detector_name}/data"]
        meta = f[f"{config.detector_name}/metadata"][:]
        assert data.shape == (23, *config.shape) and data.dtype == config.dtype and data.chunks == (5, *config.shape)
        for k, image_id in enumerate(ids):
            assert np.array_equal(data[k], ramp(image_id, config.shape, config.dtype))
    assert list(meta["image_id"]) == ids
    assert list(meta["status"]) == [2 if i == 1005 else 1 for i in ids]
    proc.stop()
    assert not os.path.exists(config.ipc_address("writer-0")[len("ipc://"):])


def test_a_second_writer_of_the_same_id_never_connects_for_commands(make_config, service, driver) -> None:
    """A second `std_det_writer <cfg> 0` connected its command socket before it found the answer
    socket taken: for that moment the driver's PUSH had two peers and handed it images, which
    it took away when it exited (11 of 6000 images in no file, the run said file_saved)."""
    from stddaq.errors import BusError
    from stddaq.services.writer import Writer

    config, path = make_config(number_of_writers=1)
    d = driver(config)
    monitor = d.push.get_monitor_socket(zmq.EVENT_ACCEPTED)
    try:
        service(WRITER, path, 0)
        assert monitor.poll(20_000), "the writer did not connect"
        monitor.recv_multipart()
        second = Writer(config, 0)
        with pytest.raises(BusError, match="another process"):
            second.start()
        assert not monitor.poll(500), "the second writer connected to the driver's command socket"
    finally:
        d.push.disable_monitor()
        monitor.close(0)


@pytest.mark.parametrize("suffix,compression", [("h5bitshuffle-lz4", ImageMetadataCompression.h5bitshuffle_lz4),
                                                ("blosc2", ImageMetadataCompression.blosc2)])
def test_compressed_source_is_stored_as_is_and_decodes_with_hdf5plugin(make_config, service, driver, tmp_path,
                                                                       suffix, compression) -> None:
    config, path = make_config(number_of_writers=1, image_pixel_height=64, image_pixel_width=96)
    noise = Noise(config.shape, config.dtype)

    def image(image_id: int) -> np.ndarray:
        return noise.fill(image_id, np.empty(config.shape, config.dtype)) + np.uint16(image_id)

    encode = bitshuffle_lz4_encode if suffix == "h5bitshuffle-lz4" else blosc2_encode
    blobs = {}
    with ImagePublisher(config, suffix) as publisher:
        service(WRITER, path, 0, "-s", suffix)
        d = driver(config)
        assert d.create(tmp_path / "c0.h5").code == ResponseCode.SUCCESS
        for image_id in range(12):
            metadata = image_metadata(config, image_id)
            if image_id == 7:  # a bad image the compressor forwarded raw: the writer compresses it
                metadata.status = ImageMetadataStatus.missing_packets
                publisher.publish_image(metadata, image(image_id))
            else:
                metadata.compression = compression
                blob = encode(image(image_id))
                blobs[image_id] = bytes(blob)
                publisher.publish_image(metadata, blob)
            d.record(metadata)
        answer = d.close_file()
        assert answer.code == ResponseCode.SUCCESS, answer.reason
    with h5py.File(tmp_path / "c0.h5", "r") as f:
        data = f[f"{config.detector_name}/data"]
        assert data.chunks == (1, *config.shape)
        assert str(data._filters and list(data._filters)[0]) == ("32008" if suffix == "h5bitshuffle-lz4" else "32026")
        for image_id in range(12):
            assert np.array_equal(data[image_id], image(image_id)), image_id
        if suffix == "h5bitshuffle-lz4":
            _, stored = data.id.read_direct_chunk((0, 0, 0))
            assert stored == blobs[0]  # written as it came, not recompressed


def test_overwritten_image_is_reported_never_written(make_config, service, driver, tmp_path) -> None:
    config, path = make_config(number_of_writers=1, ram_buffer_slots=8)
    with ImagePublisher(config) as publisher:
        service(WRITER, path, 0)
        d = driver(config)
        assert d.create(tmp_path / "f.h5").code == ResponseCode.SUCCESS
        stale = _publish(publisher, config, 0)
        for image_id in range(1, 9):  # slot 0 now holds image 8
            _publish(publisher, config, image_id)
        d.record(stale)
        d.record(image_metadata(config, 8))
        answer = d.confirm()
        assert answer.code == ResponseCode.FAILURE
        assert "1 image(s) not written" in answer.reason and "image 0: not in the RAM buffer: overwritten" in answer.reason
        assert d.confirm().code == ResponseCode.SUCCESS  # reported once
        assert d.close_file().code == ResponseCode.SUCCESS
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert list(f[f"{config.detector_name}/metadata"]["image_id"]) == [8]
        assert np.array_equal(f[f"{config.detector_name}/data"][0], ramp(8, config.shape, config.dtype))


@contextlib.contextmanager
def _a_file_of_a_writer(make_config, service, driver, path: Path):
    """(config, its source's publisher, a FakeDriver) of a writer process (64 slots) with ``path`` created."""
    config, config_path = make_config(number_of_writers=1, ram_buffer_slots=64)
    with ImagePublisher(config) as publisher:
        service(WRITER, config_path, 0)
        d = driver(config)
        assert d.create(path).code == ResponseCode.SUCCESS
        yield config, publisher, d


def test_an_image_its_source_wrote_again_in_a_new_run_is_reported_never_written(make_config, service, driver,
                                                                                 tmp_path) -> None:
    """The same id of the source's next run in the slot (it began its ids again before the writer
    got there) passed the guard: the file got run 2's pixels under run 1's metadata. A file holds
    one run; a slot of another run is lost."""
    with _a_file_of_a_writer(make_config, service, driver, tmp_path / "f.h5") as (config, publisher, d):
        first_run = [_publish(publisher, config, image_id) for image_id in range(4)]
        for image_id in range(2):
            d.record(first_run[image_id])
        assert d.confirm().code == ResponseCode.SUCCESS
        for image_id in range(4):  # run 2 begins at 0: slots 0-3 hold its images now
            _publish(publisher, config, image_id, pixels=ramp(image_id + 100, config.shape, config.dtype))
        for image_id in range(2, 4):
            d.record(first_run[image_id])
        answer = d.confirm()
        assert answer.code == ResponseCode.FAILURE
        assert "2 image(s) not written" in answer.reason and "image 2: its slot in the RAM buffer holds image 2 of " \
            "another run of its writer (2) than this file records (1)" in answer.reason
        assert d.close_file().code == ResponseCode.SUCCESS
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert list(f[f"{config.detector_name}/metadata"]["image_id"]) == [0, 1]
        for k in range(2):
            assert np.array_equal(f[f"{config.detector_name}/data"][k], ramp(k, config.shape, config.dtype))


def test_a_writer_a_run_behind_at_its_files_first_image_takes_the_run_the_driver_read(make_config, service, driver,
                                                                                      tmp_path) -> None:
    """A writer behind by a whole run at a file's first image took the run its slot held then
    (the next run's) for the file's: the file got run 2's pixels under run 1's metadata as good
    (review 23, 10 of 10 rows). The driver says each image's run with record_image."""
    with _a_file_of_a_writer(make_config, service, driver, tmp_path / "f.h5") as (config, publisher, d):
        first_run = [_publish(publisher, config, image_id) for image_id in range(4)]
        for image_id in range(4):  # run 2 rewrites them all before the writer reads the first
            _publish(publisher, config, image_id, pixels=ramp(image_id + 100, config.shape, config.dtype))
        for metadata in first_run:
            d.send(WriterAction(record_image=RecordImage(image_metadata=metadata, run=1)))
        d.send(WriterAction(record_image=RecordImage(image_metadata=image_metadata(config, 3), run=2)))
        answer = d.confirm()
        assert answer.code == ResponseCode.FAILURE
        assert "4 image(s) not written" in answer.reason and "image 0: its slot in the RAM buffer holds image 0 of " \
            "another run of its writer (2) than the driver read (1)" in answer.reason
        assert d.close_file().code == ResponseCode.SUCCESS
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert list(f[f"{config.detector_name}/metadata"]["image_id"]) == [3]
        assert np.array_equal(f[f"{config.detector_name}/data"][0], ramp(103, config.shape, config.dtype))


def test_bad_commands_get_failure_and_the_writer_goes_on(make_config, service, driver, tmp_path) -> None:
    config, path = make_config(number_of_writers=2)
    with ImagePublisher(config) as publisher:
        proc = service(WRITER, path, 1)
        d = driver(config, 1)
        d.push.send(b"\xff\xff garbage")
        answer = d.answer()
        assert answer.code == ResponseCode.FAILURE and "not a WriterAction" in answer.reason
        d.push.send(b"")
        assert "no action set" in d.answer().reason
        answer = d.create(tmp_path / "missing" / "f.h5")
        assert answer.code == ResponseCode.FAILURE and "does not exist" in answer.reason
        (tmp_path / "afile").write_text("x")
        answer = d.create(tmp_path / "afile" / "f.h5")
        assert answer.code == ResponseCode.FAILURE and "not a directory" in answer.reason
        answer = d.create("relative.h5")
        assert answer.code == ResponseCode.FAILURE and "not absolute" in answer.reason
        d.record(_publish(publisher, config, 3))  # no file open
        answer = d.confirm()
        assert answer.code == ResponseCode.FAILURE and "image 3: no file open" in answer.reason
        wrong = _publish(publisher, config, 4)
        wrong.width = 7
        assert d.create(tmp_path / "ok.h5").code == ResponseCode.SUCCESS
        d.record(wrong)
        answer = d.close_file()
        assert answer.code == ResponseCode.FAILURE and "image 4" in answer.reason and "48x7" in answer.reason
        assert d.close_file().code == ResponseCode.SUCCESS  # no file open: nothing to do
        assert proc.proc.poll() is None


def test_writer_id_not_needed_exits_0_and_bad_ids_exit_2(make_config, service) -> None:
    config, path = make_config(number_of_writers=2)
    assert service(WRITER, path, 2).wait(30) == 0
    for bad in ("-1", "x", "\uff11"):  # a fullwidth 1: Python's int() takes it
        proc = service(WRITER, path, bad)
        assert proc.wait(30) == 2
        err = proc.output()[1]
        assert len(err.strip().splitlines()) == 1 and "writer_id" in err, err


def test_metadata_writer_keeps_every_field(make_config, service, driver, tmp_path) -> None:
    config, path = make_config(detector_type="pco", number_of_writers=0)
    service(WRITER, path, "meta")
    d = driver(config, "meta")
    assert d.create(tmp_path / "fileMeta.h5").code == ResponseCode.SUCCESS
    for image_id in range(5):
        metadata = image_metadata(config, image_id)
        metadata.pco.global_timestamp_sec = 1_700_000_000 + image_id
        metadata.pco.global_timestamp_ns = 17
        metadata.pco.bsread_name = f"{config.detector_name}:FPICTURE"
        d.record(metadata)
    answer = d.close_file()
    assert answer.code == ResponseCode.SUCCESS, answer.reason
    with h5py.File(tmp_path / "fileMeta.h5", "r") as f:
        rows = f[f"{config.detector_name}/metadata"][:]
    assert list(rows["image_id"]) == list(range(5))
    assert list(rows["pco_global_timestamp_sec"]) == [1_700_000_000 + i for i in range(5)]
    assert set(rows["pco_bsread_name"]) == {f"{config.detector_name}:FPICTURE".encode()}
    assert set(rows["height"]) == {48} and set(rows["status"]) == {1}


# ---------------------------------------------------------------------- disk full
def _mount_tmpfs(size: str) -> Path | None:
    """A small tmpfs of our own (root only); None where mounting is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("STDDAQ_TEST_NO_MOUNT"):
        return None
    target = Path(tempfile.mkdtemp(prefix="stddaq-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                          capture_output=True, timeout=30)
    if done.returncode != 0:
        target.rmdir()
        return None
    return target


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
    target.rmdir()


def test_disk_full_answers_failure_and_the_file_stays_readable(make_config, service, driver, tmp_path) -> None:
    """On a 3 MiB tmpfs where root can mount one; elsewhere under RLIMIT_FSIZE of 3 MiB."""
    config, path = make_config(number_of_writers=1, image_pixel_height=128, image_pixel_width=256,
                               gpfs_block_size=128 * 256 * 2 * 2, ram_buffer_slots=32)
    mount = _mount_tmpfs("3m")
    directory = mount if mount is not None else tmp_path
    limited = None
    try:
        with ImagePublisher(config) as publisher:
            if mount is not None:
                service(WRITER, path, 0)
            else:
                code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20)); "
                        "from stddaq.services.writer import main; sys.exit(main(sys.argv[1:]))")
                limited = subprocess.Popen([sys.executable, "-c", code, str(path), "0"],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            d = driver(config)
            assert d.create(directory / "full.h5").code == ResponseCode.SUCCESS
            answers = []
            for image_id in range(60):  # 60 x 64 KiB = 3.75 MiB > 3 MiB
                d.record(_publish(publisher, config, image_id))
                if image_id % 10 == 9:
                    answers.append(d.confirm())
            failed = [a for a in answers if a.code == ResponseCode.FAILURE]
            assert failed, "the disk never got full"
            assert "disk full" in failed[0].reason or "file size limit" in failed[0].reason, failed[0].reason
            close = d.close_file()
            assert close.code in (ResponseCode.SUCCESS, ResponseCode.FAILURE)
        with h5py.File(directory / "full.h5", "r") as f:
            data = f[f"{config.detector_name}/data"]
            ids = list(f[f"{config.detector_name}/metadata"]["image_id"])
            assert 10 <= len(ids) < 60 and ids == list(range(len(ids))) and data.shape[0] == len(ids)
            for k in ids:
                assert np.array_equal(data[k], ramp(k, config.shape, config.dtype))
    finally:
        if limited is not None:
            limited.terminate()
            limited.communicate(timeout=30)
        if mount is not None:
            _umount(mount)


def _three_images_written(publisher, config, path, service, driver, file: Path):
    """A writer process with ``file`` open and images 0..2 in it, confirmed: (process, driver)."""
    proc = service(WRITER, path, 0)
    d = driver(config)
    assert d.create(file).code == ResponseCode.SUCCESS
    for image_id in range(3):
        d.record(_publish(publisher, config, image_id))
    assert d.confirm().code == ResponseCode.SUCCESS
    return proc, d


def test_sigterm_closes_the_open_file(make_config, service, driver, tmp_path) -> None:
    config, path = make_config(number_of_writers=1)
    with ImagePublisher(config) as publisher:
        proc, _ = _three_images_written(publisher, config, path, service, driver, tmp_path / "f.h5")
        assert proc.stop() == 0
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f[f"{config.detector_name}/data"].shape[0] == 3


@pytest.mark.parametrize("index", [0, "meta"])
@pytest.mark.parametrize("field,value", [("status", -1), ("compression", -3)])
def test_a_metadata_value_the_file_cannot_hold_loses_that_image_only(make_config, tmp_path, index, field,
                                                                      value) -> None:
    """Enum fields carry any int32 on the wire; the file's unsigned columns cannot hold -1. The
    image is counted failed with the reason, and the writer (in-process here) goes on."""
    from stddaq.services.writer import Writer

    config, _ = make_config(number_of_writers=1, ram_buffer_slots=16)
    with ImagePublisher(config) as source:
        writer = Writer(config, index).start()
        answers: list = []
        writer._answer = lambda ok, reason="": answers.append((ok, reason))
        try:
            writer.handle(WriterAction(create_file=CreateFileCommand(path=str(tmp_path / "f.h5"))).SerializeToString())
            for image_id in (5, 6):
                metadata = image_metadata(config, image_id)
                source.publish_image(metadata, ramp(image_id, config.shape, config.dtype))
                if image_id == 5:
                    setattr(metadata, field, value)
                writer.handle(WriterAction(record_image=RecordImage(image_metadata=metadata)).SerializeToString())
            totals = writer.stats()
            assert totals["failed"] == 1 and totals["processed_times"] == 1
        finally:
            writer.close()


def _in_process_writer(config, tmp_path, suffix: str = "image"):
    from stddaq.services.writer import Writer

    writer = Writer(config, 0, suffix=suffix).start()
    answers: list = []
    writer._answer = lambda ok, reason="": answers.append((ok, reason))
    writer.handle(WriterAction(create_file=CreateFileCommand(path=str(tmp_path / "f.h5"))).SerializeToString())
    assert answers == [(True, "")]
    return writer, answers


def _record(writer, metadata) -> None:
    writer.handle(WriterAction(record_image=RecordImage(image_metadata=metadata)).SerializeToString())


@pytest.mark.parametrize("overwritten", [True, False])
def test_images_held_from_a_buffer_its_source_replaced_are_checked_before_it_goes(make_config, tmp_path,
                                                                                overwritten) -> None:
    """The writer keeps recent images in their slots (zero copy) until their chunk is written.
    When the source re-creates its buffer (a restarted simulator), the old mapping is let go:
    the images still held are checked and copied first. Before, the closed buffer vouched for
    every slot, and images overwritten before the restart went into the file as good with another
    image's pixels (ids 0-9 stored with the pixels of 64-73)."""
    config, _ = make_config(number_of_writers=1, ram_buffer_slots=64)
    source = ImagePublisher(config).open()
    writer, answers = _in_process_writer(config, tmp_path)
    try:
        for image_id in range(10):
            _record(writer, _publish(source, config, image_id))
        if overwritten:  # the source runs on over the slots of 0..9 (the driver skipped those ids)
            for image_id in range(64, 74):
                _publish(source, config, image_id)
        source.close()
        source = ImagePublisher(config).open()  # a new source: a new buffer under the same name
        _record(writer, _publish(source, config, 100))
        writer.handle(WriterAction(close_file=CloseFile()).SerializeToString())
        totals = writer.stats()
    finally:
        writer.close()
        source.close()
    kept = [100] if overwritten else [*range(10), 100]
    with h5py.File(tmp_path / "f.h5", "r") as f:
        ids = [int(i) for i in f[f"{config.detector_name}/metadata"]["image_id"]]
        data = f[f"{config.detector_name}/data"][:]
    assert ids == kept
    for row, image_id in enumerate(ids):
        assert np.array_equal(data[row], ramp(image_id, config.shape, config.dtype)), image_id
    assert totals["lost"] == 10 - len(kept) + 1
    if overwritten:
        assert not answers[-1][0] and "image 0: overwritten in the RAM buffer" in answers[-1][1]


@pytest.mark.parametrize("suffix", ["h5bitshuffle-lz4", "blosc2"])
@pytest.mark.parametrize("shape", [(12, 8), (48, 16)])  # a quarter of the image, twice the image
def test_a_compressed_image_whose_blob_holds_another_size_is_refused(make_config, tmp_path, suffix, shape) -> None:
    """Metadata says 24x16 uint16; the blob holds another number of pixels (cut short, another
    detector's). Stored as it is, it read back as garbage (or not at all) with status good."""
    config, _ = make_config(number_of_writers=1, ram_buffer_slots=16, image_pixel_height=24,
                            image_pixel_width=16)
    encode = bitshuffle_lz4_encode if suffix == "h5bitshuffle-lz4" else blosc2_encode
    compression = (ImageMetadataCompression.h5bitshuffle_lz4 if suffix == "h5bitshuffle-lz4"
                   else ImageMetadataCompression.blosc2)
    with ImagePublisher(config, suffix) as source:
        writer, answers = _in_process_writer(config, tmp_path, suffix)
        try:
            for image_id, pixels in ((1, ramp(1, shape, config.dtype)), (2, ramp(2, config.shape, config.dtype))):
                blob = np.frombuffer(encode(pixels), np.uint8)
                metadata = image_metadata(config, image_id)
                metadata.compression, metadata.size = compression, blob.nbytes
                source.begin(image_id)[:blob.nbytes] = blob
                source.publish(metadata)
                _record(writer, metadata)
            writer.handle(WriterAction(close_file=CloseFile()).SerializeToString())
            totals = writer.stats()
        finally:
            writer.close()
    assert totals["failed"] == 1 and totals["processed_times"] == 1, (dict(totals), answers)
    assert "image 1:" in answers[-1][1] and "chunk holds" in answers[-1][1], answers
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert [int(i) for i in f[f"{config.detector_name}/metadata"]["image_id"]] == [2]
        assert np.array_equal(f[f"{config.detector_name}/data"][0], ramp(2, config.shape, config.dtype))


def test_images_of_another_channel_than_the_writers_are_refused(make_config, tmp_path) -> None:
    """A driver on the raw channel (-s image, the default) with writers on h5bitshuffle-lz4: the
    writer read each compressed slot as if it held pixels and stored the blob's bytes as good
    images, and the run said file_saved."""
    config, _ = make_config(number_of_writers=1, ram_buffer_slots=16, image_pixel_height=24,
                            image_pixel_width=16)
    with ImagePublisher(config, "h5bitshuffle-lz4") as compressed:
        writer, answers = _in_process_writer(config, tmp_path, "h5bitshuffle-lz4")
        try:
            for image_id, status in ((1, ImageMetadataStatus.good_image), (2, ImageMetadataStatus.missing_packets)):
                pixels = ramp(image_id, config.shape, config.dtype)
                blob = np.frombuffer(bitshuffle_lz4_encode(pixels), np.uint8)
                metadata = image_metadata(config, image_id)
                metadata.compression, metadata.size = ImageMetadataCompression.h5bitshuffle_lz4, blob.nbytes
                compressed.begin(image_id)[:blob.nbytes] = blob
                compressed.publish(metadata)
                raw = image_metadata(config, image_id)  # what the raw channel said of this image
                raw.status = status
                _record(writer, raw)
            writer.handle(WriterAction(close_file=CloseFile()).SerializeToString())
            totals = writer.stats()
        finally:
            writer.close()
    assert totals["failed"] == 1, (dict(totals), answers)
    assert (f"image 1: it is not compressed, but this writer reads {config.channel('h5bitshuffle-lz4')}, whose good "
            "images are h5bitshuffle_lz4: the driver and the writers must read the same channel (their -s)"
            in answers[-1][1]), answers
    with h5py.File(tmp_path / "f.h5", "r") as f:  # (a bad image, raw, is what a stage forwards: taken)
        assert 1 not in [int(i) for i in f[f"{config.detector_name}/metadata"]["image_id"]]


def test_an_unforeseen_error_while_closing_still_closes_the_file_and_sockets(make_config, tmp_path,
                                                                              monkeypatch) -> None:
    """Only StorageError was caught: any other exception out of the last flush left the HDF5 file
    open and the sockets too, and the writer's close() then hung in the context's term()."""
    from stddaq.storage import hdf5

    config, _ = make_config(number_of_writers=1, ram_buffer_slots=16)
    with ImagePublisher(config) as source:
        writer, _answers = _in_process_writer(config, tmp_path)
        _record(writer, _publish(source, config, 1))
        h5file = writer.file._file

        def broken(self) -> None:
            raise ValueError("injected")

        monkeypatch.setattr(hdf5.ImageFile, "_write_rows", broken)
        writer.close()
    assert not h5file.id.valid and writer._pull is None and writer._push is None
    assert not os.path.exists(config.ipc_address("writer-0")[len("ipc://"):])


def _user_with_a_group() -> tuple[int, int]:
    """A system user (uid, primary gid) other than root, for the switch_user tests (root only)."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    for entry in pwd.getpwall():
        if entry.pw_uid not in (0, 65534) and entry.pw_gid not in (0, 65534):
            return entry.pw_uid, entry.pw_gid
    pytest.skip("no system user with its own group here")


def test_switch_user_writes_with_the_users_groups_and_reads_a_ring_only_root_may(make_config, service,
                                                                                 driver) -> None:
    """switch_user_active, writer_id = a user who may write the directory only through their
    group, a ring readable by root only (its source ran with umask 077). The writer switched
    only its uid: every run failed (Permission denied) in a directory the driver's pre-flight
    had accepted, and the ring, mapped after the switch, killed the writer (PermissionError).
    The file is written as the user and their group; the ring is read as the writer's user."""
    uid, gid = _user_with_a_group()
    config, path = make_config(number_of_writers=1, ram_buffer_slots=16, switch_user_active=True)
    base = Path(tempfile.mkdtemp(prefix="stddaq-switch-user-"))  # pytest's tmp_path is root's only (0700)
    os.chmod(base, 0o755)
    run_dir = base / "run"
    run_dir.mkdir()
    os.chown(run_dir, 0, gid)
    os.chmod(run_dir, 0o770)
    umask = os.umask(0o077)
    try:
        publisher = ImagePublisher(config).open()
    finally:
        os.umask(umask)
    try:
        assert os.stat(f"/dev/shm/{config.channel('image')}").st_mode & 0o077 == 0
        proc = service(WRITER, path, 0)
        d = driver(config)
        answer = d.create(run_dir / "file0.h5", user_id=uid)
        assert answer.code == ResponseCode.SUCCESS, answer.reason
        for image_id in range(3):
            d.record(_publish(publisher, config, image_id))
        assert d.confirm().code == ResponseCode.SUCCESS
        assert d.close_file().code == ResponseCode.SUCCESS
        assert proc.proc.poll() is None
        st = os.stat(run_dir / "file0.h5")
        assert (st.st_uid, st.st_gid) == (uid, gid)
        with h5py.File(run_dir / "file0.h5", "r") as f:
            data = f[f"{config.detector_name}/data"][:]
        assert len(data) == 3 and all(np.array_equal(data[k], ramp(k, config.shape, config.dtype)) for k in range(3))
        assert proc.stop() == 0
    finally:
        publisher.close()
        shutil.rmtree(base)


def test_a_writer_that_switched_user_still_ends_with_its_supervisor(make_config) -> None:
    """Under `stddaq up` a service asks the kernel for SIGTERM when the supervisor dies; the
    kernel forgets that at every change of effective uid, so a writer that had written a file
    as another user ran on, orphaned, after the supervisor was SIGKILLed."""
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    import signal

    config, path = make_config(number_of_writers=1, ram_buffer_slots=16, switch_user_active=True)
    base = Path(tempfile.mkdtemp(prefix="stddaq-pdeath-"))
    os.chmod(base, 0o755)
    os.chown(base, 12345, 12345)
    supervisor = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
env = dict(os.environ, STDDAQ_SUPERVISOR_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, "-m", {WRITER!r}, {str(path)!r}, "0"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    writer_pid = int(supervisor.stdout.readline())
    d = FakeDriver(config)
    try:
        answer = d.create(base / "f.h5", user_id=12345)
        assert answer.code == ResponseCode.SUCCESS, answer.reason
        supervisor.kill()
        supervisor.wait()

        def ended() -> bool:
            try:
                with open(f"/proc/{writer_pid}/stat") as f:
                    return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
            except FileNotFoundError:
                return True

        assert wait_until(ended, timeout=15), "the writer runs on without its supervisor"
    finally:
        if not ended():
            os.kill(writer_pid, signal.SIGKILL)
        d.close()
        shutil.rmtree(base)
        unlink_ipc(config.ipc_address("writer-0"))


def test_a_driver_gone_mid_run_gets_the_file_closed(make_config, service, driver, tmp_path) -> None:
    """A driver killed mid-run never sends close_file, and its restart knows nothing of the run:
    the file stayed open for writing (unreadable without SWMR) until the next run or shutdown."""
    config, path = make_config(number_of_writers=1, ram_buffer_slots=64)
    with ImagePublisher(config) as publisher:
        proc, d = _three_images_written(publisher, config, path, service, driver, tmp_path / "f.h5")
        d.close()  # the driver is gone (as if killed)

        def readable() -> bool:
            try:
                with h5py.File(tmp_path / "f.h5", "r") as f:  # not SWMR: refused while open for writing
                    return f[f"{config.detector_name}/data"].shape[0] == 3
            except OSError:
                return False

        assert wait_until(readable, timeout=10), "the file stays open after its driver went away"
        assert proc.proc.poll() is None
    assert proc.stop() == 0
    _, err = proc.output()
    assert "the driver went away during a run" in err
