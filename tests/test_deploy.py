"""`stddaq up`'s supervisor: starts children, forwards their output, restarts crashed ones, stops all."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

from stddaq.bus import ImagePublisher, ImageSubscriber
from stddaq.deploy import (
    ServiceSpec,
    Supervisor,
    check_buffers_fit,
    check_ports_free,
    claim_deployment,
    config_snapshot,
    listening_ports,
    plan,
)
from stddaq.errors import ConfigError, UsageError


def _run(supervisor: Supervisor, duration: float | None = None) -> threading.Thread:
    thread = threading.Thread(target=supervisor.run, args=(duration,))
    thread.start()
    return thread


def test_killed_simulator_is_restarted_and_takes_over_its_buffer(make_config) -> None:
    config, path = make_config()
    out = io.StringIO()
    supervisor = Supervisor([s for s in plan(config, path) if s.name == "std_sim"], out=out)
    thread = _run(supervisor)
    try:
        sim = supervisor.children[0]
        assert wait_until(lambda: os.path.exists(f"/dev/shm/{config.channel('image')}"), timeout=15)
        first_pid = sim.process.pid
        os.kill(first_pid, signal.SIGKILL)
        assert wait_until(lambda: sim.process is not None and sim.process.pid != first_pid
                          and sim.process.poll() is None, timeout=15)
        with ImageSubscriber(config) as subscriber:  # the new simulator publishes again
            assert subscriber.receive(timeout=10) is not None
        assert "left behind by a writer that is gone" in out.getvalue()
    finally:
        supervisor.stop()
        thread.join(timeout=30)
    assert "[std_sim]" in out.getvalue()
    # it ran on, but a script checking `stddaq up`'s exit code must hear of the crash (it exited 0)
    assert supervisor.failed == "services ended by themselves and were restarted: std_sim 1 time(s)"


def test_a_restarted_service_runs_the_config_up_read_not_an_edit_of_the_file(make_config) -> None:
    """An operator edits the config for the next run while the deployment runs; a service that
    then crashes is restarted on the config the others run: another image size replaced the ring
    buffer under the readers (they read nothing more), a broken edit stopped the deployment."""
    config, path = make_config()
    fd, env = config_snapshot(path.read_text(), path)
    out = io.StringIO()
    supervisor = Supervisor([s for s in plan(config, path) if s.name == "std_sim"], out=out, env=env,
                            pass_fds=(fd,))
    thread = _run(supervisor)
    shm = Path(f"/dev/shm/{config.channel('image')}")
    try:
        sim = supervisor.children[0]
        assert wait_until(shm.exists, timeout=15)
        size = shm.stat().st_size
        with ImageSubscriber(config) as subscriber:
            for edit in ({**json.loads(path.read_text()), "image_pixel_height": config.image_pixel_height // 2},
                         "{ broken"):
                path.write_text(edit if isinstance(edit, str) else json.dumps(edit))
                first_pid = sim.process.pid
                os.kill(first_pid, signal.SIGKILL)
                assert wait_until(lambda: sim.process is not None and sim.process.pid != first_pid  # noqa: B023
                                  and sim.process.poll() is None, timeout=15)
                image = subscriber.receive(timeout=10)
                assert image is not None, f"no image after the restart with {edit!r:.40} in the file"
                assert (image.metadata.height, image.metadata.width) == (config.image_pixel_height,
                                                                          config.image_pixel_width)
                assert shm.stat().st_size == size
    finally:
        supervisor.stop()
        thread.join(timeout=30)
        os.close(fd)
    assert "refused" not in out.getvalue()
    assert supervisor.failed == "services ended by themselves and were restarted: std_sim 2 time(s)"


def test_the_config_snapshot_takes_any_file_name_and_is_read_once(make_config, monkeypatch, tmp_path) -> None:
    """A config file name of 240 characters (memfd names end at 249 bytes) crashed `up` with a
    traceback; a second load_config in one process read whatever file then had the fd's number."""
    from stddaq.services.base import CONFIG_SNAPSHOT_ENV, load_config

    config, path = make_config()
    long_path = tmp_path / ("c" * 240 + ".json")
    long_path.write_text(path.read_text())
    fd, env = config_snapshot(long_path.read_text(), long_path)
    monkeypatch.setenv(CONFIG_SNAPSHOT_ENV, env[CONFIG_SNAPSHOT_ENV])
    long_path.write_text("{ edited")
    assert load_config(str(long_path)).detector_name == config.detector_name  # the snapshot
    assert CONFIG_SNAPSHOT_ENV not in os.environ
    with pytest.raises(ConfigError, match="invalid JSON"):  # the file itself, as edited
        load_config(str(long_path))
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by load_config


