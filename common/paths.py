"""Files of the project's checkout that the programs use by default, as absolute paths: a run started from
another directory (a SLURM job's working directory, ``ray job submit``) finds them all the same."""

from __future__ import annotations

from pathlib import Path

#: The checkout (this file is ``<repo>/common/paths.py``).
REPO = Path(__file__).resolve().parents[1]
#: LPIPS AlexNet weights, written by setup.sh (avatars.evaluation.lpips_weights).
LPIPS_WEIGHTS = REPO / "weights" / "lpips_alex.safetensors"
