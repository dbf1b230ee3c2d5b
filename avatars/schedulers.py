"""Noise schedulers: v-prediction, betas rescaled to zero terminal SNR, trailing timesteps.

Training uses :func:`training_scheduler`; sampling uses :func:`sampling_scheduler` with
``"ddpm"`` (default, as in the paper), ``"ddim"`` or ``"dpm"`` (DPM-Solver++ multistep; diffusers
replaces the zero terminal alpha_bar by 2**-24 so its first sigma stays finite). The pipelines
sample DDPM with :class:`DeviceDDPM`, the same arithmetic as diffusers' ``DDPMScheduler.step``
with every coefficient precomputed on the device (no host synchronisation in the loop).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from avatars.configs import SAMPLERS, SchedulerConfig


def _common(config: SchedulerConfig) -> dict:
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )


def training_scheduler(config: SchedulerConfig) -> DDPMScheduler:
    return DDPMScheduler(**_common(config), clip_sample=False)


def sampling_scheduler(config: SchedulerConfig, sampler: str = "ddpm") -> SchedulerMixin:
    if sampler == "ddpm":
        return DDPMScheduler(**_common(config), clip_sample=False)
    if sampler == "ddim":
        return DDIMScheduler(**_common(config), clip_sample=False, set_alpha_to_one=False)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(
            **_common(config), algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
        )
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def render_timesteps(config: SchedulerConfig, num_inference_steps: int) -> torch.Tensor:
    """The timesteps a ``num_inference_steps``-step render visits, first to last (trailing spacing: the
    same for DDPM, DDIM and DPM-Solver++; 20 steps: 999, 949, ..., 49)."""
    reference = sampling_scheduler(config, "ddpm")
    reference.set_timesteps(num_inference_steps)
    return reference.timesteps.clone()


class DeviceDDPM:
    """DDPM ancestral sampling whose loop never waits for the host.

    diffusers' ``DDPMScheduler.step`` looks the step up in its timesteps (``nonzero``), reads
    ``alphas_cumprod`` on the CPU and branches on tensor values: 14 host synchronisations per step
    on CUDA. Here every per-step coefficient is computed once, with the exact formulas and tables
    of diffusers' scheduler for this config (v-prediction, zero-terminal-SNR betas, trailing
    timesteps, variance "fixed_small", no clipping), and stored as one device tensor; a step is
    five elementwise kernels indexed by a Python int. The per-step noise is passed in (see
    :mod:`avatars.pipelines.noise`), so the result equals diffusers' step on the same noise.
    """

    #: Columns of :attr:`coefficients`.
    COLUMNS = ("sqrt_alpha_prod", "sqrt_beta_prod", "pred_original_coeff", "current_sample_coeff", "noise_std")

    def __init__(self, config: SchedulerConfig, num_inference_steps: int, device: torch.device | str = "cpu"):
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        reference = sampling_scheduler(config, "ddpm")
        if reference.config.variance_type != "fixed_small" or reference.config.clip_sample:
            raise ValueError("DeviceDDPM implements variance 'fixed_small' without sample clipping only")
        reference.set_timesteps(num_inference_steps)
        timesteps = reference.timesteps.tolist()
        alphas_cumprod, one = reference.alphas_cumprod, reference.one
        rows = []
        for i, t in enumerate(timesteps):
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            # The same float32 tensor arithmetic as DDPMScheduler.step / _get_variance.
            alpha_prod_t = alphas_cumprod[t]
            alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else one
            beta_prod_t = 1 - alpha_prod_t
            beta_prod_t_prev = 1 - alpha_prod_t_prev
            current_alpha_t = alpha_prod_t / alpha_prod_t_prev
            current_beta_t = 1 - current_alpha_t
            variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
            rows.append(torch.stack([
                alpha_prod_t**0.5,
                beta_prod_t**0.5,
                (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
                current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t,
                variance**0.5 if t > 0 else torch.zeros_like(variance),  # no noise at t == 0
            ]))
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(timesteps, dtype=torch.long).to(device)
        self.coefficients = torch.stack(rows).to(device)  # (steps, 5) float32

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_{t_index} -> x_{t_index+1} for v-prediction ``model_output``; ``noise`` like ``sample``."""
        sqrt_alpha, sqrt_beta, original_coeff, sample_coeff, std = self.coefficients[index].unbind()
        pred_original = sqrt_alpha * sample - sqrt_beta * model_output
        prev = original_coeff * pred_original + sample_coeff * sample
        return prev + std * noise
