#!/usr/bin/env bash
# The quickstart: set up, fetch and convert SmolLM2-135M-Instruct once, then fine-tune it on the
# shipped date-normalisation task with 2 CPU workers (ZeRO-2). Extra arguments go to `sft-dist train`,
# e.g. `bash launch/demo.sh --set train.max_steps=10`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/python launch/prepare_demo_model.py
exec .venv/bin/sft-dist train configs/quickstart.yaml "$@"
