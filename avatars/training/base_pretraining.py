"""Pretraining a tiny base model (VAE + unconditional UNet) on the synthetic images.

The paper freezes a pretrained Stable Diffusion 2.1. The ``tiny`` preset has the same structure
at toy size, but with random frozen weights its VAE cannot reproduce images, so avatars trained on
it cannot learn. This module builds the honest miniature of "a pretrained SD": a tiny diffusers
base directory, pretrained on the training images of the shards, that loads like SD 2.1 does
(``--base-model PATH``):

* stage 1 trains the AutoencoderKL of the tiny preset (``build_vae``) as an autoencoder
  (L1 + MSE reconstruction + a small KL term), then measures the standard deviation of the
  latents (posterior means) and makes ``scaling_factor * latent`` unit-variance;
* stage 2 trains the UNet of the preset (``build_unet``) as an unconditional v-prediction
  diffusion model on the scaled latents, with the model's zero-terminal-SNR training scheduler and
  a fixed seeded empty-prompt embedding as context (the stand-in for CLIP's encoding of "").
  Its random draws are made up front (:func:`unet_draws`), so only the training images it
  draws are encoded (200 steps of 16 draw ~57% of the 3840 images of the 8 synthetic persons);
* the result is written atomically as ``unet/``, ``vae/``, ``empty_prompt_embedding.safetensors``
  and ``pretrain_info.json``.

Scaling factor: :meth:`DiffusionAvatarsModel._check_base` requires the base VAE's
``scaling_factor`` to equal ``config.vae.scaling_factor`` (0.18215 in every preset). With
``fold_scaling=True`` (default) the measured factor is folded into the VAE's ``quant_conv`` /
``post_quant_conv`` (an exact reparametrisation of the latent space: the decoder output is
unchanged) so that the config's factor yields unit-variance latents, and the directory loads with
the unmodified tiny config. With ``fold_scaling=False`` the measured factor is registered in
``vae/config.json`` instead; the avatar config must then carry the same value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from avatars.base_model import EMPTY_PROMPT_FILE, EMPTY_PROMPT_KEY, save_tensor_atomic
from avatars.configs import DiffusionAvatarsConfig, tiny_config
from avatars.data import LoaderConfig, ResumableSampler, ShardDataset, make_loader
from avatars.evaluation.metrics import psnr_from_mse
from avatars.models.base_networks import EMPTY_PROMPT_TOKENS, build_unet, build_vae
from avatars.schedulers import training_scheduler
from avatars.training.config import TrainingDiverged
from avatars.training.finite import first_names, non_finite
from common.configs import to_jsonable
from common.fingerprint import json_digest
from common.io import atomic_directory, atomic_write_json
from shards.writer import MANIFEST, shard_paths

INFO_FILE = "pretrain_info.json"
INFO_FORMAT = 1
#: Bumped whenever the pretraining's code makes another base of the same settings and data (its losses, schedule,
#: stages): part of the base's key and fingerprint, so a base pretrained before is made again, not reused.
RECIPE_VERSION = 1


#: The stage lengths a base needs (both stages train): refused below 1 by pretrain_base and the command line.
STEP_COUNTS = ("vae_steps", "unet_steps")


def _check_nonnegative(name: str, value: float) -> None:
    """Refuses a NaN, infinite or negative ``value`` of the option ``name``, naming its flag."""
    flag = f"--{name.replace('_', '-')}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value} ({flag})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value} ({flag})")


@dataclass
class BasePretrainConfig:
    """Pretraining of the tiny base model (VAE, then UNet) on the shards' training images."""

    shard_root: Path = Path("data/shards")
    """Folder of per-person shard folders (each with a manifest.json), as written by jobs/preprocess.py."""
    persons: str = "all"
    """'all' (every subfolder of shard_root with a manifest.json) or a comma-separated list of person ids."""
    output: Path = Path("data/base/tiny")
    """Output diffusers directory (unet/, vae/, empty_prompt_embedding.safetensors, pretrain_info.json)."""
    vae_steps: int = 1600
    """Optimizer steps of stage 1 (autoencoder). The VAE is step-bound, not image-bound: 1600 steps
    of 4 images reconstruct the held-out faces as well as 800 of 16 (29.1 dB face PSNR, expression
    response 0.85 vs 0.85) for 57% of the CPU, while 800 steps of 8 lose 1.2 dB (README "Tiny base
    model")."""
    unet_steps: int = 200
    """Optimizer steps of stage 2 (unconditional v-prediction diffusion on the latents). The avatars
    do not need more: person 000's avatar (tiny preset, 600 steps x 8) trained on the same VAE with a
    UNet of 200 steps at lr 2e-3 scored 26.4 dB held-out PSNR / 23.3 dB face against 26.2 / 23.1
    with the 1000 steps at 1e-3 of before (README "Tiny base model"), for a fifth of the stage's
    ~340 CPU seconds."""
    vae_batch_size: int = 4
    """Images per VAE step (see ``vae_steps``)."""
    unet_batch_size: int = 16
    """Latents per UNet step."""
    latent_passes: int = 1
    """Augmented passes over the training images for stage 2; each image the UNet draws is encoded
    once (posterior mean and std cached) and each step draws fresh posterior samples from the cache
    instead of re-encoding."""
    vae_lr: float = 3e-3
    """Peak AdamW learning rate of the VAE (linear warm-up, cosine decay to 10%). Measured on the 8
    synthetic persons (benchmarks/bench_base_vae.py, 800 steps, README "Where a person's detail is
    lost"): 3e-3 reconstructs the held-out faces 1.7 dB closer than 1e-3 (28.4 vs 26.7 dB inside the
    face mask) at the same cost, with the hair colours and the whites of the eyes."""
    vae_adam_beta2: float = 0.95
    """AdamW's second-moment decay of the VAE stage (PyTorch's default: 0.999). The VAE is stopped while it
    still converges, and with 0.999 where it stands then depends on the encoder's random initialisation
    (seeds 0-6: face PSNR 26.3-29.1 dB, hair ΔE 4.2-10.4); a shorter second-moment memory adapts the step sizes
    as the loss falls and takes the unlucky initialisations along (0.95: 28.6-29.8 dB, hair ΔE 2.7-5.5; README "A
    VAE recipe that converges on every draw")."""
    unet_lr: float = 2e-3
    """Peak AdamW learning rate of the UNet (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps of each stage."""
    vae_face_weight: float = 4.0
    """Extra weight of the pixels inside the rasterized face mask in the VAE's reconstruction loss
    (1 + this inside, 1 outside). Measured (bench_base_vae.py, 400 steps, README "Where a person's
    detail is lost"): 4 reconstructs the faces 1.6 dB closer than 0 and keeps 0.18 instead of 0.10
    of the expression-only change (mouth interior, gaze), for 0.1 dB of the whole frame."""
    vae_gradient_weight: float = 0.0
    """Weight of the L1 error of the image's finite differences (edges) in the VAE's reconstruction loss."""
    kl_weight: float = 1e-6
    """Weight of the KL term (summed over latent elements, averaged over the batch) in the VAE loss."""
    grad_clip: float = 1.0
    """Gradient-norm clipping of both stages (0 disables it)."""
    scale_batches: int = 32
    """Batches (of vae_batch_size) over which the latent standard deviation is measured (128 images
    at the default batch of 4)."""
    fold_scaling: bool = True
    """True: fold the measured 1/std into quant_conv/post_quant_conv so that the config's
    ``vae.scaling_factor`` (0.18215) gives unit-variance latents (loads with the unmodified tiny
    config). False: register 1/std as ``scaling_factor`` in vae/config.json instead."""
    eval_images: int = 256
    """Held-out images (test_seq split, no augmentation, spread over the persons) for the VAE PSNR."""
    seed: int = 0
    """Seed of the initialisation, the data order / augmentation, the noise and the empty-prompt embedding."""
    num_workers: int = 1
    """Data-loader decoding threads (do not change the result)."""
    log_every: int = 100
    """Print the running losses every this many steps (0: never)."""
    force: bool = False
    """Retrain even if ``output`` already holds a base pretrained with the same settings."""

    def __post_init__(self) -> None:
        # checked when the options are parsed (exit code 2), not after the persons' shards were indexed
        # (the step counts may be 0 here: a stage run for 0 steps hands back its initial weights; pretrain_base and
        # the command line refuse them)
        for name in ("vae_batch_size", "unet_batch_size", "scale_batches", "eval_images", "latent_passes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # a negative face weight zeroes or flips the loss inside the face; a negative clip the gradient; negative
        # workers crashed the loader's thread pool
        for name in ("vae_face_weight", "vae_gradient_weight", "grad_clip", "num_workers"):
            _check_nonnegative(name, getattr(self, name))
        # a negative or NaN learning rate failed inside AdamW after the shards were indexed (a traceback), an infinite
        # one trained NaN weights that were written as the base, a negative KL weight rewarded the KL term; a negative
        # warm-up ran the cosine decay from a made-up step
        for name in ("vae_lr", "unet_lr", "kl_weight", "warmup_steps"):
            _check_nonnegative(name, getattr(self, name))
        if not 0.0 <= self.vae_adam_beta2 < 1.0:
            raise ValueError(f"vae_adam_beta2 must be in [0, 1), got {self.vae_adam_beta2}")

    def model_config(self) -> DiffusionAvatarsConfig:
        """The tiny preset's layout; of it the base uses the UNet, VAE, scheduler and resolution (the expression
        code is the avatar's: no field of it reaches the base)."""
        return tiny_config()

    def fingerprint(self) -> dict:
        """The settings that determine the result (what idempotence compares), with the layout of the networks
        it trains (a base of another layout, a code change of the tiny preset, is not reused under the same key)
        and the pretraining's :data:`RECIPE_VERSION`."""
        d = dataclasses.asdict(self)
        for k in ("output", "num_workers", "log_every", "force"):
            d.pop(k)
        d["recipe"] = RECIPE_VERSION
        d["shard_root"] = str(Path(self.shard_root).resolve())
        layout = self.model_config()
        d["layout"] = to_jsonable({k: getattr(layout, k) for k in ("unet", "vae", "scheduler", "resolution")})
        return d


# ---- data ------------------------------------------------------------------------------------
def resolve_persons(shard_root: Path, persons: str) -> list[str]:
    """Person ids: the subfolders of ``shard_root`` that have a manifest.json, or the given list."""
    root = Path(shard_root)
    if not root.is_dir():
        raise FileNotFoundError(f"shard root {root} does not exist; run jobs/preprocess.py first")
    if persons.strip() == "all":
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
        if not found:
            raise FileNotFoundError(f"shard root {root} has no person folder with a {MANIFEST}")
        return found
    chosen = [p.strip() for p in persons.split(",") if p.strip()]
    if not chosen:
        raise ValueError(f"persons {persons!r} names no person")
    for p in chosen:
        if not (root / p / MANIFEST).is_file():
            raise FileNotFoundError(f"{root / p / MANIFEST} not found (person {p!r} has no shards)")
    return chosen


def _split_shards(shard_root: Path, persons: list[str], split: str) -> list[Path]:
    paths = [s for p in persons for s in shard_paths(Path(shard_root), p, split)]
    if not paths:
        raise FileNotFoundError(f"no {split!r} shards for persons {persons} under {shard_root}")
    return paths


def _manifest_digest(shard_root: Path, persons: list[str]) -> str:
    h = hashlib.sha256()
    for p in persons:
        h.update(p.encode() + b"\0" + (Path(shard_root) / p / MANIFEST).read_bytes())
    return h.hexdigest()


def image_batches(dataset: ShardDataset, loader_config: LoaderConfig, *,
                  shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of (images (B, 3, H, W) in [-1, 1], rasterized face masks (B, 1, H, W) in
    {0, 1}); a new permutation each epoch, seeded by ``loader_config.seed`` (``shuffle=False``: the
    dataset's order every epoch)."""
    sampler = ResumableSampler(len(dataset), seed=loader_config.seed, shuffle=shuffle)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        n = 0
        for batch in make_loader(dataset, sampler, loader_config, drop_last=True):
            n += 1
            yield batch["image"], batch["mask"]
        if n == 0:
            raise ValueError(f"{len(dataset)} training images are fewer than one batch of {loader_config.batch_size}")
        epoch += 1


def held_out_images(shard_root: Path, persons: list[str], count: int, resolution: int) -> torch.Tensor:
    """Up to ``count`` test_seq images (whole frame resized, no augmentation), spread evenly over the split."""
    dataset = ShardDataset(_split_shards(shard_root, persons, "test_seq"), LoaderConfig(
        resolution=resolution, batch_size=1, augment=False, num_workers=0))
    n = min(count, len(dataset))
    idx = torch.linspace(0, len(dataset) - 1, n).round().long().unique().tolist()
    return torch.stack([dataset[i]["image"] for i in idx])


# ---- training helpers ------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, mask: torch.Tensor | None = None,
                        face_weight: float = 0.0, gradient_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE per pixel, weighted 1 + ``face_weight`` inside the rasterized face ``mask`` and
    normalised by the mean weight (so face_weight 0 is the plain mean), plus ``gradient_weight``
    times the L1 error of the horizontal and vertical finite differences (edges: eyes, pupils, the
    mouth line) under the same weights."""
    def weighted_mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x.mean() if w is None else (x * w).mean() / w.mean()

    err = (recon - images).abs()
    weight = 1.0 + face_weight * mask if face_weight and mask is not None else None
    loss = weighted_mean(err + err * err, weight)
    if gradient_weight:
        d = recon - images
        dx, dy = (d[..., :, 1:] - d[..., :, :-1]).abs(), (d[..., 1:, :] - d[..., :-1, :]).abs()
        wx, wy = (None, None) if weight is None else (weight[..., :, 1:], weight[..., 1:, :])
        loss = loss + gradient_weight * (weighted_mean(dx, wx) + weighted_mean(dy, wy))
    return loss


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None,
             mask: torch.Tensor | None = None, face_weight: float = 0.0, gradient_weight: float = 0.0):
    """(total, reconstruction) loss of one batch: :func:`reconstruction_loss` of the decoded
    posterior sample + ``kl_weight`` x KL."""
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    rec = reconstruction_loss(recon, images, mask, face_weight, gradient_weight)
    kl = posterior.kl().mean()
    return rec + kl_weight * kl, rec


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean per-image PSNR (dB, images mapped to [0, 1]) of decode(posterior mean)."""
    psnrs = []
    for chunk in images.split(batch_size):
        recon = vae.decode(vae.encode(chunk).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - chunk) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        psnrs.append(psnr_from_mse(mse))
    return torch.cat(psnrs).mean().item()


@torch.no_grad()
def latent_std(vae, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], count: int) -> float:
    """Standard deviation of the posterior means over ``count`` batches (unscaled latents)."""
    means = [vae.encode(next(batches)[0]).latent_dist.mode() for _ in range(count)]
    return torch.cat(means).float().std().item()


@torch.no_grad()
def fold_latent_scale(vae, k: float) -> None:
    """Reparametrise the latent space as z' = k * z: the posterior mean is multiplied by k, its
    log-variance shifted by 2 log k, and post_quant_conv divides its input by k, so decode(z')
    equals the old decode(z)."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("folding the latent scale needs a VAE with quant_conv and post_quant_conv")
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k


def empty_prompt_embedding(cross_attention_dim: int, seed: int) -> torch.Tensor:
    """The fixed stand-in for CLIP's encoding of "": seeded standard normal (1, 77, D)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, EMPTY_PROMPT_TOKENS, cross_attention_dim, generator=gen)


def _log(msg: str) -> None:
    print(f"[pretrain_base] {msg}", flush=True)


def _optimizer_step(loss: torch.Tensor, module: torch.nn.Module, opt, sched, grad_clip: float) -> None:
    """Backward, clip, step, schedule: the update both pretraining stages share."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:  # a norm of 0 would zero every gradient: the stage would not train at all
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    sched.step()


def check_stage(stage: str, module: torch.nn.Module, losses: dict[str, float], output: Path, remedy: str) -> None:
    """Raises :class:`TrainingDiverged` naming the ``stage`` when a weight (or buffer) of ``module`` or one of its
    final ``losses`` is NaN or infinite: such a base would be written and every avatar trained on it would learn
    nothing (or NaN). Called before anything of the base is written."""
    tensors = non_finite(module.state_dict())
    said = [f"{name} {value}" for name, value in losses.items() if not math.isfinite(value)]
    if tensors:
        said.append(f"NaN or infinite weights ({first_names(tensors)})")
    if said:
        raise TrainingDiverged(f"base pretraining diverged in the {stage} stage: {'; '.join(said)}; nothing is "
                               f"written to {output}. {remedy}")


class _LossLog:
    """A stage's loss: the first value, the mean of the last 50 (its summary), logged every `log_every` steps."""

    def __init__(self, stage: str, name: str, steps: int, log_every: int):
        self.stage, self.name, self.steps, self.log_every = stage, name, steps, log_every
        self.first = float("nan")
        self.recent: list[float] = []

    def add(self, step: int, value: float) -> None:
        if step == 0:
            self.first = value
        self.recent = (self.recent + [value])[-50:]
        if self.log_every and (step + 1) % self.log_every == 0:
            _log(f"{self.stage} step {step + 1}/{self.steps} {self.name} {self.mean:.4f}")

    @property
    def mean(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")


def train_vae(config: BasePretrainConfig, model_config: DiffusionAvatarsConfig,
              batches: Iterator[tuple[torch.Tensor, torch.Tensor]]):
    """Stage 1: returns (vae in eval mode, final reconstruction loss (mean of the last 50 steps), first loss)."""
    torch.manual_seed(config.seed)
    vae = build_vae(model_config.vae, model_config.resolution)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, betas=(0.9, config.vae_adam_beta2), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.vae_steps, config.warmup_steps))
    gen = torch.Generator().manual_seed(config.seed + 1)
    losses = _LossLog("vae", "recon", config.vae_steps, config.log_every)
    for step in range(config.vae_steps):
        images, mask = next(batches)
        loss, rec = vae_loss(vae, images, config.kl_weight, gen, mask, config.vae_face_weight,
                             config.vae_gradient_weight)
        _optimizer_step(loss, vae, opt, sched, config.grad_clip)
        losses.add(step, rec.item())
    vae.eval().requires_grad_(False)
    return vae, losses.mean, losses.first


@torch.no_grad()
def encode_latents(
    vae, dataset: ShardDataset, loader_config: LoaderConfig, passes: int, indices: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of the training images, ``passes`` times with different augmentation
    (epochs 0 .. passes-1 of the dataset), in the VAE's (possibly folded) latent space, unscaled.
    Image ``k`` is item ``k % len(dataset)`` of pass ``k // len(dataset)``; with ``indices``
    (ascending) only those images are encoded, in that order, else all ``passes * len(dataset)``."""
    n = len(dataset)
    wanted = list(range(passes * n)) if indices is None else [int(k) for k in indices]
    if any(not 0 <= k < passes * n for k in wanted):
        raise ValueError(f"image indices must lie in [0, {passes * n})")
    means, stds = [], []
    for epoch in range(passes):
        items = [k - epoch * n for k in wanted if epoch * n <= k < (epoch + 1) * n]
        if not items:
            continue
        dataset.set_epoch(epoch)
        for batch in make_loader(dataset, items, loader_config, drop_last=False):
            dist = vae.encode(batch["image"]).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def unet_draws(config: BasePretrainConfig, images: int, latent_shape: tuple[int, ...],
               num_train_timesteps: int) -> list[tuple[torch.Tensor, ...]]:
    """Every random draw of stage 2, step by step, from its seeded generator in the order the
    loop uses them: (image indices into the ``images`` cached posteriors, the posterior sample's
    standard normal, the diffusion noise, the timesteps). Made up front so that only the images
    drawn are encoded (:func:`pretrain_base`)."""
    gen = torch.Generator().manual_seed(config.seed + 3)
    draws = []
    for _ in range(config.unet_steps):
        idx = torch.randint(0, images, (config.unet_batch_size,), generator=gen)
        posterior = torch.randn((config.unet_batch_size, *latent_shape), generator=gen)
        noise = torch.randn((config.unet_batch_size, *latent_shape), generator=gen)
        t = torch.randint(0, num_train_timesteps, (config.unet_batch_size,), generator=gen)
        draws.append((idx, posterior, noise, t))
    return draws


def latent_shape(model_config: DiffusionAvatarsConfig) -> tuple[int, int, int]:
    """(channels, height, width) of the base's latents."""
    side = model_config.resolution // model_config.vae.downsample_factor
    return model_config.vae.latent_channels, side, side


def train_unet(config: BasePretrainConfig, model_config: DiffusionAvatarsConfig, scaling_factor: float,
               context: torch.Tensor, latent_mean: torch.Tensor, latent_std_: torch.Tensor,
               draws: list[tuple[torch.Tensor, ...]] | None = None):
    """Stage 2 on cached posteriors: returns (unet in eval mode, final v-prediction loss (mean of
    the last 50 steps), first loss). ``draws``: :func:`unet_draws` with its image indices mapped
    to rows of ``latent_mean`` (when only the drawn images were encoded); None draws them here
    over every row."""
    factor = model_config.vae.downsample_factor
    latent = model_config.vae.latent_channels
    torch.manual_seed(config.seed + 2)
    unet = build_unet(model_config.unet, latent, latent, model_config.resolution // factor)
    unet.train()
    scheduler = training_scheduler(model_config.scheduler)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.unet_steps, config.warmup_steps))
    if draws is None:
        draws = unet_draws(config, latent_mean.shape[0], tuple(latent_mean.shape[1:]),
                           scheduler.config.num_train_timesteps)
    if len(draws) != config.unet_steps:
        raise ValueError(f"{len(draws)} draws for {config.unet_steps} UNet steps")
    losses = _LossLog("unet", "v-loss", config.unet_steps, config.log_every)
    for step, (idx, posterior, noise, t) in enumerate(draws):
        mean, std = latent_mean[idx], latent_std_[idx]
        latents = (mean + std * posterior) * scaling_factor
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context.expand(latents.shape[0], -1, -1)).sample
        loss = F.mse_loss(pred, target)
        _optimizer_step(loss, unet, opt, sched, config.grad_clip)
        losses.add(step, loss.item())
    unet.eval().requires_grad_(False)
    return unet, losses.mean, losses.first


