"""One training step of this project and one of the stock-diffusers peer, built the same way for
the benchmarks that time, profile or count them (bench_gpu.py, bench_step_ops.py).

* :func:`our_step`: the trainer's own step (``avatars.training.engine.build_engine``: DeepSpeed's
  fp32 engine, fused AdamW, sync-free clipping, bf16 frozen base, autocast, channels_last on CUDA)
  on a synthetic batch already on the device, with the trainer's CPU noise generator;
* :func:`peer_step`: a train_controlnet-style step in stock diffusers (frozen UNet/VAE stored in
  bf16, fp32 ControlNet, bf16 autocast around ControlNet + UNet only, AdamW, clipping), the
  recipe of the shared ``peer_controlnet_bench.py``, on the *same layout* as ours (SD2.1 for the
  paper config), so that what differs is the step, not the network sizes.

Both are split into ``forward`` / ``backward`` / ``update`` phases (``__call__`` runs all three),
so a counter can attribute work to a phase. Without CUDA the peer runs fp32 unless ``bf16`` is
asked for (CPU autocast), like ours with ``precision="bf16"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from avatars.configs import DiffusionAvatarsConfig

#: The peer's scheduler: SD2.1's v-prediction with a zero-terminal-SNR, trailing schedule (ours).
PEER_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                      timestep_spacing="trailing")


@dataclass
class Step:
    """A training step in three phases over state the closures share; ``__call__`` runs one step."""

    name: str
    forward: Callable[[], None]
    backward: Callable[[], None]
    update: Callable[[], None]
    batch_size: int
    info: dict = field(default_factory=dict)

    def __call__(self) -> None:
        self.forward()
        self.backward()
        self.update()


def _on(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def our_model(preset: str, expression_dim: int = 100):
    """``preset``'s model with random weights, on the host (as the trainer builds it)."""
    from avatars.models import DiffusionAvatarsModel
    from avatars.training import train_preset

    return DiffusionAvatarsModel(train_preset(preset, random_base=preset != "tiny").model_config(expression_dim))


def our_step(preset: str, device: torch.device, batch_size: int, precision: str = "auto",
             memory_format: str = "auto", expression_dim: int = 100, model=None, compile: bool = False) -> Step:
    """The trainer's step (``TrainingEngine.micro_step``, phase by phase) on ``preset``'s model
    with random weights; the DeepSpeed engine of one process (``init_distributed`` makes its
    group). ``expression_dim`` is the paper data's 100 by default. ``model``: one from
    :func:`our_model` (built when None; the step takes it over: it is cast and moved). ``compile``:
    the trainer's ``--compile`` (regional; its first steps compile), else eager, whatever the preset says."""
    from avatars.models import DiffusionAvatarsModel
    from avatars.testing import synthetic_batch
    from avatars.training import train_preset
    from avatars.training.engine import build_engine
    from avatars.training.optim import clip_gradients
    from avatars.training.rendezvous import init_distributed

    _, world = init_distributed()
    cfg = train_preset(preset, batch_size=batch_size, precision=precision, memory_format=memory_format,
                       random_base=preset != "tiny", compile=compile)
    config = cfg.model_config(expression_dim)
    if model is not None and model.config != config:
        raise ValueError("the model given was not built for this preset and expression_dim (use our_model)")
    trainer = build_engine(cfg, model if model is not None else DiffusionAvatarsModel(config), world)
    engine = trainer.engine
    batch = _on(synthetic_batch(batch_size, config.resolution, expression_dim), trainer.device)
    noise = torch.Generator(device="cpu").manual_seed(0)  # the trainer's (avatars.training.trainer)
    state: dict = {}

    # TrainingEngine.micro_step, one phase at a time
    def forward() -> None:
        state["loss"] = engine(batch, noise)

    def backward() -> None:
        engine.backward(state.pop("loss"))

    def update() -> None:
        if trainer.clipped and engine.is_gradient_accumulation_boundary():
            clip_gradients(trainer.clipped, trainer.grad_clip)
        engine.step()

    return Step("ours", forward, backward, update, batch_size,
                {"precision": "bf16" if trainer.precision.bf16 else "fp32",
                 "optimizer": type(engine.optimizer).__name__, "compiled": cfg.compile,
                 "trainable_tensors": sum(1 for p in trainer.model.parameters() if p.requires_grad),
                 "model": trainer.model})


def peer_models(config: DiffusionAvatarsConfig, seed: int = 0):
    """Stock diffusers UNet, VAE and ControlNet (3 conditioning channels) on ``config``'s layout,
    random weights: SD2.1 for the paper config (= the shared peer recipe's layout)."""
    from diffusers import ControlNetModel

    from avatars.models.base_networks import build_unet, build_vae

    latent = config.vae.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(config.unet, latent, latent, config.resolution // config.vae.downsample_factor)
        vae = build_vae(config.vae, config.resolution)
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=tuple(
            config.conditioning_embedding_channels))
    return unet, vae, controlnet


def peer_step(config: DiffusionAvatarsConfig, device: torch.device, batch_size: int, bf16: bool | None = None,
              models=None) -> Step:
    """The train_controlnet-style step of stock diffusers (module docstring). ``bf16`` defaults to
    CUDA; ``models`` = (unet, vae, controlnet) from :func:`peer_models` (built when None)."""
    from diffusers import DDPMScheduler

    bf16 = device.type == "cuda" if bf16 is None else bf16
    frozen = torch.bfloat16 if bf16 else torch.float32
    unet, vae, controlnet = models or peer_models(config)
    unet = unet.to(device, frozen).requires_grad_(False)
    vae = vae.to(device, frozen).requires_grad_(False)
    controlnet = controlnet.to(device, torch.float32).train()
    # foreach: torch's default on CUDA, asked for explicitly so that a CPU count has the GPU's structure
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-4, foreach=True)
    scheduler = DDPMScheduler(**PEER_SCHEDULER)
    size, b = config.resolution, batch_size
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device)
    cond = torch.rand(b, 3, size, size, generator=g).to(device)
    prompt = torch.zeros(b, 77, config.unet.cross_attention_dim, device=device)
    state: dict = {}

    def forward() -> None:
        with torch.no_grad():
            latents = vae.encode(x.to(frozen)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        noisy, target = scheduler.add_noise(latents, noise, t), scheduler.get_velocity(latents, noise, t)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            down, mid = controlnet(noisy, t, encoder_hidden_states=prompt, controlnet_cond=cond, return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=prompt.to(frozen),
                        down_block_additional_residuals=[d.to(frozen) for d in down],
                        mid_block_additional_residual=mid.to(frozen)).sample
        state["loss"] = torch.nn.functional.mse_loss(pred.float(), target.float())

    def backward() -> None:
        state.pop("loss").backward()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Step("peer", forward, backward, update, batch_size,
                {"precision": "bf16" if bf16 else "fp32", "optimizer": type(optimizer).__name__,
                 "trainable_tensors": sum(1 for p in controlnet.parameters()),
                 "models": (unet, vae, controlnet)})
