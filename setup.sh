#!/usr/bin/env bash
# Installs diffusion-avatars into ./.venv (idempotent).
#   bash setup.sh          runtime install (the main job)
#   bash setup.sh --tests  + test dependencies and the Debian daemons the tests start
# torch/torchvision are pinned by constraints.txt so no dependency can swap them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras=""
[ "${1:-}" = "--tests" ] && extras="[test]"
.venv/bin/pip install -q -c constraints.txt -e ".${extras}"
