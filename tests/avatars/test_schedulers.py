"""DeviceDDPM equals diffusers' DDPMScheduler.step on the same noise, without reading the device."""

from __future__ import annotations

import math

import pytest
import torch

from avatars.configs import SchedulerConfig
from avatars.host_sync import count_host_reads
from avatars.schedulers import SAMPLERS, DeviceDDPM, render_timesteps, sampling_scheduler


def _fake_velocity(sample: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the network: depends on the sample and the timestep."""
    return 0.4 * torch.tanh(sample) + 0.1 * math.sin(t / 37.0)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50, 1000])
def test_device_ddpm_equals_diffusers_on_the_same_noise(steps):
    config = SchedulerConfig()
    reference = sampling_scheduler(config, "ddpm")
    reference.set_timesteps(steps)
    ddpm = DeviceDDPM(config, steps)
    assert ddpm.timesteps.tolist() == reference.timesteps.tolist()
    assert ddpm.timesteps[0] == config.num_train_timesteps - 1  # trailing: starts at the zero-SNR step
    initial = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # diffusers draws its variance noise from the generator; draw the same numbers for DeviceDDPM
    noise_gen = torch.Generator().manual_seed(1)
    ours, theirs = initial.clone(), initial.clone()
    generator = torch.Generator().manual_seed(1)
    for i, t in enumerate(reference.timesteps.tolist()):
        noise = torch.randn(ours.shape, generator=noise_gen) if t > 0 else torch.zeros_like(ours)
        ours = ddpm.step(_fake_velocity(ours, t), i, ours, noise)
        theirs = reference.step(_fake_velocity(theirs, t), t, theirs, generator=generator).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert torch.isfinite(ours).all()


def test_terminal_zero_snr_step_predicts_minus_v():
    """At t = 999 alpha_bar = 0: x0 = -v exactly and the sample itself gets no weight."""
    ddpm = DeviceDDPM(SchedulerConfig(), 20)
    sqrt_alpha, sqrt_beta = ddpm.coefficients[0, 0], ddpm.coefficients[0, 1]
    assert sqrt_alpha == 0 and sqrt_beta == 1
    assert (ddpm.coefficients[:, 4] > 0).all()  # every trailing step is at t > 0: noise is added


def test_device_ddpm_loop_reads_nothing_from_the_device():
    config = SchedulerConfig()
    ddpm = DeviceDDPM(config, 20)
    reference = sampling_scheduler(config, "ddpm")
    reference.set_timesteps(20)
    x = torch.randn(1, 4, 8, 8)
    noise = torch.randn(20, 1, 4, 8, 8)

    def ours():
        y = x
        for i in range(20):
            y = ddpm.step(0.1 * y, i, y, noise[i])
        return y

    def theirs():
        y = x
        for t in reference.timesteps:
            y = reference.step(0.1 * y, t, y, generator=torch.Generator().manual_seed(0)).prev_sample
        return y

    assert count_host_reads(ours)[1] == []
    assert len(count_host_reads(theirs)[1]) >= 20 * 10  # what the device loop removes


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DeviceDDPM(SchedulerConfig(), 0)


def test_render_timesteps_are_the_ones_every_sampler_visits():
    """render_timesteps (what train_timesteps trains on) equals the timesteps of DDPM, DDIM and DPM-Solver++ renders."""
    config = SchedulerConfig()
    assert render_timesteps(config, 20).tolist() == list(range(999, 0, -50))
    for steps in (10, 20, 50):
        for sampler in SAMPLERS:
            scheduler = sampling_scheduler(config, sampler)
            scheduler.set_timesteps(steps)
            assert scheduler.timesteps.tolist() == render_timesteps(config, steps).tolist(), (sampler, steps)
