"""Shared pieces of the benchmarks: configs, subprocess roles, result lines.

Every figure is printed as ``name: value unit (ratio X.XX vs baseline value unit; goal ...)`` where
the baseline was measured in the same run on the same machine, because these machines are
shared and noisy.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stddaq.config import DetectorConfig

HERE = Path(__file__).resolve().parent


def make_config(height: int, width: int, *, n_slots: int, detector_type: str = "gigafrost", bit_depth: int = 16,
                **extra) -> tuple[DetectorConfig, Path]:
    data = {"detector_name": f"bench{uuid.uuid4().hex[:8]}", "detector_type": detector_type,
            "image_pixel_height": height, "image_pixel_width": width, "bit_depth": bit_depth,
            "stats_collection_period": 60, "ram_buffer_slots": n_slots, "log_level": "warning", **extra}
    path = Path(tempfile.mkdtemp(prefix="stddaq-bench-")) / "detector.json"
    atexit.register(shutil.rmtree, path.parent, True)  # benches make one per trial: none is left behind
    path.write_text(json.dumps(data))
    return DetectorConfig.load(path), path


def spawn(*argv: str, **popen: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), env_path()]) if env_path() else str(HERE))
    return subprocess.Popen([sys.executable, *map(str, argv)], env=env, **popen)


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")


def report(name: str, value: float, unit: str, baseline: float, goal: str) -> str:
    ratio = value / baseline if baseline else float("nan")
    line = f"{name}: {value:,.1f} {unit} (ratio {ratio:.2f} vs baseline {baseline:,.1f} {unit}; goal {goal})"
    print(line, flush=True)
    return line


class Timer:
    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float = 0.0
        self.count = 0

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    def rate(self) -> float:
        """Items per second between the first and the last item (the first one starts the clock)."""
        if self.first is None or self.count < 2:
            return 0.0
        return (self.count - 1) / (self.last - self.first)
