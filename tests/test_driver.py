"""std_det_driver end to end: real websocket, real writers and simulator as subprocesses, real files.

The first test replays the documented session of README ("Recording to HDF5"): start, the statuses
with their counts, stop, saving_file, file_saved, idle; then it reads the files back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the filters h5py needs to read compressed files
import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.bus import ImagePublisher, image_metadata
from stddaq.config import DetectorConfig
from stddaq.formats.compression import bitshuffle_lz4_encode
from stddaq.patterns import ramp
from stddaq.protocol import ImageMetadataCompression

DRIVER = "stddaq.services.driver"
WRITER = "stddaq.services.writer"
SIM = "stddaq.services.simulator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """A websocket client that keeps the transcript of everything the driver pushed."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        """Connects, retrying while the driver process starts (slow on a loaded 2-core machine)."""
        from websockets.sync.client import connect

        deadline = time.monotonic() + timeout
        while True:
            try:
                self._stack = contextlib.ExitStack()
                self.ws = self._stack.enter_context(connect(url, open_timeout=2, close_timeout=1))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.transcript: list[dict] = []

    def send(self, message: dict | str) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def next(self, timeout: float = 5.0) -> dict:
        message = json.loads(self.ws.recv(timeout=timeout))
        self.transcript.append(message)
        return message

    def until(self, predicate, timeout: float = 20.0) -> dict:
        """Read messages until one satisfies ``predicate``; fails with the transcript on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next(timeout=max(0.1, deadline - time.monotonic()))
            if predicate(message):
                return message
        raise AssertionError(f"timed out; last messages: {self.transcript[-10:]}")

    def status(self, *names: str, timeout: float = 20.0) -> dict:
        return self.until(lambda m: m["status"] in names, timeout)

    def close(self) -> None:
        self._stack.close()


@dataclass
class Deployment:
    config: DetectorConfig
    path: Path
    session: Session
    run_dir: Path
    driver: object
    writers: list
    url: str


@pytest.fixture
def deployment(make_config, service, tmp_path):
    """``deployment(n_writers, meta=False, suffix="image", writers=True, **config)`` -> Deployment.

    Starts the writers (and the metadata writer) and the driver on a free port, and connects a Session.
    """
    sessions: list[Session] = []

    def make(n_writers: int = 2, *, meta: bool = False, suffix: str = "image", writers: bool = True, **keys):
        config, path = make_config(number_of_writers=n_writers, **keys)
        port = free_port()
        args = ["-s", suffix] + (["-m"] if meta else [])
        procs = [service(WRITER, path, i, "-s", suffix) for i in range(n_writers)] if writers else []
        if writers and meta:
            procs.append(service(WRITER, path, "meta", "-s", suffix))
        driver = service(DRIVER, path, "--host", "127.0.0.1", "-p", port, *args)
        run_dir = tmp_path / "run"
        run_dir.mkdir(exist_ok=True)
        url = f"ws://127.0.0.1:{port}"
        session = Session(url)
        sessions.append(session)
        return Deployment(config, path, session, run_dir, driver, procs, url)

    yield make
    for session in sessions:
        session.close()


def start_when_writers_ready(session: Session, command: dict, timeout: float = 20.0) -> None:
    """Writers connect to the driver asynchronously: retry while the driver says one is not there yet."""
    deadline = time.monotonic() + timeout
    while True:
        session.send(command)
        reply = session.status("creating_file", "error", "rejected")
        if reply["status"] == "creating_file":
            reply = session.status("waiting_for_first_image", "error")
            if reply["status"] == "waiting_for_first_image":
                return
        if "is not running" not in reply.get("reason", "") or time.monotonic() > deadline:
            raise AssertionError(f"start failed: {reply}; transcript {session.transcript[-10:]}")
        session.status("idle")
        time.sleep(0.2)


