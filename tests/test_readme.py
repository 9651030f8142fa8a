"""README promises: the third-party consumer reads exact pixels; the demo command works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import wait_until
from grpc_tools import protoc

from stddaq.patterns import ramp

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert blocks[0].strip() == "pip install -e . && stddaq up --duration 30"
    assert blocks[1].strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_third_party_consumer_reads_exact_pixels(make_config, service, tmp_path: Path) -> None:
    code = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if b.startswith("# consumer.py"))
    (tmp_path / "consumer.py").write_text(code)
    # what a third party does: compile the shipped .proto with protoc, use only pyzmq/protobuf/mmap
    proto_dir = ROOT / "src" / "stddaq" / "protocol"
    (tmp_path / "image_metadata.proto").write_text((proto_dir / "image_metadata.proto").read_text())
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", str(tmp_path / "image_metadata.proto")]) == 0

    config, path = make_config(image_pixel_height=16, image_pixel_width=20, ram_buffer_slots=50)
    n = 12
    sim = service("stddaq.services.simulator", path, "--n-images", n, "--start-id", 100, "--rate", 50,
                  "--wait-subscribers", 1)
    assert wait_until(lambda: os.path.exists(f"/dev/shm/{config.channel('image')}"), timeout=10)
    out = subprocess.run([sys.executable, "consumer.py", config.detector_name, "16", "20", "50", str(n)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")[:n]
    for image_id, line in zip(range(100, 100 + n), lines, strict=True):
        expected = ramp(image_id, (16, 20), "uint16")
        assert line.split() == [str(v) for v in (image_id, 16, 20, expected[0, 0], expected[-1, -1],
                                                 int(expected.sum(dtype=int)))]
    assert sim.wait(timeout=30) == 0


def test_demo_runs_and_cleans_up() -> None:
    out = subprocess.run([sys.executable, "-m", "stddaq.cli", "up", "--duration", "4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "[std_sim]" in out.stdout and "service=std_bus_monitor" in out.stdout
    monitor = [ln for ln in out.stdout.splitlines() if "service=std_bus_monitor,processed_times=" in ln]
    assert monitor and all(",lost=0," in ln and ",corrupt=0" in ln for ln in monitor)
    assert any(int(ln.split("processed_times=")[1].split(",")[0]) > 500 for ln in monitor)
    left = [e for e in os.listdir("/dev/shm") + os.listdir("/tmp") if e.startswith("stddaq-demo-")]
    # seen once in CI (the driver's driver-<i> ipc files): say what the services and the supervisor said
    said = [ln for ln in (out.stdout + out.stderr).splitlines()
            if "std_det_driver" in ln or "killing" in ln or "Traceback" in ln or "Error" in ln]
    assert not left, f"left behind: {left}; last lines of the driver and supervisor:\n" + "\n".join(said[-30:])
