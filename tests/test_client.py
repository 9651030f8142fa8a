"""The stream client: no HDF5 import, `stddaq watch` on a real stream, deploy plan of live streams."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import wait_until

from stddaq.deploy import plan
from stddaq.formats import array10
from stddaq.patterns import ramp


def test_client_imports_no_hdf5_or_services() -> None:
    code = ("import sys, stddaq.client; from stddaq.client import LiveStreamClient; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('h5py', 'hdf5plugin', 'redis', 'pydantic', 'fastapi')"
            " or m.startswith(('stddaq.services', 'stddaq.bus', 'stddaq.storage'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_watch_prints_ids_rate_and_gaps(make_config, service) -> None:
    config, path = make_config(image_pixel_height=8, image_pixel_width=12)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        watch = service("stddaq.cli", "watch", f"tcp://127.0.0.1:{port}", "--duration", "2.5")
        assert pub.poll(20_000)  # its subscription
        pub.recv()
        ids = [i for i in range(60) if i not in (20, 21, 22)]
        for i in ids:
            pub.send_multipart(array10.encode(i, ramp(i, config.shape, config.dtype)))
            wait_until(lambda: False, timeout=0.005)
        assert watch.wait(timeout=30) == 0
        out, _ = watch.output()
    finally:
        pub.close(0)
        ctx.term()
    lines = [ln for ln in out.splitlines() if ln.startswith("frames=")]
    assert 2 <= len(lines) <= 4, out
    with_frames = [ln for ln in lines if not ln.startswith("frames=0")]
    assert sum(int(ln.split()[0].split("=")[1]) for ln in with_frames) == len(ids)
    assert sum(int(ln.split("gaps=")[1].split()[0]) for ln in with_frames) == 3
    assert "ids=0.." in with_frames[0] and "shape=[8, 12] type=uint16" in with_frames[0]


def _watch_a_sender(message, duration: float) -> str:
    """What ``watch`` prints for ``duration`` s of a PUB sending ``message(i)`` every 10 ms."""
    import io
    import threading

    from stddaq.client.stream import watch

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()

    def send() -> None:
        image_id = 0
        while not done.is_set():
            pub.send_multipart(message(image_id))
            image_id += 1
            time.sleep(0.01)

    sender = threading.Thread(target=send)
    sender.start()
    out = io.StringIO()
    try:
        watch(f"tcp://127.0.0.1:{port}", duration=duration, out=out)
    finally:
        done.set()
        sender.join()
        pub.close(0)
        ctx.term()
    return out.getvalue()


def test_watch_shows_how_the_ids_of_a_periodic_stream_step() -> None:
    """A periodic stream (every 10th image) showed only gaps=45 a second: it read as images lost."""
    out = _watch_a_sender(lambda i: array10.encode(10 * i, np.zeros((4, 4), np.uint16)), 1.5)
    lines = [ln for ln in out.splitlines() if ln.startswith("frames=") and not ln.startswith("frames=0")]
    assert lines, out
    for line in lines:
        frames = int(line.split()[0].split("=")[1])
        gaps = int(line.split("gaps=")[1].split()[0])
        assert gaps == 9 * (frames - (line is lines[0])), line  # 9 skipped ids per step
        assert " steps=+10 x" in line and ",+" not in line, line


def test_watch_says_messages_it_cannot_read() -> None:
    """Messages that came but were no stream message (a 2-channel bsread source) were shown as
    `frames=0 (no messages from ...)`: the user looked for a network problem."""
    out = _watch_a_sender(lambda _: [b'{"htype": "not-a-stream"}', b"x"], 1.2)
    lines = [ln for ln in out.splitlines() if ln.startswith("frames=")]
    assert any(ln.startswith("frames=0 invalid=") and "(last: " in ln for ln in lines), lines
    assert not any("no messages" in ln for ln in lines[1:]), lines


def test_watch_rate_of_a_last_partial_interval(make_config) -> None:
    """--duration 1.5: the last line covers half a second; its rate was divided by a whole one
    (100 Hz shown as ~50)."""
    config, _ = make_config(image_pixel_height=8, image_pixel_width=12)
    out = _watch_a_sender(lambda i: array10.encode(i, ramp(i, config.shape, config.dtype)), 1.5)
    last = [ln for ln in out.splitlines() if ln.startswith("frames=")][-1]
    frames, rate = int(last.split()[0].split("=")[1]), float(last.split()[1].split("=")[1])
    assert frames > 10 and rate > 1.6 * frames, last  # about frames / 0.5 s


@pytest.mark.parametrize("args,message", [
    (["watch", "foo", "--duration", "1"], "cannot connect to 'foo'"),  # was a ZMQError traceback
    (["watch", "tcp://127.0.0.1:99999", "--duration", "1"], "PORT 0..65535"),  # watched port 34463
    (["watch", "tcp://127.0.0.1:9", "--duration", "-1"], "--duration: -1.0 is not allowed"),
    (["up", "--duration", "nan"], "--duration: nan is not allowed"),  # never stopped
    (["up", "--duration", "-5"], "--duration: -5.0 is not allowed"),  # started and stopped everything
    (["record", "--driver", "localhost:8080", "--path", "/tmp", "--n-images", "1"],  # was a ValueError traceback
     "--driver: 'localhost:8080' is not a websocket address: must look like ws://host:port"),
    (["record", "--driver", "ws://127.0.0.1:99999", "--path", "/tmp", "--n-images", "1"],  # was a connect error
     "--driver: 'ws://127.0.0.1:99999' is not a websocket address: Port out of range 0-65535"),
    (["record", "--driver", "ws://daq-host", "--path", "/tmp", "--n-images", "1"],  # went to port 80
     "--driver: 'ws://daq-host' has no port: it would go to port 80 (must look like ws://host:port (the driver's "),
    (["record", "--driver", "ws://127.0.0.1:\uff18\uff10", "--path", "/tmp", "--n-images", "1"],
     "is not a websocket address"),
    (["record", "--driver", "ws://127.0.0.1:0", "--path", "/tmp", "--n-images", "1"], "port 0 is not allowed"),
    # websockets refused these at connect (exit 1) or took another host
    (["record", "--driver", "ws://user@127.0.0.1:8080", "--path", "/tmp", "--n-images", "1"],
     "user info must be user:password"),
    (["record", "--driver", "ws://ho st:8080", "--path", "/tmp", "--n-images", "1"], "space or control character"),
    (["record", "--driver", "ws://host\\:8080", "--path", "/tmp", "--n-images", "1"], "is no host name or IP address"),
    (["record", "--driver", "ws://[v1.x]:8080", "--path", "/tmp", "--n-images", "1"], "is no host name or IP address"),
    (["record", "--driver", " ws://daq-host:8080", "--path", "/tmp", "--n-images", "1"], "space or control character"),
    (["record", "--driver", "ws://daq-host:8080#x", "--path", "/tmp", "--n-images", "1"], "has no #fragment"),
])
def test_cli_bad_arguments_exit_2_in_one_line(args, message) -> None:
    proc = subprocess.run([sys.executable, "-m", "stddaq.cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_plan_starts_one_live_stream_per_configured_address(make_config) -> None:
    config, path = make_config(live_stream_configs={"tcp://127.0.0.1:9100": {"type": "forward"},
                                                    "tcp://127.0.0.1:9101": {"type": "batch", "config": [1, 10]}})
    specs = plan(config, Path(path))
    streams = [s for s in specs if s.name.startswith("std_live_stream")]
    assert [s.argv[-3:] for s in streams] == [["stddaq.services.live_stream", str(path), "tcp://127.0.0.1:9100"],
                                              ["stddaq.services.live_stream", str(path), "tcp://127.0.0.1:9101"]]


# ---------------------------------------------------------------------- `stddaq record` against a scripted driver
class ScriptedDriver:
    """A websocket server in a thread that plays ``script(websocket, received)`` to one client."""

    def __init__(self, script, **serve_options) -> None:
        self.script = script
        self.received: list[dict] = []
        self.serve_options = serve_options  # websockets' serve(): e.g. a short keepalive

    def __enter__(self) -> ScriptedDriver:
        import asyncio

        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        return self

    async def _serve(self) -> None:
        import asyncio

        from websockets.asyncio.server import serve

        self._done = asyncio.Event()
        async with serve(lambda ws: self.script(ws, self.received), "127.0.0.1", 0, **self.serve_options) as server:
            self.url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
            self._ready.set()
            await self._done.wait()

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)


async def _play(ws, received: list, statuses: list[dict], *, after_start: bool = True) -> None:
    import asyncio

    await ws.send(json.dumps({"status": "idle"}))
    if after_start:
        received.append(json.loads(await ws.recv()))
    for status in statuses:
        await ws.send(json.dumps(status))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)


def _record(url: str, path, n_images: int) -> tuple[int, str, str]:
    import contextlib
    import io

    from stddaq.client.record import record_command

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = record_command(url, str(path), n_images, out=io.StringIO())
    return code, out.getvalue(), err.getvalue()


def test_record_stopped_by_another_client_is_not_a_success(tmp_path) -> None:
    """The driver saved the files of a run another client stopped after 3 of 1000 images:
    `stddaq record` printed them and exited 0, so a scan script took the run as done."""
    run = [{"status": "creating_file"}, {"status": "waiting_for_first_image"}, {"status": "recording", "count": 3},
           {"status": "stop"}, {"status": "saving_file", "count": 3}, {"status": "file_saved"}]
    with ScriptedDriver(lambda ws, received: _play(ws, received, run)) as driver:
        code, out, err = _record(driver.url, tmp_path, 1000)
    assert code == 1 and "recorded 3 images" in out
    assert "incomplete: stopped by another client of the driver after 3 of 1000 images" in err


@pytest.mark.parametrize("statuses,message", [
    # was a ConnectionClosedOK traceback; the close comes before the start is sent or after (a race)
    ([], "closed the connection"),
    ([{"status": "creating_file"}, {"status": "recording", "count": None}], "a count that is no integer >= 0"),
])
def test_record_driver_misbehaving_is_one_line_exit_1(tmp_path, statuses, message) -> None:
    async def script(ws, received) -> None:
        if not statuses:
            await ws.send(json.dumps({"status": "idle"}))
            await ws.close()
            return
        await _play(ws, received, statuses)

    with ScriptedDriver(script) as driver:
        code, _, err = _record(driver.url, tmp_path, 10)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_record_stopped_before_its_start_starts_nothing(tmp_path) -> None:
    """A Ctrl-C while the client still waited to start (the previous run's end on display) sent
    start and stop: a run of 0 images that the client called a success."""
    import asyncio

    from stddaq.client.record import DriverClient

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "file_saved"}))  # the previous run's end, for a moment
        await asyncio.sleep(0.3)
        await ws.send(json.dumps({"status": "idle"}))
        try:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 1.0)))
        except TimeoutError:
            pass

    async def run(url: str):
        stop = asyncio.Event()
        async with DriverClient(url) as client:
            asyncio.get_running_loop().call_later(0.1, stop.set)
            return await client.record(str(tmp_path), n_image=10, stop_event=stop)

    with ScriptedDriver(script) as driver:
        result = asyncio.run(run(driver.url))
        time.sleep(1.2)
    assert result.status == "cancelled" and not result.ok and not result.complete
    assert driver.received == []


def test_the_files_of_an_empty_prefix_are_listed(tmp_path) -> None:
    """file_prefix "" makes 0.h5, 1.h5, Meta.h5, _master.h5: the client looked for file*.h5."""
    run = [{"status": "creating_file"}, {"status": "recording", "count": 2}, {"status": "saving_file", "count": 2},
           {"status": "file_saved"}]
    for name in ("0.h5", "Meta.h5", "_master.h5", "file0.h5"):
        (tmp_path / name).write_bytes(b"")
    from stddaq.client.record import record

    with ScriptedDriver(lambda ws, received: _play(ws, received, run)) as driver:
        result = record(driver.url, str(tmp_path), n_image=2, file_prefix="")
    assert result.complete and [p.name for p in result.files] == ["0.h5", "Meta.h5", "_master.h5"]


def test_blocking_record_sends_stop_at_ctrl_c(tmp_path) -> None:
    """A Ctrl-C in a script calling the blocking ``record()`` left the driver recording on, with
    nobody following: the run went on for its n_image."""
    import asyncio

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "idle"}))
        received.append(json.loads(await ws.recv()))
        count = 0
        while True:
            count += 1
            await ws.send(json.dumps({"status": "recording", "count": count}))
            try:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 0.05)))
                break
            except TimeoutError:
                continue
        for status in ({"status": "saving_file", "count": count}, {"status": "file_saved"}):
            await asyncio.sleep(0.2)
            await ws.send(json.dumps(status))
        await asyncio.sleep(0.5)

    code = ("import sys\nfrom stddaq.client.record import record\n"
            "record(sys.argv[1], sys.argv[2], n_image=100000, on_status=lambda m: print(m['status'], flush=True))")
    with ScriptedDriver(script) as driver:
        proc = subprocess.Popen([sys.executable, "-c", code, driver.url, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "recording"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert [m["command"] for m in driver.received] == ["start", "stop"]
    assert out.strip().splitlines()[-1] == "file_saved"  # it waited for the files to be closed
    assert proc.returncode != 0 and err.strip().splitlines()[-1] == "KeyboardInterrupt"


@pytest.mark.parametrize("leave", ["on_status raises", "wait_for times out"])
def test_a_record_left_before_its_end_stops_its_run(tmp_path, leave) -> None:
    """A bug in the caller's on_status, or its wait_for giving up, left the run it had started
    going on at the driver with nobody following it (with no n_image: for good)."""
    import asyncio

    from stddaq.client.record import DriverClient

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "idle"}))
        received.append(json.loads(await ws.recv()))
        for count in range(100):
            await ws.send(json.dumps({"status": "recording", "count": count}))
            try:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 0.05)))
                return
            except TimeoutError:
                continue

    def on_status(message: dict) -> None:
        if leave == "on_status raises" and message.get("count") == 3:
            raise ValueError("a bug in the caller's callback")

    async def run(url: str) -> None:
        async with DriverClient(url) as client:
            await asyncio.wait_for(client.record(str(tmp_path), on_status=on_status), 0.5)

    with ScriptedDriver(script) as driver:
        with pytest.raises(ValueError if leave == "on_status raises" else TimeoutError):
            asyncio.run(run(driver.url))
        assert wait_until(lambda: len(driver.received) == 2, timeout=5)
    assert [m["command"] for m in driver.received] == ["start", "stop"]


@pytest.mark.parametrize("case", ["the driver runs another client's run", "the callback raises at the run's end"])
def test_a_record_left_by_its_callback_stops_no_run_that_is_not_its_own(tmp_path, case) -> None:
    """record() left by a raising callback sent stop whenever it had not seen its run end: with
    the driver busy (its start rejected) that stopped another client's recording, and a callback
    raising at file_saved sent a stop nobody asked for."""
    import asyncio

    from websockets.exceptions import ConnectionClosed

    from stddaq.client.record import DriverClient

    busy = case == "the driver runs another client's run"

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "recording", "count": 1} if busy else {"status": "idle"}))
        try:
            if not busy:
                received.append(json.loads(await ws.recv()))
                for status in ({"status": "creating_file"}, {"status": "recording", "count": 1},
                               {"status": "file_saved"}):
                    await ws.send(json.dumps(status))
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 1.0)))
        except (TimeoutError, ConnectionClosed):  # the client left
            return

    def on_status(message: dict) -> None:
        if busy or message["status"] == "file_saved":
            raise ValueError("a bug in the caller's callback")

    async def run(url: str) -> None:
        async with DriverClient(url) as client:
            await client.record(str(tmp_path), on_status=on_status)

    with ScriptedDriver(script) as driver:
        with pytest.raises(ValueError):
            asyncio.run(run(driver.url))
        time.sleep(0.3)
    assert [m["command"] for m in driver.received] == ([] if busy else ["start"])


def test_a_busy_driver_gets_no_start(tmp_path) -> None:
    """A start sent while another client's run went on could arrive just after that run's end:
    the client returned the other run's file_saved and count while its own run went on with
    nobody following it; a Ctrl-C before the driver's answer stopped the other client's run."""
    import asyncio

    from stddaq.client.record import DriverClient

    async def script(ws, received) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for status in ({"status": "recording", "count": 190}, {"status": "saving_file", "count": 200},
                           {"status": "file_saved"}, {"status": "idle"}):
                await ws.send(json.dumps(status))
                await asyncio.sleep(0.05)
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 1.0)))
        except (TimeoutError, ConnectionClosed):
            return

    async def run(url: str):
        async with DriverClient(url) as client:
            return await client.record(str(tmp_path), n_image=50, on_status=seen.append)

    seen: list[dict] = []
    with ScriptedDriver(script) as driver:
        result = asyncio.run(run(driver.url))
        time.sleep(0.3)
    assert (result.status, result.count, result.ok) == ("rejected", 0, False)
    assert "the driver is busy with another run (it is at recording)" in result.reason
    assert seen == result.statuses and len(seen) == 1
    assert driver.received == []


def test_a_client_kept_connected_but_not_reading_stays_connected(tmp_path) -> None:
    """A DriverClient kept between recordings (a scan script moving motors) was dead about 40 s
    later: websockets stopped reading once 16 statuses waited, so the keepalive timed out. Here the
    driver's keepalive is 0.2 s and it pushes 200 statuses while the client does not read."""
    import asyncio

    from stddaq.client.record import DriverClient

    async def script(ws, received) -> None:
        for count in range(200):
            await ws.send(json.dumps({"status": "recording", "count": count}))  # another client's run
        await ws.send(json.dumps({"status": "file_saved"}))
        await ws.send(json.dumps({"status": "idle"}))
        received.append(json.loads(await ws.recv()))
        for status in ({"status": "creating_file"}, {"status": "recording", "count": 2}, {"status": "file_saved"}):
            await ws.send(json.dumps(status))
        await asyncio.sleep(0.5)

    async def run(url: str):
        async with DriverClient(url) as client:
            await asyncio.sleep(1.5)  # busy elsewhere: nothing read
            return await client.record(str(tmp_path), n_image=2)

    with ScriptedDriver(script, ping_interval=0.2, ping_timeout=0.2) as driver:
        result = asyncio.run(run(driver.url))
    assert (result.status, result.count) == ("file_saved", 2)


def test_a_client_closed_or_read_twice_says_so_at_once() -> None:
    """close() from another task left a task waiting for a status waiting for ever; a second task
    waiting for statuses took them from the first at random, which then said "no status for 5 s";
    a second `async with` on a connected client left the first connection open."""
    import asyncio

    from stddaq.client.record import DriverClient, DriverError

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "idle"}))
        await asyncio.sleep(3)

    async def run(url: str) -> float:
        """Seconds the waiting task took to hear of the close."""
        client = DriverClient(url)
        async with client:
            await client.next_status(5)  # the first status: nothing waits now
            waiting = asyncio.ensure_future(client.next_status(None))
            await asyncio.sleep(0.1)
            with pytest.raises(DriverError, match="another task already waits for the statuses"):
                await client.next_status(1)
            with pytest.raises(DriverError, match="already connected"):
                await client.__aenter__()
            started = time.monotonic()
            await client.close()
            with pytest.raises(DriverError, match="this client closed the connection"):
                await asyncio.wait_for(waiting, 2)
            return time.monotonic() - started

    with ScriptedDriver(script) as driver:
        assert asyncio.run(run(driver.url)) < 1.5