def read_file(path: Path, det: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r", swmr=True) as f:
        return f[f"{det}/data"][:], f[f"{det}/metadata"][:]


def check_ramp(data: np.ndarray, ids: np.ndarray, config) -> None:
    for image, image_id in zip(data, ids, strict=True):
        assert np.array_equal(image, ramp(int(image_id), config.shape, config.dtype)), f"image {image_id}"


# ---------------------------------------------------------------------- the documented session
def documented_session() -> tuple[list[dict], list[str]]:
    """The commands and the statuses (repeats collapsed) of README's documented session."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"a documented session.*?```\n(.*?)```", readme, re.S).group(1)
    commands = [json.loads(line[3:]) for line in block.splitlines() if line.startswith("-> ")]
    statuses = [json.loads(line[3:])["status"] for line in block.splitlines() if line.startswith("<- ")]
    return commands, [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]


def test_documented_session_then_the_files(deployment, service) -> None:
    d = deployment(2, meta=True, ram_buffer_slots=500)
    config, path, session, run_dir = d.config, d.path, d.session, d.run_dir
    det = config.detector_name
    commands, expected = documented_session()
    assert [c["command"] for c in commands] == ["start", "stop"]
    start = dict(commands[0], path=str(run_dir))
    service(SIM, path, "--rate", 200)
    assert session.next()["status"] == "idle"
    start_when_writers_ready(session, start)
    counts = []
    while not counts or counts[-1] < 40:
        message = session.status("recording")
        counts.append(message["count"])
    assert counts == sorted(counts) and counts[-1] >= 40
    session.send(commands[1])
    session.status("stop")
    saving = session.status("saving_file")
    session.status("file_saved")
    session.status("idle", timeout=5)
    statuses = [m["status"] for m in session.transcript]
    collapsed = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
    assert collapsed[-len(expected):] == expected, collapsed
    assert all(set(m) == {"status", "count"} for m in session.transcript if m["status"] in ("recording", "saving_file"))
    n = saving["count"]
    assert n >= 40

    files = sorted(p.name for p in run_dir.iterdir())
    assert files == ["scan_0.h5", "scan_1.h5", "scan_Meta.h5", "scan__master.h5"]
    data0, meta0 = read_file(run_dir / "scan_0.h5", det)
    data1, meta1 = read_file(run_dir / "scan_1.h5", det)
    assert len(meta0) + len(meta1) == n and abs(len(meta0) - len(meta1)) <= 1
    ids = np.sort(np.concatenate([meta0["image_id"], meta1["image_id"]]))
    assert np.array_equal(ids, np.arange(ids[0], ids[0] + n)), "recorded ids are not contiguous"
    assert np.array_equal(meta0["image_id"], ids[0::2]) and np.array_equal(meta1["image_id"], ids[1::2])
    assert set(meta0["status"]) == {1} and set(meta1["status"]) == {1}
    check_ramp(data0, meta0["image_id"], config)
    check_ramp(data1, meta1["image_id"], config)
    with h5py.File(run_dir / "scan__master.h5", "r") as f:
        master = f[f"{det}/data"][:]
        assert np.array_equal(f[f"{det}/metadata"]["image_id"], ids)
        check_ramp(master, ids, config)
        meta = f[f"{det}/meta"]  # the link to the metadata writer's file
        assert len(next(iter(meta.values()))) == n


def test_with_switch_user_the_master_belongs_to_the_runs_user(deployment, service) -> None:
    """The writers' files belong to writer_id; the master, written by the driver (root), did
    not: the user could neither change nor replace it."""
    if os.geteuid() != 0:
        pytest.skip("switching user needs root")
    d = deployment(1, ram_buffer_slots=64, switch_user_active=True)
    base = Path(tempfile.mkdtemp(prefix="stddaq-master-user-"))  # pytest's tmp_path is root's only
    try:
        os.chmod(base, 0o755)
        run_dir = base / "run"
        run_dir.mkdir()
        os.chown(run_dir, 12345, 4321)
        os.chmod(run_dir, 0o2775)  # a setgid project directory: files take its group
        service(SIM, d.path, "--rate", 200)
        start_when_writers_ready(d.session, {"command": "start", "path": str(run_dir), "n_image": 10,
                                             "writer_id": 12345})
        d.session.status("file_saved", timeout=30)
        owners = {p.name: (os.stat(p).st_uid, os.stat(p).st_gid) for p in run_dir.iterdir()}
        assert owners == {"file0.h5": (12345, 4321), "file_master.h5": (12345, 4321)}
    finally:
        shutil.rmtree(base)


def test_1000_images_over_3_writers_master_in_order(deployment, service) -> None:
    d = deployment(3, ram_buffer_slots=3000)
    config, path, session, run_dir = d.config, d.path, d.session, d.run_dir
    det = config.detector_name
    service(SIM, path, "--rate", 1000)
    start_when_writers_ready(session, {"command": "start", "path": str(run_dir), "n_image": 1000})
    session.status("file_saved", timeout=60)
    assert [m for m in session.transcript if m["status"] == "saving_file"][-1]["count"] == 1000
    lengths = []
    for i in range(3):
        _, rows = read_file(run_dir / f"file{i}.h5", det)
        lengths.append(len(rows))
    assert sorted(lengths) == [333, 333, 334]
    with h5py.File(run_dir / "file_master.h5", "r") as f:
        ids = f[f"{det}/metadata"]["image_id"]
        assert len(ids) == 1000 and np.array_equal(ids, np.arange(ids[0], ids[0] + 1000))
        data = f[f"{det}/data"]
        assert data.shape == (1000, *config.shape)
        for k in (0, 1, 2, 500, 999):
            assert np.array_equal(data[k], ramp(int(ids[k]), config.shape, config.dtype))


def test_start_id_skips_older_images(deployment, service) -> None:
    d = deployment(1, ram_buffer_slots=500)
    config, path, session, run_dir = d.config, d.path, d.session, d.run_dir
    service(SIM, path, "--rate", 300)
    time.sleep(0.5)
    start_id = 10**9  # the simulator starts at 0: nothing may be recorded
    start_when_writers_ready(session, {"command": "start", "path": str(run_dir), "n_image": 5, "start_id": start_id})
    time.sleep(1.0)
    assert not [m for m in session.transcript if m["status"] == "recording"]
    session.send({"command": "stop"})
    session.status("file_saved")
    _, rows = read_file(run_dir / "file0.h5", config.detector_name)
    assert len(rows) == 0


def test_compressed_source_decodes_with_hdf5plugin(deployment) -> None:
    d = deployment(2, suffix="h5bitshuffle-lz4", ram_buffer_slots=200)
    config, _path, session, run_dir = d.config, d.path, d.session, d.run_dir
    det = config.detector_name
    n = 30
    with ImagePublisher(config, "h5bitshuffle-lz4") as publisher:
        start_when_writers_ready(session, {"command": "start", "path": str(run_dir), "n_image": n})
        metadata = image_metadata(config)
        metadata.compression = ImageMetadataCompression.h5bitshuffle_lz4
        image_id = 0
        done = False
        while not done:
            metadata.image_id = image_id
            publisher.publish_image(metadata, bitshuffle_lz4_encode(ramp(image_id, config.shape, config.dtype)))
            image_id += 1
            try:
                done = session.next(timeout=0.01)["status"] in ("file_saved", "error")
            except TimeoutError:
                pass
            assert image_id < 5000, session.transcript[-5:]
        assert session.transcript[-1]["status"] == "file_saved", session.transcript[-5:]
    with h5py.File(run_dir / "file_master.h5", "r") as f:
        ids = f[f"{det}/metadata"]["image_id"]
        assert len(ids) == n and np.array_equal(ids, np.arange(ids[0], ids[0] + n))
        check_ramp(f[f"{det}/data"][:], ids, config)


# ---------------------------------------------------------------------- bad commands (no writer needed)
def test_bad_commands_answer_error_and_the_connection_stays_usable(deployment, tmp_path) -> None:
    d = deployment(2, writers=False)
    _config, _path, session, run_dir = d.config, d.path, d.session, d.run_dir
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        ("this is not json", "not valid JSON"),
        ({"command": "dance"}, "unknown command 'dance'"),
        ({"command": "start"}, 'needs "path"'),
        ({"command": "start", "path": str(tmp_path / "missing")}, "does not exist"),
        ({"command": "start", "path": str(a_file)}, "is not a directory"),
        ({"command": "start", "path": str(run_dir), "n_image": 0}, "'n_image' is 0"),
        ({"command": "start", "path": str(run_dir), "n_image": -3}, "'n_image' is -3"),
        ({"command": "start", "path": str(run_dir), "n_image": "ten"}, "'n_image' must be an integer"),
        ({"command": "start", "path": str(run_dir), "n_image": 2.5}, "'n_image' must be an integer"),
        ({"command": "start", "path": str(run_dir), "n_image": 10**12}, "not enough space"),
        ("[" * 100_000, "nested too deeply"),  # a RecursionError in json closed the connection (1011)
        ('{"command": "start", "path": "/d", "n_image": ' + "9" * 5000 + "}", "not valid JSON"),
        ({"command": "start", "path": str(run_dir), "n_images": 10}, "did you mean 'n_image'?"),
    ]
    for command, words in cases:
        session.send(command)
        reply = session.status("error")
        assert words in reply["reason"], (command, reply)
    session.send({"command": "stop"})  # stop while idle: a no-op that says idle
    assert session.next()["status"] == "idle"
    assert not list(run_dir.iterdir()), "a refused start must not create files"
    # a start with the writers missing fails at once, naming the writer
    t0 = time.monotonic()
    session.send({"command": "start", "path": str(run_dir), "n_image": 10})
    reply = session.status("error")
    assert "writer 0 is not running" in reply["reason"] and time.monotonic() - t0 < 5


def test_not_writable_for_the_requested_user(deployment) -> None:
    d = deployment(1, writers=False, switch_user_active=True)
    _config, _path, session, run_dir = d.config, d.path, d.session, d.run_dir
    os.chmod(run_dir, 0o755)
    session.send({"command": "start", "path": str(run_dir), "n_image": 10, "writer_id": 65534})
    reply = session.status("error")
    assert "not writable by user id 65534" in reply["reason"]


def test_the_start_queue_survives_signals_at_any_moment(make_config) -> None:
    """The driver sometimes did not stop at SIGTERM (CI: test_readme, the record test): its data
    loop waited in queue.SimpleQueue.get(timeout=0.05), which in CPython 3.11 waits for ever when
    a signal lands just before the deadline, so the loop never saw its stop flag. The driver's
    start queue, waited on with short timeouts under a storm of signals, must always come back."""
    _, path = make_config(number_of_writers=1)
    code = f"""
import os, queue, signal, threading, time
from stddaq.config import DetectorConfig
from stddaq.services.driver import WriterDriver
starts = WriterDriver(DetectorConfig.load({str(path)!r}))._starts
signal.signal(signal.SIGUSR1, lambda *a: None)
done = threading.Event()
def storm():
    while not done.is_set():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.0005)
