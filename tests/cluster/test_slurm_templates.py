"""The sbatch templates as shipped: no TARGET override, so they run the real trainer
(jobs.train_person:run) on the tiny data set, one person per job and two as a job array."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from slurm_helpers import sbatch_wait

from avatars.models.diffusion_avatars import load_trainable_weights
from avatars.training.rendezvous import environment_without_group
from cluster.status import read_status

REPO = Path(__file__).resolve().parents[2]
#: Resources the single-node test SLURM has; every other #SBATCH line of the templates is kept.
SMALL = ["--cpus-per-task=1", "--gpus-per-node=1", "--mem=2G", "--time=10"]
#: Overrides of the tiny preset that keep a run to a few seconds of training.
OPTIONS = {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "validate_every": 0, "val_samples": 1,
           "val_inference_steps": 1, "num_workers": 0, "lpips_weights": "none"}

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def shards(tiny_dataset) -> Path:
    return tiny_dataset[2]  # shared read-only (tests/conftest.py)


def _env(tmp_path: Path, shards: Path, **extra: str) -> dict:
    kwargs = {"options": OPTIONS, "shards": str(shards), "out": str(tmp_path / "runs")}
    env = environment_without_group()
    return {**env, "REPO": str(REPO), "PYTHON": sys.executable, "KWARGS_JSON": json.dumps(kwargs),
            "STATUS_DIR": str(tmp_path / "status"), "OMP_NUM_THREADS": "1", **extra}


def _trained(tmp_path: Path, person: str) -> None:
    run = tmp_path / "runs" / person
    assert json.loads((run / "result.json").read_text())["steps"] == 2
    assert load_trainable_weights(run / "model")  # the avatar was saved


def test_person_template_as_shipped_trains(tmp_path, slurm_cluster, shards):
    proc = sbatch_wait([*SMALL, f"--chdir={tmp_path}", str(REPO / "slurm/train_person.sbatch")],
                       env=_env(tmp_path, shards, PERSON="000"))
    log = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    (status,) = read_status(tmp_path / "status")
    assert status.state == "succeeded" and status.step == 2
    _trained(tmp_path, "000")


def test_array_template_as_shipped_trains_every_listed_person(tmp_path, slurm_cluster, shards):
    (tmp_path / "persons.txt").write_text("000\n001\n")
    env = _env(tmp_path, shards, PERSONS_FILE=str(tmp_path / "persons.txt"))
    proc = sbatch_wait(["--array=0-1", *SMALL, f"--chdir={tmp_path}", str(REPO / "slurm/train_array.sbatch")], env=env)
    log = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    assert {s.person: s.state for s in read_status(tmp_path / "status")} == {"000": "succeeded", "001": "succeeded"}
    for person in ("000", "001"):
        _trained(tmp_path, person)
