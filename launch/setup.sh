#!/usr/bin/env bash
# Creates ./.venv and installs sft_dist (editable) with the extras the tests use: dev, GGUF, the
# TensorBoard and MLflow sinks, bench (TRL), tune (Optuna) and vision (detection's scipy and pycocotools); and
# ./.venv-compat, the older transformers the export tests load exported folders with (launch/make_compat_venv.sh,
# made once).
# Safe to run again: it reinstalls only when pyproject.toml changed since the last install.
# TORCH_SPEC picks the torch build: the default pin resolves to the CPU build on this project's CI
# machines; on a GPU machine install a CUDA build of the same range first (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.installed-from

[ -x .venv/bin/python ] || "$python" -m venv .venv
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $torch_spec"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$torch_spec"
  .venv/bin/python -m pip install -q -e ".[dev,gguf,tensorboard,mlflow,bench,tune,vision]"
  echo "$want" > "$stamp"
fi

# The lint test of the shell scripts (tests/test_cluster_files.py) runs shellcheck, a Debian package.
# Installed where apt-get can (root, as on CI); elsewhere that test is skipped and pytest's summary says so.
if ! command -v shellcheck >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && apt-get install -y -qq shellcheck; } >/dev/null 2>&1 \
    || echo "setup: could not install shellcheck; the shell scripts' lint test will be skipped" >&2
fi
bash launch/make_compat_venv.sh
