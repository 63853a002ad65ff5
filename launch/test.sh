#!/usr/bin/env bash
# The test suite: set up, then pytest (real Ray cluster, real DeepSpeed engines on CPU workers).
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k config`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The real pretrained encoder the task tests fine-tune (fetched once; later runs find it).
.venv/bin/python launch/prepare_minilm.py
# The real SmolLM2-135M-Instruct the export test fine-tunes and exports once (the demo's model).
.venv/bin/python launch/prepare_demo_model.py
# The linter first (pyproject [tool.ruff]): seconds, and a style slip fails before the suite's minutes.
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
