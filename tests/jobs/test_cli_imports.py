"""The command lines parse their options before importing the model: `--help`, and a refusal of a bad
option, do not wait for diffusers (~10 s on the 2-core machine; launch_all --help took 10-12 s, now ~4)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("diffusers", "deepspeed", "transformers", "avatars.models", "ray")


def _imported_by(statement: str) -> list[str]:
    """The heavy modules a fresh interpreter has after ``statement``."""
    script = f"{statement}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", ["jobs.launch_all", "jobs.train_person", "avatars.training",
                                    "avatars.pipelines.compile_cache"])
def test_a_command_line_module_does_not_import_the_model(module):
    assert _imported_by(f"import {module}") == []


def test_the_evaluation_driver_does_not_import_diffusers():
    """The driver renders through Serve replicas and scores with LPIPS: it needs torch and Ray, not the model's
    diffusers (~4 CPU s a night that, on a small machine, the replicas starting beside it would wait for)."""
    heavy = _imported_by("import cluster.eval_driver.driver, cluster.serve.deployment, jobs.render_eval")
    assert set(heavy) == {"ray"}


def test_the_options_are_checked_without_the_model():
    """TrainOptions' checks (crop, learning-rate decay, latent cache, weight average) run at parse time."""
    assert _imported_by(textwrap.dedent("""
        from avatars.training import TrainOptions
        for bad in ({"min_crop": 0}, {"lr_decay": "linear"}, {"latent_cache_mib": -1}, {"ema_decay": 1.0}):
            try:
                TrainOptions(**bad)
            except ValueError:
                continue
            raise SystemExit(f"accepted {bad}")
    """)) == []


def test_the_trainer_and_the_pipelines_are_there_on_first_use():
    import avatars.pipelines
    import avatars.training
    from avatars.pipelines.render_pipeline import RenderPipeline
    from avatars.training.callbacks import TrainerCallback
    from avatars.training.trainer import Trainer, train_person

    assert avatars.training.Trainer is Trainer and avatars.training.train_person is train_person
    assert avatars.training.TrainerCallback is TrainerCallback and avatars.pipelines.RenderPipeline is RenderPipeline
    for package in (avatars.training, avatars.pipelines):
        with pytest.raises(AttributeError, match="no attribute 'Nope'"):
            package.Nope  # noqa: B018
