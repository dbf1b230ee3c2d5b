"""The training Validator renders a model whose weights DeepSpeed's bf16 mode cast to bf16."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.training.rendezvous import environment_without_group
from avatars.training.validation import Validator


@pytest.mark.parametrize("part", ["vae", "whole"])
def test_validator_renders_a_bf16_model(train_shards, tmp_path, part):
    validator = Validator(train_shards, "000", resolution=64, count=2, lpips_weights=None, inference_steps=2)
    model = DiffusionAvatarsModel(tiny_config(expression_dim=validator.batch["expression"].shape[1]))
    (model.vae if part == "vae" else model).to(torch.bfloat16)
    model.train()
    metrics = validator.run(model, tmp_path / "val.png")
    assert 0 < metrics["val_psnr"] < 100
    assert (tmp_path / "val.png").is_file()
    assert model.training  # restored


# Trains in a child process: train_person joins a process group (init_distributed), which would stay
# in this test process, with its RANK / MASTER_PORT environment and its listening port, and break the
# later tests whose launch_all trains in process or starts Ray / SLURM workers that inherit them.
VALIDATION_SCRIPT = """
import hashlib, json, sys
from pathlib import Path
from avatars.training import TrainConfig, train_person

shards, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
for every in (1, 0):
    cfg = TrainConfig(person="000", shards=shards, out=out / str(every), steps=2, batch_size=4,
                      checkpoint_every=2, validate_every=every, num_workers=0, val_samples=1,
                      val_inference_steps=2, lpips_weights=out / "none")
    result = train_person(cfg, [])
    run = cfg.run_dir
    report[every] = {
        "val_psnr": result["val_psnr"],
        "val": sorted(p.name for p in (run / "val").iterdir()),
        "weights": {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted((run / "model").rglob("*.safetensors"))},
    }
print("RESULT" + json.dumps(report))
"""


def test_validation_during_training_does_not_change_the_avatar(train_shards, tmp_path):
    # The tiny preset validates only at the end (the first run's CPU, README "The main job now"):
    # the validations it skips render with their own noise and must not change what is trained.
    from avatars.training import PRESETS

    assert PRESETS["tiny"][1].validate_every == 0 and PRESETS["paper"][1].validate_every == 200
    env = environment_without_group()
    proc = subprocess.run([sys.executable, "-c", VALIDATION_SCRIPT, str(train_shards), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("RESULT", 1)[1])
    for every, expected in (("1", ["step_0000001.png", "step_0000002.png"]), ("0", ["step_0000002.png"])):
        assert report[every]["val_psnr"] > 0  # the final validation always runs
        assert report[every]["val"] == expected
    assert report["1"]["weights"] and report["1"]["weights"] == report["0"]["weights"]
