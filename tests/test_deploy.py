"""`stddaq up`'s supervisor: starts children, forwards their output, restarts crashed ones, stops all."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading

from conftest import wait_until

from stddaq.bus import ImageSubscriber
from stddaq.deploy import ServiceSpec, Supervisor, plan


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
