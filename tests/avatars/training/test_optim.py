"""The official optimizer settings: AdamW weight decay 1e-2, clipping over the ControlNet only."""

import pytest
import torch

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.training import TrainConfig, train_preset
from avatars.training.optim import clip_gradients, clipped_parameters, make_optimizer


@pytest.fixture(scope="module")
def model():
    return DiffusionAvatarsModel(tiny_config(expression_dim=8))


def test_defaults_are_the_official_settings(model):
    cfg = TrainConfig()
    assert cfg.weight_decay == 1e-2 and cfg.clip_scope == "controlnet" and cfg.grad_clip == 1.0
    paper = train_preset("paper")
    assert paper.weight_decay == 1e-2 and paper.clip_scope == "controlnet"
    opt = make_optimizer(model, 1e-4, 1e-2, cfg.weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 1e-2]  # networks and feature planes
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_only_the_controlnet_gradient_is_clipped(model):
    controlnet = {id(p) for p in model.controlnet.parameters()}
    clipped = clipped_parameters(model, "controlnet")
    assert {id(p) for p in clipped} == controlnet
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(clipped_parameters(model, "all")) == len(trainable) > len(clipped)
    for p in trainable:  # huge gradients everywhere: only the ControlNet's are scaled down
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(clipped, 1.0)
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in clipped))
    assert abs(float(norm) - 1.0) < 1e-4
    planes = model.conditioning.features.spatial
    assert torch.all(planes.grad == 10.0)
    for p in trainable:
        p.grad = None
    with pytest.raises(ValueError, match="clip scope"):
        clipped_parameters(model, "planes")


def test_without_ldm_prior_the_network_in_the_controlnet_place_is_clipped():
    ablation = DiffusionAvatarsModel(tiny_config(expression_dim=8, use_ldm_prior=False))
    ids = {id(p) for p in clipped_parameters(ablation, "controlnet")}
    assert ids == {id(p) for m in (ablation.unet, ablation.cond_embedding) for p in m.parameters()}


def test_zero_1_2_cannot_clip_the_controlnet_alone(model, tmp_path):
    from avatars.training.engine import build_engine

    with pytest.raises(ValueError, match="clip-scope all"):
        build_engine(TrainConfig(zero_stage=1), model, 1)