def test_crash_loop_ends_the_deployment_with_a_reason() -> None:
    crasher = ServiceSpec("crasher", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    out = io.StringIO()
    supervisor = Supervisor([crasher], backoff=0.02, out=out)
    assert supervisor.run(duration=60) == 1
    assert "crasher crashed" in supervisor.failed and "exit code 3" in supervisor.failed
    assert out.getvalue().count("[crasher] boom") == supervisor.children[0].quick_crashes


def test_stop_terminates_children_that_ignore_sigterm() -> None:
    stubborn = ServiceSpec("stubborn", [sys.executable, "-c",
                                        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                                        "print('up', flush=True); time.sleep(60)"])
    out = io.StringIO()
    supervisor = Supervisor([stubborn], grace=0.5, out=out)
    thread = _run(supervisor)
    assert wait_until(lambda: "[stubborn] up" in out.getvalue(), timeout=15)
    supervisor.stop()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert supervisor.children[0].process.poll() is not None


def _listener(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_up_refuses_a_busy_live_stream_port_before_starting_anything(make_config) -> None:
    busy, port = _listener()
    try:
        _, path = make_config(number_of_writers=0,
                              live_stream_configs={f"tcp://127.0.0.1:{port}": {"type": "forward"}})
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "20"],
                             capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 2
    assert time.monotonic() - started < 15  # refused at once, not after a crash loop
    assert f"std_live_stream tcp://127.0.0.1:{port} cannot listen on 127.0.0.1:{port}: the port is in use" \
        in out.stderr
    assert "live_stream_configs" in out.stderr and "[std_sim]" not in out.stdout  # nothing was started


def test_up_refuses_buffers_that_do_not_fit_in_dev_shm_before_starting_anything(make_config) -> None:
    """An image of 100000x100000 passed, then the simulator and the monitor died of MemoryError
    and were restarted until `up` gave up; ring buffers of stages that together do not fit
    failed one by one after the others started."""
    config, path = make_config(image_pixel_height=100000, image_pixel_width=100000, number_of_writers=0)
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "20"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "[std_sim]" not in out.stdout, out.stdout + out.stderr
    assert (f"no room in /dev/shm for the RAM buffer /dev/shm/{config.channel('image')} ({config.n_slots} slots "
            f"of {config.image_n_bytes} bytes each): ") in out.stderr and "lower ram_buffer_slots" in out.stderr
    assert not Path(f"/dev/shm/{config.channel('image')}").exists()
    # alone, the simulator says so too, instead of a MemoryError of its pattern
    sim = subprocess.run([sys.executable, "-m", "stddaq.services.simulator", str(path), "--n-images", "1"],
                         capture_output=True, text=True, timeout=60)
    assert sim.returncode == 2 and "no room in /dev/shm" in sim.stderr and "MemoryError" not in sim.stderr

    # each of two buffers fits, the two together do not
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    config, _ = make_config(image_pixel_height=512, image_pixel_width=1024,
                            ram_buffer_slots=int(free * 0.7) // (512 * 1024 * 2),
                            compression_stages={"blosc2": {"threads": 1}})
    with pytest.raises(ConfigError, match=rf"no room in /dev/shm for the 2 RAM buffers /dev/shm/"
                                          rf"{{{config.channel('image')},{config.channel('blosc2')}}} .*"
                                          r"\(lower ram_buffer_slots, make the images smaller"):  # gb: not used
        check_buffers_fit(config)
    check_buffers_fit(make_config(compression_stages={"blosc2": {"threads": 1}})[0])  # a small one passes

    # a buffer left by a crashed deployment counts with the pages it holds, not with its size (one
    # never fully written holds fewer): it let any deployment of that detector through
    config, _ = make_config(image_pixel_height=512, image_pixel_width=1024,
                            ram_buffer_slots=int(free * 1.2) // (512 * 1024 * 2))
    leftover = Path(f"/dev/shm/{config.channel('image')}")
    with open(leftover, "wb") as f:
        f.truncate(config.buffer_n_bytes)  # its size, no pages
    try:
        with pytest.raises(ConfigError, match="no room in /dev/shm"):
            check_buffers_fit(config)
    finally:
        leftover.unlink()
    # at the floor of 1000 slots ram_buffer_gb gives, lowering it cannot help: the hint says what does
    config, _ = make_config(image_pixel_height=100000, image_pixel_width=100000, ram_buffer_slots=None,
                            ram_buffer_gb=1)
    with pytest.raises(ConfigError, match="ram_buffer_gb gives at least 1000 slots: set ram_buffer_slots lower"):
        check_buffers_fit(config)


def test_up_refuses_a_live_stream_host_that_is_not_of_this_machine_before_starting_anything(make_config) -> None:
    """The live stream crash-looped for 20 s on an unresolvable host before `up` gave up."""
    _, path = make_config(number_of_writers=0,
                          live_stream_configs={"tcp://no-such-host.invalid:9123": {"type": "forward"}})
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "20"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and time.monotonic() - started < 15 and "[std_sim]" not in out.stdout
    assert ("std_live_stream tcp://no-such-host.invalid:9123 cannot listen on no-such-host.invalid:9123: "
            "'no-such-host.invalid' is no interface, address or resolvable name of this machine") in out.stderr
    check_ports_free([("std_live_stream tcp://lo:9123", "lo", 9123)])  # an interface name: zmq binds it
    for bad in ("a..b", "x" * 64 + ".org", "a\0b"):  # getaddrinfo raised UnicodeError / ValueError: a traceback
        with pytest.raises(UsageError, match="cannot listen on .*(no host name or address|is no interface)"):
            check_ports_free([(f"std_live_stream tcp://{bad}:9123", bad, 9123)])


def test_up_refuses_a_second_deployment_of_a_running_detector(make_config) -> None:
    """A second `stddaq up` of one detector took the first one's ipc names (its sim crash-looped
    meanwhile) and removed them when it ended: the first could never reconnect a writer. That
    is what it says first, not that the running one's live stream port is in use."""
    busy, port = _listener()  # the running deployment's live stream
    try:
        config, path = make_config(number_of_writers=1,
                                   live_stream_configs={f"tcp://127.0.0.1:{port}": {"type": "forward"}})
        with ImagePublisher(config):  # the running deployment's source
            out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "20"],
                                 capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 2 and "[std_sim]" not in out.stdout
    assert (f"a deployment of {config.detector_name} is already running: /tmp/{config.channel('image')} is in use"
            in out.stderr), out.stderr


def test_up_refuses_a_deployment_started_at_the_same_time(make_config) -> None:
    """Two `stddaq up` of one detector started together both found no service listening yet; the
    one that lost removed the other's buffer and sockets at its end. The first one's claim,
    held from its start, refuses the second before it starts or removes anything."""
    config, path = make_config(number_of_writers=0)
    claim = claim_deployment(config)  # a `stddaq up` of it that has not started a service yet
    try:
        with pytest.raises(UsageError, match="already running: another `stddaq up` of it holds its claim"):
            claim_deployment(config)
        out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "20"],
                             capture_output=True, text=True, timeout=60)
    finally:
        claim.close()
    assert out.returncode == 2 and "[std_sim]" not in out.stdout
    assert f"a deployment of {config.detector_name} is already running: another `stddaq up`" in out.stderr, out.stderr
    claim_deployment(config).close()  # released with its holder


