"""The training Validator renders a model whose weights DeepSpeed's bf16 mode cast to bf16."""

from __future__ import annotations

import pytest
import torch

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
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


def test_validation_during_training_does_not_change_the_avatar(train_shards, tmp_path):
    # The tiny preset validates only at the end (the first run's CPU, README "The main job now"):
    # the validations it skips render with their own noise and must not change what is trained.
    from avatars.training import PRESETS, TrainConfig, train_person

    assert PRESETS["tiny"][1].validate_every == 0 and PRESETS["paper"][1].validate_every == 200
    weights = {}
    for every in (1, 0):
        cfg = TrainConfig(person="000", shards=train_shards, out=tmp_path / str(every), steps=2, batch_size=4,
                          checkpoint_every=2, validate_every=every, num_workers=0, val_samples=1,
                          val_inference_steps=2, lpips_weights=tmp_path / "none")
        result = train_person(cfg, [])
        assert result["val_psnr"] > 0  # the final validation always runs
        run = cfg.run_dir
        assert sorted(p.name for p in (run / "val").iterdir()) == (
            ["step_0000001.png", "step_0000002.png"] if every else ["step_0000002.png"])
        weights[every] = {p.relative_to(run): p.read_bytes() for p in (run / "model").rglob("*.safetensors")}
    assert weights[1] and weights[1] == weights[0]