threading.Thread(target=storm, daemon=True).start()
end = time.monotonic() + 5
while time.monotonic() < end:
    try:
        starts.get(timeout=0.001)
    except queue.Empty:
        pass
done.set()
print("came back")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "came back" in out.stdout, out.stderr[-2000:]


def test_the_driver_names_its_ipv6_websocket_as_a_url_writes_it(make_config) -> None:
    """It said ws://::1:PORT, an address no websocket client (ours refused it) takes."""
    from stddaq.client.record import check_driver_url
    from stddaq.services.driver import WriterDriver

    config, _ = make_config(number_of_writers=1)
    port = free_port()
    driver = WriterDriver(config, host="::1", port=port).start()
    try:
        assert check_driver_url(driver.endpoints["websocket"]) == f"ws://[::1]:{port}"
    finally:
        driver.stop()
        driver.close()


def test_driver_bad_arguments_exit_2(make_config, service) -> None:
    config, path = make_config(number_of_writers=0)
    driver = service(DRIVER, path, "-p", free_port())
    assert driver.wait(30) == 2
    _, err = driver.output()
    assert "number_of_writers is 0" in err and len(err.strip().splitlines()) == 1
    config, path = make_config(number_of_writers=1)
    driver = service(DRIVER, path, "-p", "x")
    assert driver.wait(30) == 2