def test_up_driver_port_option_and_a_busy_driver_port(make_config) -> None:
    config, _ = make_config(number_of_writers=1, live_stream_configs={"tcp://*:9100": {"type": "forward"}})
    ports = listening_ports(config, driver_port=8123)
    assert ports == [("std_live_stream tcp://*:9100", "0.0.0.0", 9100), ("std_det_driver (websocket)", "0.0.0.0", 8123)]
    assert any(spec.argv[-2:] == ["-p", "8123"] for spec in plan(config, Path("x.json"), driver_port=8123))
    busy, port = _listener("0.0.0.0")
    try:
        with pytest.raises(UsageError, match=rf"std_det_driver \(websocket\) cannot listen on 0.0.0.0:{port}: "
                                             "the port is in use .*--driver-port"):
            check_ports_free([("std_det_driver (websocket)", "0.0.0.0", port)])
    finally:
        busy.close()
    check_ports_free([("std_det_driver (websocket)", "0.0.0.0", port)])  # free again: no error
    with pytest.raises(UsageError, match=rf"std_det_driver \(websocket\) and std_live_stream tcp://\*:{port} both "
                                         f"want port {port}"):
        check_ports_free(listening_ports(
            make_config(number_of_writers=1, live_stream_configs={f"tcp://*:{port}": {"type": "forward"}})[0],
            driver_port=port))


