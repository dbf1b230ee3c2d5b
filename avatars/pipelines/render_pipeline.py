"""The fast rendering pipeline: the one the Serve renderer runs (issue 11).

Same results as :class:`~avatars.pipelines.AvatarPipeline` (same sampler, same fixed noise per
video), prepared for throughput:

* the networks and the VAE are cast once to the render precision (bf16 on CUDA): no autocast
  re-casting float32 weights at every step. The conditioning (rasterized channels and the
  feature-plane lookup) stays float32 and is computed once per call;
* DDPM on :class:`~avatars.schedulers.DeviceDDPM` with the noise on the device: the loop never
  waits for the host, so kernels queue ahead of Python;
* a call runs at a fixed *bucket* batch size: a partial batch is padded (with copies of its last
  frame) up to the smallest bucket that holds it, a larger one is split. With ``compile`` the
  networks of a denoising step are compiled with ``torch.compile`` (on CUDA in
  "reduce-overhead" mode, i.e. with CUDA graphs recorded per bucket); :meth:`warm_up` compiles
  and records every bucket, so a server calls it before taking requests and never compiles on a
  live one; with ``compile_cache`` the compiled code is loaded from / saved to a folder, so only
  the first process compiles (:mod:`avatars.pipelines.compile_cache`). With ``cuda_graphs`` (on
  CUDA when ``compile`` is off) each bucket's whole render is recorded once as a CUDA graph and
  replayed (:mod:`avatars.pipelines.cuda_graph`): the eager kernels, one launch, no compiler;
* the VAE decodes at most ``decode_chunk`` frames at once.

Frames: at one bucket size a frame renders bit-for-bit the same whatever the other frames of its
batch and its position (the padding never changes it); across bucket sizes the kernels' rounding
differs (~1e-6 in float32 on the CPU). With a single bucket, results do not depend on batching at all.

The speed goals (>= 5 frames/s at batch 1 and >= 20 at batch >= 8, 20 steps, 512x512, one H100)
are for CUDA and have not been measured by this code's tests, which run on the CPU.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from avatars.configs import RenderOptions
from avatars.models.diffusion_avatars import DiffusionAvatarsModel
from avatars.pipelines.avatar_pipeline import AvatarPipeline, frame_seeds, sample_ddpm
from avatars.pipelines.compile_cache import load_compiled, save_compiled
from avatars.pipelines.cuda_graph import GraphedCall
from avatars.pipelines.noise import NoiseBank

#: Batch keys of a render request (docs/CONTRACTS.md "Training batch", without the target).
INPUT_KEYS = ("mask", "depth", "normals", "canonical", "expression")


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``size`` frames (``size`` <= the largest bucket)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"{size} frames exceed the largest bucket {buckets[-1]}")


def pad_batch(batch: dict, size: int) -> dict:
    """Pad every tensor of ``batch`` to ``size`` frames with copies of its last frame."""
    count = batch["mask"].shape[0]
    if count == size:
        return batch
    if count > size or count == 0:
        raise ValueError(f"cannot pad {count} frames to {size}")
    index = {}  # built on each tensor's device: no host-to-device copy
    for k, v in batch.items():
        if torch.is_tensor(v) and v.device not in index:
            index[v.device] = torch.arange(size, device=v.device).clamp_max_(count - 1)
    return {k: (v[index[v.device]] if torch.is_tensor(v) else v) for k, v in batch.items()}


class RenderPipeline:
    """Fast rendering of a trained :class:`DiffusionAvatarsModel` (see the module docstring).

    Casts the model's networks and VAE in place to the render precision: give it a model of its
    own (the Serve renderer loads one per replica), not one that is still being trained.
    """

    def __init__(self, model: DiffusionAvatarsModel, options: RenderOptions | None = None, max_batch_size: int = 8,
                 compile_backend: str = "inductor"):
        self.options = options or RenderOptions()
        self.model = model.eval().requires_grad_(False)
        self.device = model.empty_prompt_embedding.device
        self.dtype = torch.bfloat16 if self.options.precision_on(self.device.type) == "bf16" else torch.float32
        for module in self._networks():
            if any(p.dtype != self.dtype for p in module.parameters()):
                module.to(self.dtype)
        self.buckets = self.options.buckets(max_batch_size)
        self.noise = NoiseBank()
        self.reference = AvatarPipeline(model, self.noise)  # shared helpers: shapes, DDPM tables
        self.compiled = self.options.compiles_on(self.device.type)
        self.graphed = self.options.graphs_on(self.device.type)
        self._graphs: dict[tuple, GraphedCall] = {}  # (steps, sampler, input shapes and dtypes) -> recorded render
        self._denoise = model.denoise
        if self.compiled:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            # dynamic=None: the first bucket compiles static, the second recompiles with a dynamic
            # batch dimension that serves every further bucket (at most two compilations).
            self._denoise = torch.compile(model.denoise, mode=mode, backend=compile_backend)

    def _networks(self) -> list[torch.nn.Module]:
        m = self.model
        parts = [m.unet, m.vae, m.controlnet, m.cond_embedding, m.expression_tokens, m.expression_layers]
        return [p for p in parts if p is not None]

    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor,
                expression_tokens: torch.Tensor | None) -> torch.Tensor:
        """One denoising step of the networks (compiled when ``compile`` is on)."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's output has been consumed
        return self._denoise(latents, timesteps, cond, expression_tokens,
                             conditioning_scale=self.model.config.render_conditioning_scale)

    @torch.no_grad()
    def __call__(self, batch: dict, num_inference_steps: int = 20, sampler: str = "ddpm",
                 seeds: int | Sequence[int] = 0) -> torch.Tensor:
        """Renders the batch (keys mask, depth, normals, canonical, expression) -> (B, 3, H, W)
        float32 in [0, 1] on the model's device; ``seeds``: each frame's video seed."""
        AvatarPipeline.check_arguments(num_inference_steps, sampler)
        missing = [k for k in INPUT_KEYS if k not in batch]
        if missing:
            raise KeyError(f"render batch lacks {missing}")
        size = batch["mask"].shape[0]
        seeds = frame_seeds(seeds, size)
        largest = self.buckets[-1]
        images = []
        for start in range(0, size, largest):
            part = {k: batch[k][start:start + largest] for k in INPUT_KEYS}
            count = part["mask"].shape[0]
            bucket = bucket_for(count, self.buckets)
            part_seeds = seeds[start:start + count]
            part_seeds = part_seeds + [part_seeds[-1]] * (bucket - count)
            images.append(self._render(pad_batch(part, bucket), num_inference_steps, sampler, part_seeds)[:count])
        return torch.cat(images)

    def _render(self, batch: dict, num_inference_steps: int, sampler: str, seeds: list[int]) -> torch.Tensor:
        """Host side of a bucket's render (inputs to the device, the frames' noise), then
        :meth:`_compute`, replayed from a recorded CUDA graph when ``cuda_graphs`` is on."""
        model, device = self.model, self.device
        batch = {k: _to_device(batch[k], device) for k in INPUT_KEYS}
        height, width = batch["mask"].shape[2], batch["mask"].shape[3]
        shape = self.reference.latent_shape(height, width)
        diffusion = model.config.use_diffusion
        if diffusion and sampler == "ddpm":
            noise = self.noise.batch(seeds, shape, num_inference_steps, device)
        elif diffusion:
            noise = self.noise.batch(seeds, shape, 0, device)[:1]
        else:
            noise = ()
        inputs = [batch[k] for k in INPUT_KEYS] + list(noise)
        compute = partial(self._compute, num_inference_steps=num_inference_steps, sampler=sampler)
        if not self.graphed or (diffusion and sampler != "ddpm"):
            return compute(*inputs)
        key = (num_inference_steps, sampler if diffusion else "single pass",
               tuple((tuple(t.shape), t.dtype) for t in inputs))
        if key not in self._graphs:  # recorded once per bucket shape (warm_up records them up front)
            self._graphs[key] = GraphedCall(compute, inputs)
        return self._graphs[key](*inputs)

    def _compute(self, *inputs: torch.Tensor, num_inference_steps: int, sampler: str) -> torch.Tensor:
        """Device side of a render: ``inputs`` are the batch's :data:`INPUT_KEYS` tensors, then the
        noise (DDPM: initial and per-step; DDIM / DPM: initial; single pass: none)."""
        model = self.model
        batch, noise = dict(zip(INPUT_KEYS, inputs)), inputs[len(INPUT_KEYS):]
        size, height, width = batch["mask"].shape[0], batch["mask"].shape[2], batch["mask"].shape[3]
        shape = self.reference.latent_shape(height, width)
        # float32 feature lookup, once per call; cast once to the networks' precision
        cond = model.conditioning(batch).to(self.dtype)
        tokens = model.encode_expression(batch["expression"])  # once per call
        denoise = partial(self.denoise, expression_tokens=tokens)
        if not model.config.use_diffusion:
            latents = model.single_pass(denoise, cond, shape)
        elif sampler == "ddpm":
            latents = sample_ddpm(denoise, self.reference.ddpm(num_inference_steps), cond, noise[0], noise[1])
        else:  # DDIM / DPM-Solver++: diffusers' schedulers, eager
            latents = self.reference.sample_diffusers(denoise, cond, noise[0], num_inference_steps, sampler)
        chunk = self.options.decode_chunk
        return torch.cat([model.decode_latents(latents[i:i + chunk]) for i in range(0, size, chunk)])

    def warm_up(self, height: int, width: int, num_inference_steps: int = 20, sampler: str = "ddpm") -> None:
        """Render one padded batch per bucket, so that compilation and CUDA-graph recording happen
        now and not on a live request (a no-op when nothing is compiled or recorded)."""
        if not (self.compiled or self.graphed):
            return
        cache = self.options.compile_cache
        if cache is not None:
            load_compiled(cache, self.device)
        dim = self.model.config.expression_dim
        for bucket in self.buckets:
            frames = {"mask": torch.ones(bucket, 1, height, width), "depth": torch.ones(bucket, 1, height, width),
                      "normals": torch.zeros(bucket, 3, height, width),
                      "canonical": torch.zeros(bucket, 5, height, width), "expression": torch.zeros(bucket, dim)}
            self(frames, num_inference_steps=num_inference_steps, sampler=sampler, seeds=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if cache is not None:
            save_compiled(cache, self.device)


def _to_device(value, device: torch.device):
    if not torch.is_tensor(value) or value.device == device:
        return value
    if device.type == "cuda" and value.device.type == "cpu":
        return value.pin_memory().to(device, non_blocking=True)  # no wait for the GPU's queue
    return value.to(device)