# ---------------------------------------------------------------------- failures during a run
def _recording_from_a_simulator(d: Deployment, service, **start) -> None:
    """A simulator at 200 Hz, a run started on ``d`` (``start``: more fields), 50 images recorded."""
    service(SIM, d.path, "--rate", 200)
    start_when_writers_ready(d.session, {"command": "start", "path": str(d.run_dir), **start})
    d.session.until(lambda m: m["status"] == "recording" and m["count"] >= 50)


def test_start_while_recording_is_rejected(deployment, service) -> None:
    d = deployment(1, ram_buffer_slots=500)
    _config, path, session, run_dir = d.config, d.path, d.session, d.run_dir
    service(SIM, path, "--rate", 200)
    start_when_writers_ready(session, {"command": "start", "path": str(run_dir)})
    session.status("recording")
    session.send({"command": "start", "path": str(run_dir), "file_prefix": "other"})
    reply = session.until(lambda m: m["status"] == "rejected")
    assert reply == {"status": "rejected", "reason": "driver is busy!"}
    session.send({"command": "stop"})
    session.status("file_saved")
    assert not list(run_dir.glob("other*"))


def test_writer_killed_mid_run_ends_in_error_within_5s(deployment, service) -> None:
    d = deployment(2, ram_buffer_slots=500)
    config, session, run_dir = d.config, d.session, d.run_dir
    det = config.detector_name
    _recording_from_a_simulator(d, service)
    writer1 = d.writers[1].proc
    killed_at = time.monotonic()
    writer1.send_signal(signal.SIGKILL)
    reply = session.status("error", timeout=10)
    assert time.monotonic() - killed_at < 5
    assert "writer 1" in reply["reason"], reply
    # a killed process cannot unlink the socket file it bound; a supervisor (or this test) does
    wait_until(lambda: writer1.poll() is not None, 5)
    Path(f"/tmp/{det}-writer-1").unlink(missing_ok=True)
    data0, rows0 = read_file(run_dir / "file0.h5", det)  # the survivor closed its file
    assert len(rows0) >= 25
    check_ramp(data0, rows0["image_id"], config)
    with h5py.File(run_dir / "file1.h5", "r", swmr=True) as f:  # the dead one's file opens
        rows1 = f[f"{det}/metadata"][:]
        check_ramp(f[f"{det}/data"][:len(rows1)], rows1["image_id"], config)
    session.status("idle")
    assert d.driver.proc.poll() is None, "the driver must survive a writer's death"


def test_a_hung_writer_ends_the_run_once_the_source_overwrote_its_images(deployment, service) -> None:
    """A paused writer (SIGSTOP: a hung file system, a debugger) was noticed only after
    confirm_timeout (30 s), the status saying `recording` with a rising count all along, though
    its images were overwritten in the ring within a second."""
    d = deployment(2, ram_buffer_slots=100)
    session, run_dir = d.session, d.run_dir
    _recording_from_a_simulator(d, service)
    writer1 = d.writers[1].proc
    paused_at = time.monotonic()
    writer1.send_signal(signal.SIGSTOP)
    try:
        reply = session.status("error", timeout=20)
        waited = time.monotonic() - paused_at
    finally:
        writer1.send_signal(signal.SIGCONT)
    assert waited < 5, (waited, reply)  # the ring of 100 slots at 200 Hz is overwritten every 0.5 s
    assert reply["reason"].startswith("writer 1 has not taken image "), reply
    assert "the source has overwritten its slot since: the writer is stuck or too slow" in reply["reason"]
    data0, rows0 = read_file(run_dir / "file0.h5", d.config.detector_name)  # the other one closed its file
    check_ramp(data0, rows0["image_id"], d.config)
    session.status("idle")
    assert d.driver.proc.poll() is None


