#!/usr/bin/env bash
# The GPU run kit: what a session with a lent GPU machine runs (README "GPU", "The next GPU session").
#
#   bash benchmarks/gpu_kit.sh download          # here, with registry access: fill .whl/ (ignored by git)
#   bash benchmarks/gpu_kit.sh compat            # here: the gpu test files' CPU tests on the GPU machine's torch
#                                                # (2.11.0) in a venv of their own, so an API this project's torch
#                                                # has and that one lacks fails here, not in device minutes
# there (Python 3.12 + torch 2.11, no registry; the device tool with carry [".whl"]), one call each, in order:
#   bash benchmarks/gpu_kit.sh first             # ~6 min: every gpu test that compiles nothing (the CUDA-graph
#                                                # render first), then bench_gpu --only render peer, render
#                                                # modes eager and graphs (a 4-step avatar trained first)
#   bash benchmarks/gpu_kit.sh compiled-render   # the compiled render rows (the Serve warm-up's compile)
#   bash benchmarks/gpu_kit.sh compile-tests     # the two gpu tests that compile (compiled == eager on CUDA)
#   bash benchmarks/gpu_kit.sh compiled-train    # the --compile training row and its compile time
#   bash benchmarks/gpu_kit.sh profile-compiled  # the profile with our step compiled (the paper preset's default)
# and the building blocks:
#   bash benchmarks/gpu_kit.sh bench [ARGS]      # install the wheels into /tmp/site, run bench_gpu.py [ARGS]
#   bash benchmarks/gpu_kit.sh test [FILES]      # the same wheels, then pytest -m gpu (default: every gpu test file)
#
# Every step runs under `timeout` (seconds in the variables below, overridable from the environment), so a
# call ends inside the device tool's 10-minute limit and what was measured comes back: bench_gpu.py writes
# bench_gpu.partial.json after each section and on SIGTERM, pytest -v logs each test as it ends.
# The GPU machine has torch, numpy, transformers, huggingface-hub, safetensors, pillow, psutil, pytest, ...
# (/work/.library/device/KINDS.md); the project's other imports travel as wheels. Never pip-install the
# project there: it pins another torch. Results (JSON + logs) go to $OUT when set, else benchmarks/results/
# (at most 8 files come back from $OUT: each command here writes at most 6).
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

#: Seconds per step (the device tool stops a command at 600 s; installing takes ~30 s). A session with less device
#: time left than a call needs sets them lower (COMPILE_TIMEOUT = budget_left_s - 90), or its machine goes back
#: mid-call and nothing comes back.
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-370}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-520}
#: `first`: seconds from the script's start by which everything has ended (the bench gets what the tests leave).
CALL_BUDGET=${CALL_BUDGET:-560}

# `first`: the gpu tests that compile nothing (pytest -k), the one new since the last GPU run first.
FIRST_TESTS=(tests/avatars/test_render_pipeline.py::test_cuda_graph_render_equals_eager_bit_for_bit)
# The gpu tests that compile (each minutes on a GPU: test_compile's did not finish in 140 s on an H200).
COMPILE_TESTS=(
  tests/avatars/training/test_compile.py::test_compiled_training_matches_eager_on_cuda
  tests/avatars/test_render_pipeline.py::test_cuda_default_render_is_bf16_compiled_and_never_syncs
)

# The gpu-marked tests (collecting the whole suite would import Ray, submitit, ... which the machine lacks).
GPU_TESTS=(
  tests/avatars/training/test_precision.py tests/avatars/training/test_compile.py
  tests/avatars/training/test_step_work.py tests/avatars/data/test_device_feed.py tests/avatars/test_host_sync.py tests/avatars/test_render_pipeline.py
  tests/shards/test_raster.py
)

# `compat`: the GPU machine's torch and torchvision (KINDS.md's pip list) and what the gpu test files import
# beyond the kit's wheels, installed here into a venv of their own (never the project's: it pins torch 2.14.1).
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TORCHVISION=${GPU_TORCHVISION:-0.26.0}
COMPAT_VENV=${COMPAT_VENV:-/tmp/gpu-compat-venv}
COMPAT_EXTRAS=(numba pytest pytest-timeout pillow psutil transformers accelerate safetensors imageio imageio-ffmpeg
  scikit-image lpips torchmetrics prometheus-client matplotlib jinja2 submitit webdataset pyyaml hypothesis)

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

