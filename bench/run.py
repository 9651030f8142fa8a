"""Runs every bench/bench_*.py (or those named) and prints their figure lines.

    python bench/run.py            # all
    python bench/run.py bus        # bench_bus.py only
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    failed = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    for name in names:
        print(f"== bench_{name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"bench_{name}.py")], env=env).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