def test_a_cancel_that_comes_with_a_status_is_not_lost_and_two_entries_at_once_are_refused() -> None:
    """Python 3.11's wait_for dropped a cancel that came in the loop step in which a status arrived:
    a monitor task cancelled so read statuses for ever. Two tasks entering one client together both
    got in, and the first connection was never closed."""
    import asyncio

    from stddaq.client.record import DriverClient, DriverError

    async def script(ws, received) -> None:
        await ws.send(json.dumps({"status": "idle"}))
        await asyncio.sleep(3)

    async def cancels(url: str) -> list[str]:
        outcomes = []
        async with DriverClient(url) as client:
            await client.next_status(5)
            for _ in range(5):
                waiting = asyncio.ensure_future(client.next_status(5))
                await asyncio.sleep(0.02)
                client._frames.append('{"status": "idle"}')  # what the reader task does with a status,
                client._arrived.set()
                waiting.cancel()  # and the cancel in the same step
                try:
                    await waiting
                    outcomes.append("returned")
                except asyncio.CancelledError:
                    outcomes.append("cancelled")
                client._frames.clear()
        return outcomes

    async def enter_twice(url: str) -> list[str]:
        client = DriverClient(url)

        async def enter() -> str:
            try:
                async with client:
                    await asyncio.sleep(0.2)
                    return "in"
            except DriverError as exc:
                return str(exc)

        return await asyncio.gather(enter(), enter())

    with ScriptedDriver(script) as driver:
        assert asyncio.run(cancels(driver.url)) == ["cancelled"] * 5
        inside, refused = asyncio.run(enter_twice(driver.url))
    assert inside == "in" and "this client is already connected" in refused


