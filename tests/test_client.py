"""The stream client: no HDF5 import, `stddaq watch` on a real stream, deploy plan of live streams."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_plan_starts_one_live_stream_per_configured_address(make_config) -> None:
    config, path = make_config(live_stream_configs={"tcp://127.0.0.1:9100": {"type": "forward"},
                                                    "tcp://127.0.0.1:9101": {"type": "batch", "config": [1, 10]}})
    specs = plan(config, Path(path))
    streams = [s for s in specs if s.name.startswith("std_live_stream")]
    assert [s.argv[-3:] for s in streams] == [["stddaq.services.live_stream", str(path), "tcp://127.0.0.1:9100"],
                                              ["stddaq.services.live_stream", str(path), "tcp://127.0.0.1:9101"]]
