#!/usr/bin/env bash
# The test suite against the lowest supported release of every dependency (scripts/lowest-supported.txt,
# pyproject.toml's lower bounds), in a fresh virtual environment in a temporary folder.
#
#     bash scripts/test_lowest_supported.sh [PYTEST ARGS...]      (default: -q -n auto)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d "${TMPDIR:-/tmp}/lrq-lowest-venv.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet -c scripts/lowest-supported.txt -e ".[dev,rtx,serve,minilm,genai,lmeval]"
pip freeze | grep -iE "^(torch|transformers|timm|tokenizers|safetensors|onnx|onnxscript|onnxruntime|onnxruntime-genai|polygraphy|numpy|triton|lm.eval|compressed.tensors|tritonclient)=="
if [ $# -eq 0 ]; then set -- -q -n auto; fi
pytest "$@"