def test_up_rejects_a_driver_port_out_of_range() -> None:
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", "--driver-port", "70000", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "70000 is not allowed: must be a TCP port 0..65535" in out.stderr


def test_a_child_stopped_from_outside_is_restarted() -> None:
    """A service that ended with exit 0 (an operator's SIGTERM to its pid) was not restarted: the
    deployment ran on without it, and `stddaq up` said nothing but an info line."""
    quitter = ServiceSpec("quitter", [sys.executable, "-c", "print('up', flush=True)"])
    out = io.StringIO()
    supervisor = Supervisor([quitter], backoff=0.02, out=out)
    thread = _run(supervisor)
    try:
        assert wait_until(lambda: out.getvalue().count("[quitter] up") >= 2, timeout=15)
    finally:
        supervisor.stop()
        thread.join(timeout=15)


def test_a_child_refusing_its_config_is_not_restarted() -> None:
    """Exit code 2 is a usage or config error: a restart fails the same way (it was retried 6
    times, ~20 s, before the deployment gave up)."""
    refuser = ServiceSpec("refuser", [sys.executable, "-c", "import sys; print('bad key'); sys.exit(2)"])
    out = io.StringIO()
    supervisor = Supervisor([refuser], backoff=0.02, out=out)
    assert supervisor.run(duration=60) == 1
    assert "refuser refused its arguments or config" in supervisor.failed
    assert out.getvalue().count("[refuser] bad key") == 1


def test_a_broken_output_does_not_block_the_children() -> None:
    """`stddaq up | head`: the forwarding thread died at the first failed write and stopped
    reading the child's pipe; once the pipe was full the child blocked in its next log line."""
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    done = Path(f"/tmp/stddaq-test-forward-{os.getpid()}")
    talker = ServiceSpec("talker", [sys.executable, "-c", f"import pathlib, time\nfor i in range(5000): print('x' * 100)\n"
                                                          f"pathlib.Path({str(done)!r}).touch(); time.sleep(60)"])
    supervisor = Supervisor([talker], grace=1, out=Broken())
    thread = _run(supervisor)
    try:
        assert wait_until(done.exists, timeout=20), "the child blocked writing its output"
    finally:
        supervisor.stop()
        thread.join(timeout=15)
        done.unlink(missing_ok=True)


