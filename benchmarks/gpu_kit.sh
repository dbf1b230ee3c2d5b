#!/usr/bin/env bash
# The GPU run kit: what a session with a lent GPU machine runs (README "GPU").
#
#   bash benchmarks/gpu_kit.sh download        # here, with registry access: fill .whl/ (ignored by git)
#   bash benchmarks/gpu_kit.sh bench [ARGS]    # there (Python 3.12 + torch 2.11, no registry): install the
#                                              # wheels into /tmp/site and run bench_gpu.py [ARGS]
#   bash benchmarks/gpu_kit.sh test            # there: the same wheels, then pytest -m gpu
#
# The GPU machine has torch, numpy, transformers, huggingface-hub, safetensors, pillow, psutil, pytest, ...
# (/work/.library/device/KINDS.md); the project's other imports travel as wheels. Never pip-install the
# project there: it pins another torch. Results (JSON + logs) go to $OUT when set, else benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
# What bench_gpu.py, the trainer, the Serve renderer's pipeline and the gpu tests import beyond that image
# (the versions this project is tested with; binary ones for CPython 3.12).
PACKAGES=(
  diffusers==0.42.1
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0
  tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  diffrp-nvdiffrast==0.3.3.1
)
DEEPSPEED=deepspeed==0.19.8  # an sdist only: built here into a py3-none-any wheel

# The gpu-marked tests (collecting the whole suite would import Ray, submitit, ... which the machine lacks).
GPU_TESTS=(
  tests/avatars/training/test_precision.py tests/avatars/training/test_compile.py
  tests/avatars/data/test_device_feed.py tests/avatars/test_host_sync.py tests/avatars/test_render_pipeline.py
  tests/shards/test_raster.py
)

download() {
  local py=${PYTHON:-.venv/bin/python}
  mkdir -p "$WHEELS"
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${PACKAGES[@]}"
  [ -n "$(ls "$WHEELS"/deepspeed-*.whl 2>/dev/null)" ] || "$py" -m pip wheel --no-deps -w "$WHEELS" "$DEEPSPEED"
  du -sh "$WHEELS"
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
  python3 -c "import torch, diffusers, deepspeed, tyro, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

bench() {
  local out=${OUT:-benchmarks/results}
  mkdir -p "$out"
  install
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python3 benchmarks/bench_gpu.py --out "$out/bench_gpu.json" "$@" 2>&1 | tee "$out/bench_gpu.log"
}

gpu_tests() {
  local out=${OUT:-benchmarks/results}
  mkdir -p "$out"
  install
  python3 -m pytest -m gpu -q -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tee "$out/pytest_gpu.log"
}

case "${1:-}" in
  download) shift; download "$@" ;;
  bench) shift; bench "$@" ;;
  test) shift; gpu_tests ;;
  *) echo "usage: $0 download | bench [bench_gpu.py args] | test" >&2; exit 2 ;;
esac
