"""The peer of ``bench_gpu.py``: stock diffusers on this project's layout with random weights
(``StableDiffusionControlNetPipeline`` rendering and a train_controlnet-style step), timed on the
same device in the same run."""

from __future__ import annotations

import torch
from gpu_measure import Setup, free_memory, median_seconds, peak_gib, reset_peak


def peer_config(s: Setup):
    """The layout both sides share: the paper config (SD2.1, 512x512) on CUDA, the tiny one on CPU."""
    from avatars.training import train_preset

    preset, dim = ("paper", 100) if s.cuda else ("tiny", 16)
    return preset, dim, train_preset(preset, random_base=s.cuda).model_config(dim)


def peer_rows(s: Setup) -> tuple[list[dict], list[dict]]:
    """StableDiffusionControlNetPipeline (bf16 weights on CUDA) and a train_controlnet-style step
    (``train_steps.peer_step``), stock diffusers on our layout with random weights."""
    from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline
    from torch.utils.flop_counter import FlopCounterMode
    from train_steps import PEER_SCHEDULER, peer_models, peer_step

    from avatars.host_sync import count_host_syncs

    dev = s.device
    _, _, config = peer_config(s)
    unet, vae, controlnet = peer_models(config)
    size, width = config.resolution, config.unet.cross_attention_dim
    render_dtype = torch.bfloat16 if s.cuda else torch.float32
    pipe = StableDiffusionControlNetPipeline(
        vae=vae.to(dev, render_dtype), text_encoder=None, tokenizer=None, unet=unet.to(dev, render_dtype),
        controlnet=controlnet.to(dev, render_dtype), scheduler=DDPMScheduler(**PEER_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    render = []
    for b in s.render_batches:
        reset_peak(dev)
        prompt = torch.zeros(b, 77, width, device=dev, dtype=render_dtype)
        image = torch.rand(b, 3, size, size, device=dev, dtype=render_dtype)
        generator = torch.Generator(dev).manual_seed(0)
        call = lambda: pipe(prompt_embeds=prompt, image=image, num_inference_steps=s.render_steps,  # noqa: E731
                            guidance_scale=1.0, generator=generator, output_type="pt", height=size, width=size)
        call()
        _, syncs = count_host_syncs(call, dev)
        seconds = median_seconds(call, dev, 3)
        render.append({"batch": b, "frames_per_s": b / seconds, "call_s": seconds,
                       "host_syncs_per_call": syncs.to_json(), "peak_GiB": peak_gib(dev)})
    pipe = None  # frees it (not `del`: the closure above refers to it)
    free_memory()

    reset_peak(dev)
    step = peer_step(config, dev, s.train_batch, models=(unet, vae, controlnet))
    unet = vae = controlnet = None
    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    seconds = median_seconds(step, dev, 15 if s.cuda else 2)
    train = [{"batch": s.train_batch, "samples_per_s": s.train_batch / seconds, "step_s": seconds,
              "peak_GiB": peak_gib(dev), "train_GFLOP_per_sample": counter.get_total_flops() / s.train_batch / 1e9}]
    step = None  # frees the models (its closures hold them)
    free_memory()
    return render, train