def test_a_start_the_driver_rejects_counts_no_images(tmp_path) -> None:
    """Two clients found the driver idle and sent a start; the other's came first: the rejected
    one's result carried the other run's count (21 images) though it recorded nothing."""
    run = [{"status": "creating_file"}, {"status": "recording", "count": 21},
           {"status": "rejected", "reason": "driver is busy!"}]
    from stddaq.client.record import record

    with ScriptedDriver(lambda ws, received: _play(ws, received, run)) as driver:
        result = record(driver.url, str(tmp_path), n_image=5)
    assert (result.status, result.count, result.ok) == ("rejected", 0, False)
    assert result.reason == "driver is busy!"


def test_a_client_kept_connected_takes_no_old_status_for_its_runs(tmp_path) -> None:
    """A DriverClient kept connected without reading while another client ran a recording took
    that run's statuses, queued in its connection, for its own: it returned the other run's
    file_saved and count while its own run went on."""
    import asyncio

    from stddaq.client.record import DriverClient

    async def script(ws, received) -> None:  # another client's whole run, then idle
        for status in ([{"status": "recording", "count": c} for c in range(1, 51)] +
                       [{"status": "saving_file", "count": 50}, {"status": "file_saved"}, {"status": "idle"}]):
            await ws.send(json.dumps(status))
        received.append(json.loads(await ws.recv()))
        for status in ({"status": "creating_file"}, {"status": "recording", "count": 3},
                       {"status": "saving_file", "count": 3}, {"status": "file_saved"}):
            await asyncio.sleep(0.02)
            await ws.send(json.dumps(status))
        await asyncio.sleep(0.5)

    async def run(url: str):
        async with DriverClient(url) as client:
            await asyncio.sleep(0.3)  # connected, not reading: the statuses queue up
            return await client.record(str(tmp_path), n_image=3)

    with ScriptedDriver(script) as driver:
        result = asyncio.run(run(driver.url))
    assert (result.status, result.count) == ("file_saved", 3) and result.complete
    assert [m.get("count") for m in result.statuses if m["status"] == "recording"] == [3]


