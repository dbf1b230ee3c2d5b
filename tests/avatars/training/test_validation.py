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
