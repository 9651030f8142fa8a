#!/usr/bin/env bash
# The project's one test command (README, CI): installs what the tests need, then runs them.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_bus.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

python3 -m ruff check src tests bench
python3 -m pytest -q "$@"
