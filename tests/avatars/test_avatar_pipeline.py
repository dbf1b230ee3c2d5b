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


@pytest.fixture(scope="module")
def pipeline():
    model = DiffusionAvatarsModel(tiny_config())
    # move the zero-initialised layers so that conditioning and expression change the output
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in [*model.controlnet.controlnet_down_blocks, model.controlnet.controlnet_mid_block,
                      model.controlnet.controlnet_cond_embedding.conv_out, *model.expression_layers.output_projections()]:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return AvatarPipeline(model)


def _frames(n=2):
    batch = synthetic_batch(n)
    del batch["image"]
    return batch


def test_fixed_noise_gives_deterministic_frames(pipeline):
    batch = _frames(2)
    for key in ("mask", "depth", "normals", "canonical", "expression"):
        batch[key][1] = batch[key][0]  # two identical frames in one batch
    a = pipeline(batch, num_inference_steps=4)
    b = pipeline(batch, num_inference_steps=4)
    assert a.shape == (2, 3, 64, 64) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=1e-6)  # same noise for every frame
    noise = pipeline.fixed_noise(64, 64, seed=0)
    assert noise.shape == (1, 4, 16, 16)
    torch.testing.assert_close(pipeline(batch, num_inference_steps=4, noise=noise), a, rtol=0, atol=0)
    other = pipeline(batch, num_inference_steps=4, seed=1)
    assert (other - a).abs().max() > 1e-3
    single = pipeline({k: v[:1] for k, v in batch.items()}, num_inference_steps=4)
    torch.testing.assert_close(single[0], a[0], rtol=0, atol=1e-5)  # independent of the batch size


def test_expression_changes_the_render(pipeline):
    batch = _frames(2)
    out = pipeline(batch, num_inference_steps=2)
    assert (out[0] - out[1]).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_samplers_with_zero_snr(pipeline, sampler):
    out = pipeline(_frames(1), num_inference_steps=5, sampler=sampler)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_bad_arguments(pipeline):
    with pytest.raises(ValueError, match="sampler"):
        pipeline(_frames(1), sampler="euler")
    with pytest.raises(ValueError, match="noise"):
        pipeline(_frames(1), noise=torch.zeros(1, 4, 8, 8))


def test_single_pass_ablation_renders_without_sampling():
    pipe = AvatarPipeline(DiffusionAvatarsModel(tiny_config(use_diffusion=False)))
    a = pipe(_frames(1), seed=0)
    b = pipe(_frames(1), seed=123)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
