#!/usr/bin/env bash
# The test suite: set up, then pytest (real Ray cluster, real DeepSpeed engines on CPU workers).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -q "$@"
