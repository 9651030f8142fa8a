"""Shared fixtures: unique detector names, config files, and the leak check every test passes.

The leak check fails a test that leaves behind shared memory or ipc socket files of its detector
names, child processes, or threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stddaq.config import DetectorConfig

_names: list[str] = []


def unique_name(prefix: str = "t") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    _names.append(name)
    return name


def base_config(**overrides) -> dict:
    data = {
        "detector_name": unique_name(),
        "detector_type": "gigafrost",
        "image_pixel_height": 48,
        "image_pixel_width": 32,
        "bit_depth": 16,
        "n_modules": 1,
        "start_udp_port": 2000,
        "module_positions": {},
        "log_level": "info",
        "stats_collection_period": 1,
        "ram_buffer_slots": 64,
    }
    data.update(overrides)
    return data


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., tuple[DetectorConfig, Path]]:
    """``make_config(**keys)`` -> (DetectorConfig, path of its JSON file), unique detector name."""
    counter = iter(range(1000))

    def make(**overrides) -> tuple[DetectorConfig, Path]:
        data = base_config(**overrides)
        path = tmp_path / f"detector{next(counter)}.json"
        path.write_text(json.dumps(data))
        return DetectorConfig.load(path), path

    return make


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                found.add(int(entry))
    return found


def _leftovers(names: list[str]) -> list[str]:
    found = []
    for folder in ("/dev/shm", "/tmp"):
        for entry in os.listdir(folder):
            if any(entry.startswith(name + "-") for name in names):
                found.append(f"{folder}/{entry}")
    return found


#: seconds the leak check waits for a test's files, children and threads to go
LEAK_GRACE = 15.0


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    _names.clear()
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    # what a test stopped may take a while to go on a loaded 2-core CI machine (a process
    # finishing its exit, a websocket thread its close handshake): only what outlives this is a leak
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        leaked_files = _leftovers(_names)
        leaked_children = _children() - children_before
        leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not (leaked_files or leaked_children or leaked_threads) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in leaked_children:
        os.kill(pid, signal.SIGKILL)
    for path in leaked_files:
        os.unlink(path)
    assert not leaked_files, f"test left shared memory / ipc files behind: {leaked_files}"
    assert not leaked_children, f"test left child processes running: {sorted(leaked_children)}"
    assert not leaked_threads, f"test left threads running: {leaked_threads}"


class ServiceProcess:
    """A service started as a real subprocess (``python -m module args``), stopped on exit."""

    def __init__(self, module: str, *args: str) -> None:
        self.argv = [sys.executable, "-m", module, *map(str, args)]
        # a service still running 8 s after its SIGTERM prints its threads' tracebacks (stop() kills at 10)
        env = dict(os.environ, STDDAQ_STOP_REPORT="8")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def output(self) -> tuple[str, str]:
        return self.proc.communicate(timeout=30)

    def stop(self, timeout: float = 10) -> int:
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                killed = True
        _, err = self.proc.communicate()
        if killed:  # shown with the test's teardown: a killed service cleans nothing up
            print(f"{' '.join(self.argv[2:4])}: killed, it did not exit within {timeout:g} s of SIGTERM; "
                  f"its last log lines:\n{(err or '')[-3000:]}", file=sys.stderr)
        return self.proc.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def service() -> Iterator[Callable[..., ServiceProcess]]:
    """``service("stddaq.services.simulator", path, "--rate", 10)`` -> ServiceProcess; all are stopped."""
    started: list[ServiceProcess] = []

    def start(module: str, *args: str) -> ServiceProcess:
        proc = ServiceProcess(module, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class LateReader:
    """A SUB that takes little (RCVHWM 1000: the rest waits in the producer's socket) and reads
    nothing until ``read_later(delay)``: a reader not scheduled for a moment. ``join()`` gives
    every message it got until 3 s without one."""

    def __init__(self, address: str) -> None:
        import zmq

        self._again = zmq.Again
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 1000)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.RCVTIMEO, 3000)
        self.socket.connect(address)
        self.received: list[bytes] = []
        self._thread: threading.Thread | None = None

    def read_later(self, delay: float = 0.1) -> None:
        def read() -> None:
            time.sleep(delay)
            while True:
                try:
                    self.received.append(self.socket.recv())
                except self._again:
                    return

        self._thread = threading.Thread(target=read)
        self._thread.start()

    def join(self) -> list[bytes]:
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.received

    def close(self) -> None:
        self.socket.close(0)
        self.ctx.term()
