#!/usr/bin/env bash
# The GPU checks in one call of a lent GPU machine: the gpu-marked tests, then scripts/bench.py on
# Llama-3.2-1B-shaped random weights (64 streams, 128-token prompts, 256 output tokens) against
# `transformers serve --continuous-batching`, with flex decode attention, then with gather + SDPA.
#
#   scripts/gpu_check.sh prepare   # here, where pip and the embedded model are at hand: fills .gpu/
#   scripts/gpu_check.sh run       # there, with .gpu carried; logs and bench JSON land in $OUT
#
# The machine has torch, transformers, httpx and pytest but not the server's other dependencies, and the
# embedded SmolLM2 (93 MB) does not travel: `prepare` downloads the missing wheels for its Python 3.12 and
# saves a 6 MB random-weight model with SmolLM2's tokenizer and chat template, which the tests' session
# server serves there (RESPSERVE_MODEL) and the bench takes its tokenizer from. Each part has its own
# timeout and writes as it goes, so one that hangs leaves the others' results; all of it fits in 600 s.
set -euo pipefail
cd "$(dirname "$0")/.."

# Already on the machine's image: copies from here would only shadow them.
# transformers and huggingface_hub travel, at the versions installed here: the image's transformers (5.17 as
# of 2026-11) predates the `cache` keyword the engine passes (pyproject.toml), and ours checks at import
# for a newer huggingface_hub than the image's (1.33).
ON_IMAGE="attrs certifi charset_normalizer click filelock fsspec h11 hf_xet idna numpy
packaging pillow pyyaml regex requests safetensors sniffio tqdm urllib3 zipp annotated_doc"

installed() {
    .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"
}

prepare() {
    rm -rf .gpu && mkdir -p .gpu/whl
    local platforms=()
    for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${tag}_x86_64")
    done
    .venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
        -d .gpu/whl fastapi uvicorn pydantic pydantic-settings sse-starlette platformdirs llguidance mcp openai \
        jsonschema pypdf python-multipart cryptography gguf diffusers psycopg psycopg-binary psycopg-pool \
        "transformers==$(installed transformers)" "huggingface_hub==$(installed huggingface_hub)"
    for name in $ON_IMAGE; do
        rm -f .gpu/whl/"$name"-*.whl
    done
    HF_HUB_OFFLINE=1 .venv/bin/python - <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
from bench import build_random_model

build_random_model("micro", Path(".gpu/model"), "bfloat16")
EOF
    du -sh .gpu
}

run() {
    local out="${OUT:-gpu-results}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src:$PWD/scripts" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        RESPSERVE_MODEL="$PWD/.gpu/model" timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
            tests/test_gpu.py tests/test_cuda_graphs.py tests/test_paged_engine.py tests/test_flex_decode.py \
            tests/test_images.py tests/test_image_edits.py
    } 2>&1 | tee "$out/tests.log" || true
    # GPU_CHECK_SHAPE=tiny: a shape a CPU runs in minutes, to check this script itself.
    local bench=(python3 scripts/bench.py --random-init "${GPU_CHECK_SHAPE:-llama-1b}" --tokenizer .gpu/model
        --concurrency 1 64 --prompt-tokens 128 --max-output-tokens 256 --ban-eos --requests-per-client 1 --rounds 1)
    {
        RESPSERVE_DECODE_ATTENTION=flex timeout 290 "${bench[@]}" --peers respserve,transformers --out "$out/flex"
        RESPSERVE_DECODE_ATTENTION=gather timeout 130 "${bench[@]}" --peers respserve --port 8200 --out "$out/gather"
    } 2>&1 | tee "$out/bench.log" || true
    # At most 8 files come back: the logs, each run's bench.json and its servers' logs, not the plots.
    rm -f "$out"/*/bench.png
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: $0 prepare|run" >&2
        exit 2
        ;;
esac