def test_a_child_that_cannot_start_stops_those_started() -> None:
    sleeper = ServiceSpec("sleeper", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"])
    missing = ServiceSpec("missing", ["/nonexistent/stddaq-service"])
    supervisor = Supervisor([sleeper, missing], grace=2, out=io.StringIO())
    with pytest.raises(FileNotFoundError):
        supervisor.run(duration=60)
    assert supervisor.children[0].process.poll() is not None


def test_stop_first_children_finish_while_the_others_still_run(tmp_path) -> None:
    """The driver saves a recording when stopped, which needs its writers: they were all
    signalled at once, so the writers were gone and the recording ended in error, no master."""
    pid_file = tmp_path / "worker.pid"
    worker = ServiceSpec("worker", [sys.executable, "-c", f"import os, pathlib, time; pathlib.Path({str(pid_file)!r})"
                                                          ".write_text(str(os.getpid())); time.sleep(60)"])
    saver = ServiceSpec("saver", [sys.executable, "-c",
                                  "import os, pathlib, signal, sys, time\n"
                                  "def saving(*_):\n"
                                  "    time.sleep(1)  # saving takes a while; its worker must still be there\n"
                                  f"    pid = int(pathlib.Path({str(pid_file)!r}).read_text())\n"
                                  "    os.kill(pid, 0)  # raises if the worker is gone\n"
                                  "    print('saved with the worker running', flush=True); sys.exit(0)\n"
                                  "signal.signal(signal.SIGTERM, saving)\n"
                                  "print('up', flush=True)\n"
                                  "while True: time.sleep(1)"], stop_first=True, grace=20)
    out = io.StringIO()
    supervisor = Supervisor([worker, saver], grace=5, out=out)
    thread = _run(supervisor)
    assert wait_until(lambda: "[saver] up" in out.getvalue() and pid_file.exists(), timeout=15)
    supervisor.stop()
    thread.join(timeout=30)
    assert "[saver] saved with the worker running" in out.getvalue(), out.getvalue()
    assert supervisor.failed is None


def test_a_killed_child_fails_the_run_and_its_leftovers_are_removed(tmp_path) -> None:
    left = tmp_path / "det-driver-0"
    stubborn = ServiceSpec("stubborn", [sys.executable, "-c",
                                        f"import pathlib, signal, time; pathlib.Path({str(left)!r}).touch();"
                                        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
                                        "time.sleep(60)"])
    out = io.StringIO()
    supervisor = Supervisor([stubborn], grace=0.5, out=out, leftovers=[left])
    thread = _run(supervisor)
    assert wait_until(lambda: "[stubborn] up" in out.getvalue(), timeout=15)
    supervisor.stop()
    thread.join(timeout=15)
    assert supervisor.failed == "stubborn did not stop in time and was killed"
    assert not left.exists()


@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_children_end_with_the_supervisor_however_it_ends(make_config, how) -> None:
    """The supervisor ended by SIGHUP (its ssh session closed) or SIGKILL left its children
    running, orphaned with their shm and sockets."""
    config, path = make_config(number_of_writers=0)
    started = time.time() - 1
    proc = subprocess.Popen([sys.executable, "-m", "stddaq.cli", "up", str(path), "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    shm = Path(f"/dev/shm/{config.channel('image')}")
    try:
        assert wait_until(shm.exists, timeout=30)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert children
        proc.send_signal(getattr(signal, how))
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and
                                          "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
                                          for pid in children), timeout=20), "children still running"
        assert wait_until(lambda: not shm.exists(), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert not [p for p in Path("/tmp").glob("stddaq-up-*") if p.stat().st_mtime >= started], \
        "a supervisor with a config file made a temporary directory (a SIGKILL leaves it behind)"
