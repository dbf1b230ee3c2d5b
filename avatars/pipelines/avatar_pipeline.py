"""Rendering pipeline: conditioning batch -> RGB images.

Fixed noise per video (:mod:`avatars.pipelines.noise`): every frame with the same seed starts from
the same latent and, with DDPM, gets the same per-step noise; a frame's noise does not depend on
its batch or its position in it. DDPM (the default, as in the paper) runs on
:class:`avatars.schedulers.DeviceDDPM`, whose loop never waits for the host; DDIM and
DPM-Solver++ (deterministic, no per-step noise) run on diffusers' schedulers.

Every network and the VAE run in the dtype of their own weights (a bf16 model renders without
autocast); with float32 weights on CUDA the networks run under bf16 autocast. The sampler's
arithmetic is float32. This is the general pipeline (training validation renders the model being
trained through it); :class:`avatars.pipelines.RenderPipeline` is the fast one for serving.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from avatars.models.diffusion_avatars import DiffusionAvatarsModel
from avatars.pipelines.noise import NoiseBank
from avatars.schedulers import SAMPLERS, DeviceDDPM, sampling_scheduler

#: (latents, timesteps (B,), cond) -> network output; the model's ``denoise`` (with the batch's
#: expression tokens bound) or a faster stand-in.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def frame_seeds(seeds: int | Sequence[int], size: int) -> list[int]:
    """One video seed per frame: an int applies to every frame."""
    if isinstance(seeds, int):
        return [seeds] * size
    seeds = [int(s) for s in seeds]
    if len(seeds) != size:
        raise ValueError(f"got {len(seeds)} seeds for {size} frames")
    return seeds


def sample_ddpm(denoise: DenoiseFn, ddpm: DeviceDDPM, cond: torch.Tensor, initial: torch.Tensor,
                step_noise: torch.Tensor) -> torch.Tensor:
    """The DDPM loop: ``initial`` (B, C, h, w) latents and ``step_noise`` (steps, B, C, h, w), all
    on the device; no host synchronisation (Python-int indexing only)."""
    size = initial.shape[0]
    latents = initial
    for i in range(ddpm.num_inference_steps):
        out = denoise(latents, ddpm.timesteps[i].expand(size), cond)
        latents = ddpm.step(out.float(), i, latents, step_noise[i])
    return latents


class AvatarPipeline:
    """Samples images from a :class:`DiffusionAvatarsModel` (DDPM 20 steps by default, no CFG)."""

    def __init__(self, model: DiffusionAvatarsModel, noise: NoiseBank | None = None):
        self.model = model
        self.noise = noise if noise is not None else NoiseBank()
        self._ddpm: dict[tuple[int, str], DeviceDDPM] = {}

    @property
    def device(self) -> torch.device:
        return self.model.empty_prompt_embedding.device

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.model.latent_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {factor}")
        return (self.model.config.vae.latent_channels, height // factor, width // factor)

    def ddpm(self, num_inference_steps: int) -> DeviceDDPM:
        """The device DDPM sampler for this step count (built once per count and device)."""
        key = (num_inference_steps, str(self.device))
        if key not in self._ddpm:
            self._ddpm[key] = DeviceDDPM(self.model.config.scheduler, num_inference_steps, self.device)
        return self._ddpm[key]

    @staticmethod
    def check_arguments(num_inference_steps: int, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")

    @torch.no_grad()
    def __call__(self, batch: dict, num_inference_steps: int = 20, sampler: str = "ddpm",
                 seeds: int | Sequence[int] = 0) -> torch.Tensor:
        """Renders the batch (keys mask, depth, normals, canonical, expression) -> (B, 3, H, W)
        float32 in [0, 1]. ``seeds``: the video seed of every frame (an int: all frames)."""
        self.check_arguments(num_inference_steps, sampler)
        model, device = self.model, self.device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        size, height, width = batch["mask"].shape[0], batch["mask"].shape[2], batch["mask"].shape[3]
        shape = self.latent_shape(height, width)
        seeds = frame_seeds(seeds, size)
        use_autocast = device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            cond = model.conditioning(batch)
            denoise = partial(model.denoise, expression_tokens=model.encode_expression(batch.get("expression")),
                              conditioning_scale=model.config.render_conditioning_scale)
            if not model.config.use_diffusion:
                latents = model.single_pass(denoise, cond, shape)
            elif sampler == "ddpm":
                initial, step_noise = self.noise.batch(seeds, shape, num_inference_steps, device)
                latents = sample_ddpm(denoise, self.ddpm(num_inference_steps), cond, initial, step_noise)
            else:
                initial, _ = self.noise.batch(seeds, shape, 0, device)
                latents = self.sample_diffusers(denoise, cond, initial, num_inference_steps, sampler)
        return model.decode_latents(latents)

    def sample_diffusers(self, denoise: DenoiseFn, cond, initial, num_inference_steps, sampler):
        """DDIM / DPM-Solver++ through diffusers' schedulers (deterministic: no per-step noise)."""
        model, size = self.model, initial.shape[0]
        scheduler = sampling_scheduler(model.config.scheduler, sampler)
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = initial * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            out = denoise(model_input, t.expand(size), cond)
            latents = scheduler.step(out.float(), t, latents).prev_sample
        return latents