# ---- output ----------------------------------------------------------------------------------
def read_info(output: Path) -> dict | None:
    """The pretrain_info.json of a finished output directory, or None."""
    path = Path(output) / INFO_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete it or pass --force") from None


def full_fingerprint(config: BasePretrainConfig) -> dict:
    """The settings, the resolved persons and their shard manifests: everything the base is made of."""
    persons = resolve_persons(config.shard_root, config.persons)
    fingerprint = config.fingerprint()
    fingerprint["persons_resolved"] = persons
    fingerprint["manifests_sha256"] = _manifest_digest(config.shard_root, persons)
    return fingerprint


def finished_base(output: Path, fingerprint: dict) -> dict | None:
    """The pretrain_info.json of ``output`` when it holds a finished base of ``fingerprint``
    (:func:`full_fingerprint`), which :func:`pretrain_base` then keeps; None otherwise."""
    info = read_info(output)
    if info is not None and info.get("format") == INFO_FORMAT and info.get("config") == fingerprint:
        return info
    return None


def base_key(config: BasePretrainConfig) -> str:
    """sha256 of :func:`full_fingerprint`: the main job names its base folder by it, so a base that
    avatars were trained on is never replaced by one made of other settings or data."""
    return json_digest(full_fingerprint(config))


def newest_base(root: Path = Path("data/base")) -> Path:
    """The most recently written finished tiny base under ``root`` (the main job's
    ``<workdir>/base/tiny-<key>`` folders), for tools that use the main job's base."""
    found = sorted((p for p in Path(root).glob("tiny-*") if (p / INFO_FILE).is_file()),
                   key=lambda p: (p / INFO_FILE).stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no pretrained tiny base under {root}: run jobs/launch_all.py first")
    return found[-1]


def pretrain_base(config: BasePretrainConfig) -> dict:
    """Pretrains (or reuses) the tiny base model; returns the contents of pretrain_info.json
    plus ``"skipped"`` (True when an identical existing output was kept). Raises :class:`TrainingDiverged`
    naming the stage, before anything is written, when its weights or final loss are NaN or infinite."""
    output = Path(config.output)
    fingerprint = full_fingerprint(config)
    persons = fingerprint["persons_resolved"]
    if not config.force and (info := finished_base(output, fingerprint)) is not None:
        _log(f"{output} already holds this base model; skipping (--force retrains)")
        return {**info, "skipped": True}
    for name in STEP_COUNTS:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    model_config = config.model_config()
    started, cpu_started = time.perf_counter(), time.process_time()
    train = ShardDataset(_split_shards(config.shard_root, persons, "train"), LoaderConfig(
        resolution=model_config.resolution, batch_size=config.vae_batch_size, augment=True,
        num_workers=config.num_workers, seed=config.seed))
    held_out = held_out_images(config.shard_root, persons, config.eval_images, model_config.resolution)
    _log(f"persons {','.join(persons)}: {len(train)} training images, {len(held_out)} held-out images")

    # Stage 1: the VAE.
    vae_batches = image_batches(train, train.config)
    vae, vae_loss_final, vae_loss_first = train_vae(config, model_config, vae_batches)
    vae_remedy = (f"Retrain with a lower --vae-lr (now {config.vae_lr}) and/or --kl-weight (now {config.kl_weight}), "
                  f"with --grad-clip on (now {config.grad_clip}), or check the persons' shards for NaN values")
    check_stage("vae", vae, {"final reconstruction loss": vae_loss_final}, output, vae_remedy)
    std = latent_std(vae, vae_batches, config.scale_batches)
    if not (math.isfinite(std) and std > 0):  # 1/std scales the latents
        raise TrainingDiverged(f"base pretraining diverged in the vae stage: the latents' standard deviation is "
                               f"{std}; nothing is written to {output}. {vae_remedy}")
    measured = 1.0 / std
    if config.fold_scaling:
        fold_latent_scale(vae, measured / model_config.vae.scaling_factor)
        scaling_factor = model_config.vae.scaling_factor
    else:
        scaling_factor = measured
    vae.register_to_config(scaling_factor=float(scaling_factor))
    scaled_std = latent_std(vae, vae_batches, config.scale_batches) * scaling_factor
    # measured once, on the VAE as saved: folding the scale does not change what it decodes
    # (test_fold_latent_scale_keeps_decoder_output), so a second measurement before it only cost CPU
    psnr = reconstruction_psnr(vae, held_out)
    vae_seconds, vae_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    _log(f"vae done: recon loss {vae_loss_final:.4f}, held-out PSNR {psnr:.2f} dB, latent std {std:.4f}, "
         f"scaled latent std {scaled_std:.3f} ({vae_seconds:.0f} s)")
    del vae_batches

    # Stage 2: the UNet.
    context = empty_prompt_embedding(model_config.unet.cross_attention_dim, config.seed)
    encode_data = dataclasses.replace(train.config, batch_size=32, seed=config.seed + 1)
    encode_set = ShardDataset(train.shards, encode_data)
    images = config.latent_passes * len(encode_set)
    draws = unet_draws(config, images, latent_shape(model_config), model_config.scheduler.num_train_timesteps)
    drawn = torch.cat([d[0] for d in draws]).unique()  # ascending: the images the UNet uses
    mean, std_map = encode_latents(vae, encode_set, encode_data, config.latent_passes, drawn.tolist())
    row = torch.full((images,), -1, dtype=torch.long)
    row[drawn] = torch.arange(len(drawn))
    draws = [(row[idx], *rest) for idx, *rest in draws]
    _log(f"encoded the {mean.shape[0]} of {images} training images the UNet draws "
         f"({time.perf_counter() - started - vae_seconds:.0f} s)")
    unet, unet_loss_final, unet_loss_first = train_unet(config, model_config, scaling_factor, context, mean, std_map,
                                                        draws)
    check_stage("unet", unet, {"final v-loss": unet_loss_final}, output,
                f"Retrain with a lower --unet-lr (now {config.unet_lr}), with --grad-clip on (now {config.grad_clip})")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    _log(f"unet done: v-loss {unet_loss_first:.4f} -> {unet_loss_final:.4f} ({seconds - vae_seconds:.0f} s)")

    info = {
        "format": INFO_FORMAT,
        "config": fingerprint,
        "model_config": {"unet": dataclasses.asdict(model_config.unet), "vae": dataclasses.asdict(model_config.vae),
                         "scheduler": dataclasses.asdict(model_config.scheduler),
                         "resolution": model_config.resolution},
        "train_images": len(train),
        "vae": {"steps": config.vae_steps, "first_recon_loss": vae_loss_first, "final_recon_loss": vae_loss_final,
                "heldout_psnr_db": psnr,
                "heldout_images": len(held_out), "heldout_split": "test_seq",
                "latent_std": std, "measured_scaling_factor": measured, "scaling_factor": scaling_factor,
                "scaling_folded": config.fold_scaling, "scaled_latent_std": scaled_std},
        "unet": {"steps": config.unet_steps, "cached_latents": int(mean.shape[0]), "training_images": images,
                 "first_v_loss": unet_loss_first, "final_v_loss": unet_loss_final},
        "seconds": {"vae": vae_seconds, "unet": seconds - vae_seconds, "total": seconds},
        "cpu_seconds": {"vae": vae_cpu, "unet": cpu - vae_cpu, "total": cpu},
    }
    with atomic_directory(output) as tmp:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        save_tensor_atomic({EMPTY_PROMPT_KEY: context}, tmp / EMPTY_PROMPT_FILE)
        atomic_write_json(tmp / INFO_FILE, info)
    _log(f"wrote {output}")
    return {**info, "skipped": False}