@pytest.mark.parametrize("url", ["ws://localhost:8080", "WS://daq-host:8080/", "wss://proxy/stddaq",
                                 "ws://proxy:80/stddaq/driver", "ws://user:pw@daq-host:8080", "ws://[::1]:8080",
                                 "ws://[fe80::1%eth0]:8080", "ws://daq-host.psi.ch.:8080", "ws://münchen.de:8080"])
def test_every_form_of_driver_address_is_taken(url) -> None:
    """The check took only ws://host:port: a driver behind a proxy (a path, the default port of
    wss), an IPv6 zone, or the driver's own IPv6 address as it printed it were refused."""
    from stddaq.client.record import DriverClient, check_driver_url

    assert check_driver_url(url) == url and DriverClient(url).url == url


def test_a_client_used_closed_or_unconnected_says_so() -> None:
    """Reading a closed LiveStreamClient, or a DriverClient outside `async with`, raised a bare
    AttributeError of None."""
    import asyncio

    from stddaq.client import LiveStreamClient
    from stddaq.client.record import DriverClient, DriverError

    client = LiveStreamClient("tcp://127.0.0.1:9", timeout=0.01)
    assert client.receive() is None
    client.close()
    with pytest.raises(RuntimeError, match="LiveStreamClient of tcp://127.0.0.1:9 is closed"):
        client.receive()
    driver = DriverClient("ws://127.0.0.1:9")
    with pytest.raises(DriverError, match="not connected to the driver at ws://127.0.0.1:9: use the client inside"):
        asyncio.run(driver.stop())
    with pytest.raises(DriverError, match="not connected"):
        asyncio.run(driver.next_status(timeout=0.1))