def test_a_writer_that_hung_in_a_run_answers_the_next_one_only_for_itself(deployment, service) -> None:
    """A writer paused in run N (its run ended in error) answers N's requests late, in order.
    Those answers were taken for run N+1's create_file: N+1 failed with N's lost images as its
    reason (or a FAILURE-free stale answer passed for a file never created)."""
    d = deployment(1, ram_buffer_slots=100)
    session, run_dir = d.session, d.run_dir
    _recording_from_a_simulator(d, service)
    writer = d.writers[0].proc
    writer.send_signal(signal.SIGSTOP)
    try:
        assert session.status("error", timeout=20)["reason"].startswith("writer 0 has not taken image ")
        session.status("idle")
        still_stopped = run_dir / "still-stopped"
        still_stopped.mkdir()
        session.send({"command": "start", "path": str(still_stopped), "n_image": 10})
        reply = session.status("error", "waiting_for_first_image", timeout=20)
        assert reply["status"] == "error", reply
        assert reply["reason"].startswith("writer 0 still owes "), reply
        assert "answer(s) to requests of an earlier run" in reply["reason"], reply
        session.status("idle")
        resumed = run_dir / "resumed"
        resumed.mkdir()
        session.send({"command": "start", "path": str(resumed), "n_image": 100})
        session.status("creating_file")
    finally:
        writer.send_signal(signal.SIGCONT)
    reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "file_saved", session.transcript[-5:]
    data, rows = read_file(resumed / "file0.h5", d.config.detector_name)
    assert len(rows) == 100
    check_ramp(data, rows["image_id"], d.config)


def test_a_metadata_writer_slow_for_a_moment_does_not_end_the_run(deployment, service) -> None:
    """The metadata writer reads no pixels: its image going out of the ring loses nothing. A
    1.5 s stall of it (a metadata file system) ended the run as if it had lost images."""
    d = deployment(1, meta=True, ram_buffer_slots=100)
    session = d.session
    _recording_from_a_simulator(d, service, n_image=600)
    meta = d.writers[-1].proc
    meta.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)  # 3 rings at 200 Hz
    finally:
        meta.send_signal(signal.SIGCONT)
    reply = session.status("error", "file_saved", timeout=30)
    assert reply["status"] == "file_saved", reply


@contextlib.contextmanager
def recording_source(d: Deployment, n_image: int) -> Iterator[ImagePublisher]:
    """A source of ``d``'s config, a run of ``n_image`` started on it, its driver subscribed."""
    with ImagePublisher(d.config) as publisher:
        start_when_writers_ready(d.session, {"command": "start", "path": str(d.run_dir), "n_image": n_image})
        assert publisher.wait_for_subscribers(1, 10)
        yield publisher


def _publish_ramps(publisher: ImagePublisher, config, ids, lost=(), unsent=()) -> None:
    """Publish the ramp image of each id, 10 ms apart. An id in ``lost`` is written, then its
    slot is taken by the image a ring later before its message goes: lost at every reader. An id
    in ``unsent`` is written but its message never reaches a reader (its connection was down)."""
    for image_id in ids:
        metadata = image_metadata(config, image_id)
        if image_id in unsent:
            publisher.write_image(metadata, ramp(image_id, config.shape, config.dtype))
        elif image_id in lost:
            publisher.write_image(metadata, ramp(image_id, config.shape, config.dtype))
            publisher.begin(image_id + config.n_slots)
            publisher.send(metadata.SerializeToString(), image_id)
        else:
            publisher.publish_image(metadata, ramp(image_id, config.shape, config.dtype))
        time.sleep(0.01)


def test_images_lost_before_the_driver_read_them_end_the_run_in_error_with_its_files(deployment) -> None:
    """Image 5's slot is overwritten before the driver reads its metadata: its subscriber drops
    it (counted lost). The run ended file_saved as if complete, the master quietly without 5.
    It now ends in error saying how many were lost; the files and master are there."""
    d = deployment(1, ram_buffer_slots=64)
    config, session, run_dir = d.config, d.session, d.run_dir
    det = config.detector_name
    with recording_source(d, n_image=10) as publisher:
        _publish_ramps(publisher, config, range(11), lost=(5,))
        reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "error", session.transcript[-5:]
    assert reply["reason"].startswith("1 image(s) lost: overwritten in the RAM buffer before the driver read them")
    with h5py.File(run_dir / "file_master.h5", "r") as f:
        ids = [int(i) for i in f[f"{det}/metadata"]["image_id"]]
        assert ids == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
        check_ramp(f[f"{det}/data"][:], ids, config)
    session.status("idle")  # the next run may start


