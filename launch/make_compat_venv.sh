#!/usr/bin/env bash
# Creates ./.venv-compat: an older transformers (4.57, the 4.x line serving stacks and vLLM's loader still
# pin) beside the same torch, in which the export tests load exported folders as such a client would.
# Made once: a finished venv carries .venv-compat/.complete and is left alone (about a minute to make).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
venv=.venv-compat

[ -f "$venv/.complete" ] && exit 0
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q "$torch_spec" "transformers==4.57.*" safetensors tokenizers jinja2
touch "$venv/.complete"
