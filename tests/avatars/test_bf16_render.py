"""bf16 weights render on CPU: the VAE and the networks each run in their own dtype (issue 11, item 1).

DeepSpeed's bf16 mode casts the whole model, frozen VAE included, to bf16; the pipeline used to
feed it float32 latents outside autocast and crashed at the first validation."""

from __future__ import annotations

import pytest
import torch

from avatars.configs import tiny_config
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines import AvatarPipeline
from avatars.testing import synthetic_batch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _frames(n=2):
    batch = synthetic_batch(n)
    del batch["image"]
    return batch


@pytest.fixture(scope="module")
def fp32_render():
    model = DiffusionAvatarsModel(tiny_config())
    return model, AvatarPipeline(model)(_frames(), num_inference_steps=3)


@pytest.mark.parametrize("part", ["vae", "whole", "frozen"])
def test_bf16_model_renders_close_to_fp32(fp32_render, part):
    """"frozen": UNet + VAE in bf16, trainable parts (ControlNet, expression layers) in float32."""
    model, reference = fp32_render
    model = DiffusionAvatarsModel(tiny_config())
    parts = {"vae": [model.vae], "whole": [model], "frozen": [model.unet, model.vae]}[part]
    for module in parts:
        module.to(torch.bfloat16)
    out = AvatarPipeline(model)(_frames(), num_inference_steps=3)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert (out - reference).abs().mean() < 0.05  # bf16 rounding, not a different image


def test_encode_and_decode_run_in_the_vae_dtype():
    model = DiffusionAvatarsModel(tiny_config())
    image = synthetic_batch(1)["image"]
    ref_latents = model.encode_images(image, torch.Generator().manual_seed(0))
    model.vae.to(torch.bfloat16)
    latents = model.encode_images(image, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32
    assert (latents - ref_latents).abs().max() < 0.1
    decoded = model.decode_latents(latents)
    assert decoded.dtype == torch.float32 and decoded.shape == image.shape


def test_bf16_training_loss_runs():
    model = DiffusionAvatarsModel(tiny_config()).to(torch.bfloat16)
    batch = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) else v) for k, v in synthetic_batch(2).items()}
    loss = model.training_loss(batch, torch.Generator().manual_seed(0))["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
