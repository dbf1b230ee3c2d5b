"""Rendering pipeline: conditioning batch -> RGB images.

For temporal consistency every frame of a video uses the same initial latent noise
(:meth:`AvatarPipeline.fixed_noise`) and, unless a generator is passed, the same per-step noise
of the stochastic DDPM sampler: one CPU generator seeded with ``seed`` per frame, created anew on
every call, so a frame renders identically whatever its batch or position in the batch. On CUDA the networks run under
bf16 autocast; every network and the VAE run in the dtype of their own weights (a bf16 model renders
without autocast too), the scheduler in float32.
"""

from __future__ import annotations

import torch

from avatars.models.diffusion_avatars import DiffusionAvatarsModel
from avatars.schedulers import SAMPLERS, sampling_scheduler


class AvatarPipeline:
    """Samples images from a :class:`DiffusionAvatarsModel` (DDPM 20 steps by default, no CFG)."""

    def __init__(self, model: DiffusionAvatarsModel):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.empty_prompt_embedding.device

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = self.model.latent_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} is not divisible by the VAE factor {factor}")
        return (self.model.config.vae.latent_channels, height // factor, width // factor)

    def fixed_noise(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """Initial latent noise (1, C, h, w) shared by all frames of a video (CPU-generated, so
        identical on every device and for every batch size)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn((1, *self.latent_shape(height, width)), generator=generator)

    @torch.no_grad()
    def __call__(
        self,
        batch: dict,
        num_inference_steps: int = 20,
        sampler: str = "ddpm",
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Renders the batch (keys mask, depth, normals, canonical, expression) -> (B, 3, H, W) in [0, 1].

        ``noise``: initial latents, (1, C, h, w) broadcast to the batch or (B, C, h, w); default
        ``fixed_noise(H, W, seed)``. ``generator``: for DDPM's per-step noise (one generator, or one
        per frame as diffusers' ``randn_tensor`` takes them); default one CPU generator seeded
        with ``seed`` per frame (identical per-step noise for every frame).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        model = self.model
        device = self.device
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        size, height, width = batch["mask"].shape[0], batch["mask"].shape[2], batch["mask"].shape[3]
        shape = self.latent_shape(height, width)
        if generator is None:
            generator = [torch.Generator(device="cpu").manual_seed(seed) for _ in range(size)]
        use_autocast = device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            cond = model.conditioning(batch)
            with model.expression_context(batch.get("expression")):
                if not model.config.use_diffusion:
                    steps = torch.full((size,), model.single_pass_timestep(), device=device, dtype=torch.long)
                    latents = model.denoise(torch.zeros((size, *shape), device=device, dtype=cond.dtype), steps, cond)
                else:
                    latents = self._sample(cond, size, shape, num_inference_steps, sampler, noise, generator, seed)
        return model.decode_latents(latents)

    def _sample(self, cond, size, shape, num_inference_steps, sampler, noise, generator, seed):
        model, device = self.model, self.device
        if noise is None:
            noise = self.fixed_noise(shape[1] * model.latent_factor, shape[2] * model.latent_factor, seed)
        if tuple(noise.shape[1:]) != shape or noise.shape[0] not in (1, size):
            raise ValueError(f"noise must be (1 or {size}, {', '.join(map(str, shape))}), got {tuple(noise.shape)}")
        latents = noise.to(device, torch.float32).expand(size, *shape).clone()
        scheduler = sampling_scheduler(model.config.scheduler, sampler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            out = model.denoise(model_input, t.expand(size), cond)
            latents = scheduler.step(out.float(), t, latents, generator=generator).prev_sample
        return latents