def test_images_whose_metadata_never_reached_the_driver_end_the_run_in_error(deployment) -> None:
    """A source restarted mid-run (--start-id going on): the driver's connection to the new one
    came up after its first images were published. They were counted only as gaps (normal for
    ids that step) and the run said file_saved without them (review: 600 and 601 of 900)."""
    d = deployment(1, ram_buffer_slots=64)
    config, session = d.config, d.session
    with recording_source(d, n_image=10) as publisher:
        _publish_ramps(publisher, config, range(12), unsent=(5, 6))
        reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "error", session.transcript[-5:]
    assert reply["reason"].startswith("2 image(s) missed: complete in the RAM buffer, but their metadata never "
                                      "reached the driver"), reply
    _, rows = read_file(d.run_dir / "file0.h5", config.detector_name)
    assert list(rows["image_id"]) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11]


def test_a_source_buffer_of_another_size_is_refused_at_start(deployment, make_config) -> None:
    """A source started with another config (another ring size): the driver's data loop died
    on it and the process hung at exit. The start is now refused before any file exists."""
    d = deployment(1, writers=False, ram_buffer_slots=8)
    config, session, run_dir = d.config, d.session, d.run_dir
    other, _ = make_config(detector_name=config.detector_name, ram_buffer_slots=1000)
    with ImagePublisher(other):
        session.send({"command": "start", "path": str(run_dir), "n_image": 10})
        reply = session.status("error")
        assert "the source cannot be recorded" in reply["reason"] and "this config implies" in reply["reason"]
        assert not list(run_dir.iterdir())
    session.send({"command": "start", "path": str(run_dir), "n_image": 10})  # gone: the check passes
    assert "writer 0 is not running" in session.status("error")["reason"]
    assert d.driver.proc.poll() is None


def test_a_source_started_with_another_size_after_start_ends_the_run_in_error(deployment, make_config) -> None:
    """The pre-flight passes (no source yet), then the source starts with another ring size:
    every message is unreadable for the driver. The run waited, and after stop said file_saved
    with 0 images; the reason was only in the driver's log."""
    d = deployment(1, ram_buffer_slots=8)
    config, session, run_dir = d.config, d.session, d.run_dir
    other, _ = make_config(detector_name=config.detector_name, ram_buffer_slots=1000)
    start_when_writers_ready(session, {"command": "start", "path": str(run_dir), "n_image": 5})
    with ImagePublisher(other) as publisher:
        assert publisher.wait_for_subscribers(1, 10)
        for image_id in range(5):
            publisher.publish_image(image_metadata(other, image_id), ramp(image_id, other.shape, other.dtype))
        time.sleep(0.5)
        session.send({"command": "stop"})
        reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "error", session.transcript[-5:]
    assert "5 message(s) on" in reply["reason"] and "this config implies" in reply["reason"], reply


def test_a_source_whose_ids_go_back_mid_run_ends_it_before_the_runs_mix(deployment) -> None:
    """A simulator restarted mid-recording starts its ids again: the driver recorded on, the
    files mixed both sequences (254 ids twice in a master of 800 rows) and it said file_saved."""
    d = deployment(1, ram_buffer_slots=64)
    config, session, run_dir = d.config, d.session, d.run_dir
    det = config.detector_name
    with recording_source(d, n_image=30) as publisher:
        _publish_ramps(publisher, config, [*range(10), *range(3)])  # a new acquisition: ids from 0 again
        reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "error", session.transcript[-5:]
    assert "the source's ids went back from 9 to 0 after 10 images" in reply["reason"], reply
    data, rows = read_file(run_dir / "file0.h5", det)
    # ids 0-2 of the first run are in the file unless the new run took their slots before the writer
    # wrote them (it holds images in their slots until a chunk is full): then they are lost, never
    # the new run's pixels under the old run's metadata
    ids = list(rows["image_id"])
    assert ids == sorted(set(ids)) and set(range(3, 10)) <= set(ids) <= set(range(10)), ids
    check_ramp(data, rows["image_id"], config)


def test_a_second_process_on_a_writers_socket_ends_the_run_and_refuses_the_next(deployment) -> None:
    """A second process connected as writer 0 (a duplicate writer) gets every other image from
    the driver's PUSH: those were in no file, and the run went on as if nothing happened."""
    d = deployment(1, ram_buffer_slots=64)
    config, session = d.config, d.session
    rogue = zmq.Context.instance().socket(zmq.PULL)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        with recording_source(d, n_image=40) as publisher:
            _publish_ramps(publisher, config, range(5))
            rogue.connect(config.ipc_address("driver-0"))
            _publish_ramps(publisher, config, range(5, 40))
            reply = session.status("file_saved", "error", timeout=30)
        assert reply["status"] == "error", session.transcript[-5:]
        assert "2 processes are connected as writer 0" in reply["reason"], reply
        assert "is a second std_det_writer 0 running?" in reply["reason"], reply
        session.status("idle")
        (d.run_dir / "again").mkdir()
        session.send({"command": "start", "path": str(d.run_dir / "again"), "n_image": 5})
        reply = session.status("error", "waiting_for_first_image", timeout=30)
        assert reply["status"] == "error" and "2 processes are connected as writer 0" in reply["reason"], reply
    finally:
        rogue.close(0)