compat() {
  local py=${PYTHON:-python3} out
  if ! "$COMPAT_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$GPU_TORCH')" \
      2>/dev/null; then
    rm -rf "$COMPAT_VENV"
    "$py" -m venv "$COMPAT_VENV"
    "$COMPAT_VENV/bin/pip" install -q "torch==$GPU_TORCH" "torchvision==$GPU_TORCHVISION" \
      "${PACKAGES[@]}" "$DEEPSPEED" "${COMPAT_EXTRAS[@]}"
  fi
  out=$(out_dir)
  # every test of the gpu test files that runs without CUDA (the gpu ones skip), the project on PYTHONPATH
  PYTHONPATH=$PWD timeout -k 10 "${COMPAT_TIMEOUT:-2400}" "$COMPAT_VENV/bin/python" -m pytest -o addopts="" -q -rfE \
    -p no:cacheprovider "${GPU_TESTS[@]}" tests/benchmarks/test_bench_gpu.py 2>&1 | tee "$out/compat_torch$GPU_TORCH.log"
}

out_dir() {
  local out=${OUT:-benchmarks/results}
  mkdir -p "$out"
  echo "$out"
}

# bench SECONDS [bench_gpu.py args]: bench_gpu.py under a time limit; the partial JSON goes when the whole one exists
#: A step whose share of the call's budget is gone is skipped: `timeout 0` would run it without a limit.
no_time_left() {
  if [ "$1" -lt 10 ]; then echo "[gpu_kit] skipped: ${1} s left of this call's budget"; return 0; fi
  return 1
}

bench_for() {
  local seconds=$1 out
  shift
  no_time_left "$seconds" && return 0
  out=$(out_dir)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/gpu.txt" || true
  local rc=0
  timeout -k 20 "$seconds" python3 benchmarks/bench_gpu.py --out "$out/bench_gpu.json" "$@" 2>&1 \
    | tee -a "$out/bench_gpu.log" || rc=$?
  [ -f "$out/bench_gpu.json" ] && [ "$rc" -eq 0 ] && rm -f "$out/bench_gpu.partial.json"
  echo "[gpu_kit] bench_gpu.py $* -> exit $rc (124: stopped at its ${seconds} s limit; see bench_gpu.partial.json)"
}

# tests_for SECONDS FILES...: pytest -m gpu -v under a time limit, in one process: pyproject's addopts (two
# pytest-xdist workers) are dropped, the GPU machine's pytest has no xdist and one GPU serves one test best
tests_for() {
  local seconds=$1 out rc=0
  shift
  no_time_left "$seconds" && return 0
  out=$(out_dir)
  timeout -k 10 "$seconds" python3 -m pytest -o addopts="" -m gpu -v -rfE -p no:cacheprovider "$@" 2>&1 \
    | tee -a "$out/pytest_gpu.log" || rc=$?
  echo "[gpu_kit] pytest -> exit $rc (124: stopped at its ${seconds} s limit)"
}

case "${1:-}" in
  download) shift; download "$@"; exit ;;
  compat) compat; exit ;;
  bench|test|first|compiled-train|compiled-render|compile-tests|profile-compiled) ;;
  *) echo "usage: $0 download | compat | first | compiled-render | compile-tests | compiled-train | profile-compiled" \
          "| bench [bench_gpu.py args] | test [files]" >&2
     exit 2 ;;
esac

set +e  # from here every step runs under its own time limit and the next one runs whatever it returned
install || exit 1
case "$1" in
  bench) shift; bench_for "$BENCH_TIMEOUT" "$@" ;;
  test) shift; if [ $# -gt 0 ]; then tests_for "$TEST_TIMEOUT" "$@"; else tests_for "$TEST_TIMEOUT" "${GPU_TESTS[@]}"; fi ;;
  # Call 1 (~6 min): the CUDA-graph render (new since the last GPU run) and every gpu test that compiles nothing,
  # then the render rows eager vs graphs vs the peer (the training rows and the profile were measured 2026-11-27)
  first)
    tests_for 120 "${FIRST_TESTS[@]}"
    tests_for $((CALL_BUDGET - SECONDS - 250)) -k "not compiled and not graph_render" "${GPU_TESTS[@]}"  # bench: 250 s
    bench_for $((CALL_BUDGET - SECONDS - 20)) --only render peer --render-modes eager graphs --train-steps 4 ;;
  # Call 2: the compiled render rows (the renderer's warm-up compiles the buckets 1 and 8)
  compiled-render) bench_for "$COMPILE_TIMEOUT" --only render --render-modes compiled --train-steps 4 ;;
  # Call 3: the gpu tests that compile
  compile-tests) tests_for "$COMPILE_TIMEOUT" "${COMPILE_TESTS[@]}" ;;
  # The --compile training row (its first step compiles; compile_s needs an eager row of the same call:
  # pass --only train compile through `bench` for both)
  compiled-train) bench_for "$COMPILE_TIMEOUT" --only compile --train-steps 12 ;;
  # Where the compiled step's time goes, against the peer (its warm-up steps compile)
  profile-compiled) bench_for "$COMPILE_TIMEOUT" --only profile --profile-compiled ;;
esac
