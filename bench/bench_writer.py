"""Writer benchmark: one writer, images from the RAM buffer into an HDF5 file, in GB/s.

Baseline, same run, same file system: a raw ``f.write`` of the same slot bytes to a plain file.
Figures (issue 5, goal >= 0.9x the baseline and >= 1 GB/s):
- ``std_det_writer`` as a real process driven through its sockets (record_image per image, then
  confirm_last_image: the clock stops when the writer says all is written);
- ``ImageFile`` in this process with direct chunk writes and with H5Dwrite, to decide which
  the writer uses. Neither side fsyncs: both measure writing into the file system (page cache).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from common import make_config, report, spawn

from stddaq.bus import ImagePublisher, image_metadata
from stddaq.bus.sockets import unlink_ipc
from stddaq.patterns import Ramp
from stddaq.protocol import (
    ConfirmLastImageWritten,
    CreateFileCommand,
    RecordImage,
    ResponseCode,
    WriterAction,
    WriterResponse,
)
from stddaq.storage import ImageFile

REPEATS = 3


def _fill(publisher: ImagePublisher, config, n_images: int) -> None:
    ramp = Ramp(config.shape, config.dtype)
    metadata = image_metadata(config)
    pixels = np.empty(config.shape, config.dtype)
    for image_id in range(n_images):
        metadata.image_id = image_id
        publisher.publish_image(metadata, ramp.fill(image_id, pixels))


def settle() -> None:
    """Write back every dirty page before a measured run, so that no run pays for the writeback
    of the run before it (the kernel throttles writers past dirty_background_ratio: measured
    here, that swung figures between 0.4 and 4 GB/s depending on run order)."""
    os.sync()


def raw_write(publisher: ImagePublisher, n_images: int, n_bytes: int, path: Path) -> float:
    """GB/s of f.write of the slots (the baseline)."""
    settle()
    start = time.perf_counter()
    with open(path, "wb") as f:
        for image_id in range(n_images):
            f.write(publisher.buffer.slot_bytes(image_id, n_bytes))
    seconds = time.perf_counter() - start
    path.unlink()
    return n_images * n_bytes / seconds / 1e9


def image_file(publisher: ImagePublisher, config, n_images: int, path: Path, direct: bool) -> float:
    buffer = publisher.buffer
    settle()
    start = time.perf_counter()
    with ImageFile.create(path, config.detector_name, config.shape, config.dtype,
                          gpfs_block_size=config.gpfs_block_size, direct=direct) as f:
        for image_id in range(n_images):
            f.append(image_id, 1, buffer.slot_array(image_id, config.shape, config.dtype),
                     lambda i=image_id: buffer.holds(i), borrowed=True)  # as the writer: zero copy
    seconds = time.perf_counter() - start
    path.unlink()
    return n_images * config.image_n_bytes / seconds / 1e9


def writer_service(config, config_path: Path, n_images: int, path: Path) -> float:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 0)
    address = config.ipc_address("driver-0")
    push.bind(address)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(config.ipc_address("writer-0"))
    proc = spawn("-m", "stddaq.services.writer", config_path, 0)
    try:
        push.send(WriterAction(create_file=CreateFileCommand(path=str(path))).SerializeToString())
        if not pull.poll(30_000):
            raise RuntimeError("the writer did not answer create_file")
        answer = WriterResponse.FromString(pull.recv())
        if answer.code != ResponseCode.SUCCESS:
            raise RuntimeError(answer.reason)
        metadata = image_metadata(config)
        action = WriterAction(record_image=RecordImage(image_metadata=metadata))
        settle()
        start = time.perf_counter()
        for image_id in range(n_images):
            action.record_image.image_metadata.image_id = image_id
            push.send(action.SerializeToString())
        push.send(WriterAction(confirm_last_image=ConfirmLastImageWritten()).SerializeToString())
        if not pull.poll(300_000):
            raise RuntimeError("the writer did not confirm")
        seconds = time.perf_counter() - start
        answer = WriterResponse.FromString(pull.recv())
        if answer.code != ResponseCode.SUCCESS:
            print(f"  note: writer reported: {answer.reason}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        push.close(0)
        pull.close(0)
        ctx.term()
        unlink_ipc(address)
        if path.exists():
            path.unlink()
    return n_images * config.image_n_bytes / seconds / 1e9


def bench(height: int, width: int, n_images: int, directory: Path) -> None:
    config, config_path = make_config(height, width, n_slots=n_images, number_of_writers=1)
    with ImagePublisher(config) as publisher:
        _fill(publisher, config, n_images)
        name = f"writer {height}x{width} uint16"
        runs: dict[str, list[float]] = {"raw": [], "direct": [], "h5dwrite": [], "service": []}
        raw_write(publisher, n_images, config.image_n_bytes, directory / "warmup.bin")  # unmeasured: the kernel's
        # first writes after large deletes are several times slower, whoever comes first
        for _ in range(REPEATS):  # interleaved, median of each: the first writes warm the page cache
            runs["raw"].append(raw_write(publisher, n_images, config.image_n_bytes, directory / "raw.bin"))
            runs["direct"].append(image_file(publisher, config, n_images, directory / "direct.h5", direct=True))
            runs["h5dwrite"].append(image_file(publisher, config, n_images, directory / "h5dwrite.h5", direct=False))
            runs["service"].append(writer_service(config, config_path, n_images, directory / "service.h5"))
        median = {k: float(np.median(v)) for k, v in runs.items()}
        baseline = median["raw"]
        report(f"{name} std_det_writer process", median["service"], "GB/s", baseline, ">= 0.9 and >= 1 GB/s")
        report(f"{name} ImageFile direct chunk writes", median["direct"], "GB/s", baseline, ">= 0.9")
        report(f"{name} ImageFile H5Dwrite", median["h5dwrite"], "GB/s", baseline, "(comparison)")
    shutil.rmtree(config_path.parent, ignore_errors=True)


def main() -> None:
    directory = Path(os.environ.get("STDDAQ_BENCH_DIR") or tempfile.mkdtemp(prefix="stddaq-bench-writer-"))
    print(f"writing to {directory}", flush=True)
    try:
        bench(128, 480, 2000, directory)
        bench(2016, 2016, 150, directory)
    finally:
        if "STDDAQ_BENCH_DIR" not in os.environ:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