def test_a_second_driver_is_refused_at_once_and_the_running_recording_goes_on(deployment, service) -> None:
    """A second std_det_driver of the same config (an operator's mistake): its probe of the
    writer socket's name counted as a second writer and ended the running recording, and the
    refused driver hung in zmq's term() (its half-made writer link left its sockets open)."""
    from stddaq.bus.sockets import ipc_in_use

    d = deployment(1, ram_buffer_slots=64)
    config, session = d.config, d.session
    with recording_source(d, n_image=30) as publisher:
        _publish_ramps(publisher, config, range(10))
        second = service(DRIVER, d.path, "--host", "127.0.0.1", "-p", free_port())
        assert second.wait(timeout=30) != 0
        _, err = second.output()
        assert "another process listens there" in err, err[-2000:]
        for _ in range(20):  # what bind() and stddaq up do to see whether a name is in use
            assert ipc_in_use(config.ipc_address("driver-0"))
        _publish_ramps(publisher, config, range(10, 30))
        reply = session.status("file_saved", "error", timeout=30)
    assert reply["status"] == "file_saved", session.transcript[-5:]


def test_a_driver_shut_down_mid_run_does_not_say_file_saved(deployment, service) -> None:
    """SIGTERM to the driver (stddaq up stopping) mid-recording: the files were saved and the
    client told file_saved, so `stddaq record` exited 0 with 237 of 2000 images."""
    d = deployment(1, ram_buffer_slots=500)
    path, session, run_dir = d.path, d.session, d.run_dir
    service(SIM, path, "--rate", 200)
    start_when_writers_ready(session, {"command": "start", "path": str(run_dir), "n_image": 100000})
    session.until(lambda m: m["status"] == "recording" and m["count"] >= 20)
    assert d.driver.stop() == 0
    _, err = d.driver.output()
    assert re.search(r"status error: the driver was shut down after \d+ of 100000 images \(no stop command\); "
                     r"the files hold the \d+ images recorded", err), err[-2000:]
    assert (run_dir / "file_master.h5").exists()


