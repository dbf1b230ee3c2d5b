import pytest
import torch

from avatars.configs import tiny_config
from avatars.host_sync import count_host_reads
from avatars.models import DiffusionAvatarsModel
from avatars.pipelines import AvatarPipeline
from avatars.schedulers import sampling_scheduler
from avatars.testing import activate_zero_layers, synthetic_batch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipeline():
    # the zero-initialised layers moved, so that conditioning and expression change the output
    return AvatarPipeline(activate_zero_layers(DiffusionAvatarsModel(tiny_config())))


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
    assert a.shape == (2, 3, 64, 64) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)  # same noise for every frame of a video
    other = pipeline(batch, num_inference_steps=4, seeds=1)
    assert (other - a).abs().max() > 1e-3
    single = pipeline({k: v[:1] for k, v in batch.items()}, num_inference_steps=4)
    torch.testing.assert_close(single[0], a[0], rtol=0, atol=1e-5)  # other batch size: kernel rounding only


def test_each_frame_gets_its_videos_noise_whatever_its_batch(pipeline):
    batch = _frames(3)
    mixed = pipeline(batch, num_inference_steps=3, seeds=[5, 0, 5])
    for i, seed in enumerate([5, 0, 5]):
        alone = pipeline({k: v[i:i + 1] for k, v in batch.items()}, num_inference_steps=3, seeds=seed)
        torch.testing.assert_close(alone[0], mixed[i], rtol=0, atol=1e-5)
    # the same batch size: bit-for-bit, whatever the other frames and the frame's position
    reversed_batch = {k: v[[2, 1, 0]] for k, v in batch.items() if torch.is_tensor(v)}
    swapped = pipeline(reversed_batch, num_inference_steps=3, seeds=[5, 7, 5])
    torch.testing.assert_close(swapped[2], mixed[0], rtol=0, atol=0)
    torch.testing.assert_close(swapped[0], mixed[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="seeds"):
        pipeline(batch, seeds=[1, 2])


def test_ddpm_render_equals_a_diffusers_scheduler_loop(pipeline):
    """The whole render through DeviceDDPM equals the same model sampled with diffusers'
    DDPMScheduler, its per-step noise drawn from the video's generator after the initial latent."""
    batch = _frames(1)
    steps, seed = 5, 3
    model = pipeline.model
    scheduler = sampling_scheduler(model.config.scheduler, "ddpm")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, *pipeline.latent_shape(64, 64)), generator=generator)
    with torch.no_grad():
        cond = model.conditioning(batch)
        tokens = model.encode_expression(batch["expression"])
        for t in scheduler.timesteps:
            out = model.denoise(latents, t.expand(1), cond, tokens, model.config.render_conditioning_scale)
            latents = scheduler.step(out.float(), t, latents, generator=generator).prev_sample
        reference = model.decode_latents(latents)
    torch.testing.assert_close(pipeline(batch, num_inference_steps=steps, seeds=seed), reference, rtol=0, atol=1e-6)


def test_ddpm_render_reads_nothing_from_the_device_while_sampling(pipeline):
    batch = _frames(2)
    pipeline(batch, num_inference_steps=3)  # noise drawn and cached
    _, reads = count_host_reads(lambda: pipeline(batch, num_inference_steps=3))
    assert reads == []


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
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipeline(_frames(1), num_inference_steps=0)


def test_single_pass_ablation_renders_without_sampling():
    pipe = AvatarPipeline(DiffusionAvatarsModel(tiny_config(use_diffusion=False)))
    a = pipe(_frames(1), seeds=0)
    b = pipe(_frames(1), seeds=123)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_video_noise_is_one_stream_per_seed():
    from avatars.pipelines.noise import NoiseBank, video_noise

    initial, steps = video_noise(4, (4, 8, 8), 3)
    assert initial.shape == (1, 4, 8, 8) and steps.shape == (3, 1, 4, 8, 8)
    initial_long, steps_long = video_noise(4, (4, 8, 8), 6)
    assert torch.equal(initial, initial_long) and torch.equal(steps, steps_long[:3])  # prefix-stable
    assert not torch.equal(initial, steps[0])  # the initial latent is not reused as step noise
    bank = NoiseBank(capacity=2)
    a, a_steps = bank.batch([4, 9, 4], (4, 8, 8), 3, torch.device("cpu"))
    assert a.shape == (3, 4, 8, 8) and a_steps.shape == (3, 3, 4, 8, 8)
    assert torch.equal(a[0], initial[0]) and torch.equal(a[2], initial[0]) and torch.equal(a_steps[:, 2], steps[:, 0])
    assert len(bank._cache) == 2
    bank.get(11, (4, 8, 8), 3, torch.device("cpu"))
    assert len(bank._cache) == 2  # least recently used evicted
