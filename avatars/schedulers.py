"""Noise schedulers: v-prediction, betas rescaled to zero terminal SNR, trailing timesteps.

Training uses :func:`training_scheduler`; sampling uses :func:`sampling_scheduler` with
``"ddpm"`` (default, as in the paper), ``"ddim"`` or ``"dpm"`` (DPM-Solver++ multistep; diffusers
replaces the zero terminal alpha_bar by 2**-24 so its first sigma stays finite).
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from avatars.configs import SchedulerConfig

SAMPLERS = ("ddpm", "ddim", "dpm")


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