def test_an_error_reason_counts_the_images_the_driver_lost_too(deployment) -> None:
    """A run that fails (here: its writer dies) after the driver lost images said only the
    writer's reason; the files missed 301 images and the driver's stats said lost=300."""
    d = deployment(1, ram_buffer_slots=64)
    config, session = d.config, d.session
    with recording_source(d, n_image=100) as publisher:
        _publish_ramps(publisher, config, range(6), lost=(5,))
        session.until(lambda m: m["status"] == "recording" and m["count"] >= 5)
        d.writers[0].proc.send_signal(signal.SIGKILL)
        reply = session.status("file_saved", "error", timeout=30)
    Path(config.ipc_address("writer-0")[len("ipc://"):]).unlink(missing_ok=True)
    assert reply["status"] == "error" and "writer 0" in reply["reason"], reply
    assert "1 image(s) lost: overwritten in the RAM buffer before the driver read them" in reply["reason"], reply


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's size=) at a new directory, unmounted after; skips the test
    where it cannot be mounted (not root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_ends_in_error_with_reason(deployment, service, tmp_path) -> None:
    with small_disk(tmp_path, "3m") as mount:
        d = deployment(1, ram_buffer_slots=500, image_pixel_height=128, image_pixel_width=128,
                       gpfs_block_size=65536)
        config, path, session = d.config, d.path, d.session
        det = config.detector_name
        service(SIM, path, "--rate", 300)
        start_when_writers_ready(session, {"command": "start", "path": str(mount)})  # until stop: room for ~90
        reply = session.status("error", timeout=30)
        reason = reply["reason"].lower()
        assert reason.startswith("writer 0: ") and ("disk full" in reason or "no space" in reason), reply
        with h5py.File(mount / "file0.h5", "r", swmr=True) as f:
            rows = f[f"{det}/metadata"][:]
            assert len(rows) > 0
            check_ramp(f[f"{det}/data"][:len(rows)], rows["image_id"], config)


def test_a_start_is_checked_against_its_files_not_its_images_alone(deployment, service, tmp_path) -> None:
    """A start of as many images as the free space holds was accepted, and the recording ended in
    disk full before its last images (the files' chunks, rows, headers and the writers' reserve
    come on top). Now it is refused, naming how many images fit; a start of that many records
    them all."""
    with small_disk(tmp_path, "12m") as mount:
        d = deployment(2, meta=True, ram_buffer_slots=1000, image_pixel_height=128, image_pixel_width=128,
                       gpfs_block_size=3 * 32768)
        config, session = d.config, d.session
        vfs = os.statvfs(mount)
        by_images = vfs.f_bavail * vfs.f_frsize // config.image_n_bytes
        session.send({"command": "start", "path": str(mount), "n_image": by_images})
        reply = session.status("error", "creating_file")
        assert reply["status"] == "error" and "not enough space" in reply["reason"], reply
        fit = int(re.search(r"room for (\d+) images", reply["reason"])[1])
        assert 0 < fit < by_images, (fit, by_images)
        session.send({"command": "start", "path": str(mount), "n_image": fit + 1})
        reply = session.status("error", "creating_file")
        assert reply["status"] == "error" and f"room for {fit} images" in reply["reason"], reply
        service(SIM, d.path, "--rate", 500)
        start_when_writers_ready(session, {"command": "start", "path": str(mount), "n_image": fit})
        reply = session.status("file_saved", "error", timeout=30)
        assert reply["status"] == "file_saved", reply
        with h5py.File(mount / "file_master.h5", "r") as f:
            assert f[f"{config.detector_name}/data"].shape[0] == fit


@pytest.mark.parametrize("n_image", [4, 21])
def test_the_start_check_lays_out_the_pixels_the_files_hold(make_config, tmp_path, n_image) -> None:
    """An 8-bit GigaFRoST has slots of 2 bytes a pixel (as upstream sizes them), its files 1 byte:
    the driver's bound must follow the files' chunks (with the slot's, 4 images over 4 writers of
    2000x1600 were allowed 11 MB less than their files took, and 20 images 2.3 times too much)."""
    from test_storage_hdf5 import _check_recording_bytes

    from stddaq.services.driver import WriterDriver

    config, _ = make_config(number_of_writers=4, bit_depth=8, image_pixel_height=2000, image_pixel_width=1600)
    assert config.detector_type == "gigafrost" and config.image_n_bytes == 2 * 2000 * 1600
    driver = WriterDriver(config, with_meta=True)
    try:
        _check_recording_bytes(tmp_path, config.shape, n_image, 4, config.gpfs_block_size, None, "gigafrost",
                               dtype=config.dtype, bound=driver._recording_bytes(n_image))
    finally:
        driver.close()


def test_the_start_check_allows_compressed_images_up_to_their_slot(make_config, tmp_path) -> None:
    """An 8-bit GigaFRoST's slots hold 2 bytes a pixel, so a bitshuffle-lz4 stage given blocks of
    8 pixels publishes noise as blobs of 1.6 times its pixels: the driver's bound on such a
    compressed channel holds them (pixels plus 1% went over by 25-195 MB in 200 images)."""
    from test_storage_hdf5 import _check_recording_bytes

    from stddaq.services.driver import WriterDriver
    from stddaq.storage.hdf5 import BITSHUFFLE_LZ4

    config, _ = make_config(number_of_writers=2, bit_depth=8, image_pixel_height=500, image_pixel_width=800)
    driver = WriterDriver(config, suffix="h5bitshuffle-lz4", with_meta=True)

    def encode(pixels):
        pixels = np.random.default_rng(int(pixels.flat[0])).integers(0, 255, pixels.shape, dtype=np.uint8)
        blob = bitshuffle_lz4_encode(pixels, 8)
        assert pixels.nbytes * 1.5 < blob.nbytes <= config.image_n_bytes  # the stage publishes it: it fits the slot
        return blob

    try:
        bound = driver._recording_bytes(40)
        _check_recording_bytes(tmp_path, config.shape, 40, 2, config.gpfs_block_size, BITSHUFFLE_LZ4, "gigafrost",
                               dtype=config.dtype, bound=bound, encode=encode, slack=40 * config.image_n_bytes // 2)
    finally:
        driver.close()


# ---------------------------------------------------------------------- stddaq record
def _record(url: str, run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stddaq.cli", "record", "--driver", url, "--path", str(run_dir),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stddaq_record_end_to_end(deployment, service) -> None:
    d = deployment(2, ram_buffer_slots=1000)
    config, path, _session, run_dir = d.config, d.path, d.session, d.run_dir
    service(SIM, path, "--rate", 500)
    url = d.url
    deadline = time.monotonic() + 20
    while True:  # until the writers are connected
        proc = _record(url, run_dir, "--n-images", "200", "--prefix", "rec")
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0 or "is not running" not in err or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert proc.returncode == 0, err
    assert "recorded 200 images" in out
    listed = sorted(line.strip() for line in out.splitlines() if line.startswith("  "))
    assert listed == sorted(str(run_dir / n) for n in ("rec0.h5", "rec1.h5", "rec_master.h5"))
    assert "img/s" in err and "200/200" in err
    with h5py.File(run_dir / "rec_master.h5", "r") as f:
        assert len(f[f"{config.detector_name}/metadata"]) == 200

    # Ctrl-C: stop is sent, the files are closed, exit 0 because they were saved
    proc = _record(url, run_dir, "--n-images", "100000", "--prefix", "ctrlc")
    assert wait_until(lambda: (run_dir / "ctrlc0.h5").exists(), 20)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopping" in err and "ctrlc_master.h5" in out
    assert re.search(r"stopped \(Ctrl-C\) after \d+ of 100000 images", err), err


def test_stddaq_record_without_driver_fails_in_one_line(tmp_path) -> None:
    with socket.socket() as held:  # bound, never listening: refuses connections, and no other process takes it
        held.bind(("127.0.0.1", 0))
        proc = _record(f"ws://127.0.0.1:{held.getsockname()[1]}", tmp_path, "--n-images", "10")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "cannot connect to the driver" in err and len(err.strip().splitlines()) == 1
