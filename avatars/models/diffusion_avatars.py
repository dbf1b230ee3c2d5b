"""DiffusionAvatars: a frozen latent-diffusion UNet steered by a ControlNet that sees rasterized
buffers of the fitted head mesh plus learned feature maps, with expression cross-attention.

Trainable: ControlNet, expression token map + expression attention layers, feature maps (and,
in the "w/o LDM prior" ablation, the from-scratch UNet and its conditioning embedding).
Frozen: the base UNet and the VAE. Checkpoints (``save_pretrained``) hold only the trainable
parts, the config and the empty-prompt embedding; the frozen weights come from the base model
directory (or, without one, from the seeded random initialisation ``config.init_seed``).

The checkpoint format and its reader/writer are :mod:`avatars.models.avatar_checkpoint`; the
networks of a random base are built by :mod:`avatars.models.base_networks`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from avatars.base_model import empty_prompt_embedding_for, load_unet_and_vae
from avatars.configs import DiffusionAvatarsConfig
from avatars.models import autocast
from avatars.models.avatar_checkpoint import PART_CLASSES, load_checkpoint, save_checkpoint
from avatars.models.avatar_checkpoint import load_trainable_weights as load_trainable_weights  # public path
from avatars.models.base_networks import EMPTY_PROMPT_TOKENS, build_unet, build_vae
from avatars.models.conditioning import ConditioningBuilder, ConditioningEmbedding
from avatars.models.expression_attention import TOKENS_KWARG, ExpressionAttentionLayers, ExpressionTokens
from avatars.schedulers import render_timesteps, training_scheduler


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return _host_to(torch.randn(shape, generator=generator, device=generator.device), like.device).to(like.dtype)


def _host_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)``; from host to CUDA through pinned memory, asynchronously: a copy
    from pageable memory would make the host wait for all queued GPU work."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DiffusionAvatarsModel(nn.Module):
    """The DiffusionAvatars model (see module docstring).

    Args:
        config: model configuration (validated here).
        base_model: local diffusers directory with ``unet/`` and ``vae/`` (SD 2.1 for the paper).
        empty_prompt_embedding: (1, L, cross_attention_dim) embedding of "". Default: read from
            ``base_model/empty_prompt_embedding.safetensors`` or computed with its text encoder;
            without a base model a seeded standard-normal tensor (1, 77, cross_attention_dim).
        allow_random_base: build a random base even though ``config.requires_pretrained_base``
            (FLOP counting and meta-device tests only).
        parts: trainable parts already built (loaded by :meth:`from_pretrained`), by name of
            :data:`PART_CLASSES`; the others are initialised as for training.
    """

    def __init__(
        self,
        config: DiffusionAvatarsConfig,
        base_model: str | os.PathLike | None = None,
        empty_prompt_embedding: torch.Tensor | None = None,
        allow_random_base: bool = False,
        parts: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        parts = dict(parts or {})
        unknown = set(parts) - set(PART_CLASSES)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; known: {sorted(PART_CLASSES)}")
        config.validate()
        if base_model is None and config.requires_pretrained_base and not allow_random_base:
            raise ValueError(
                "this config needs pretrained weights: pass --base-model PATH (a local diffusers "
                "directory of Stable Diffusion 2.1)"
            )
        self.config = config
        self.base_model = str(base_model) if base_model is not None else None
        #: content fingerprint of the base it was trained on (set by the trainer, saved with the
        #: model): the evaluation refuses to render it on a base with another fingerprint
        self.base_fingerprint: str | None = None
        latent = config.vae.latent_channels
        cad = config.unet.cross_attention_dim

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            generator = torch.Generator(device="cpu").manual_seed(config.init_seed)
            if base_model is not None:
                unet, vae = load_unet_and_vae(base_model)
                self._check_base(unet, vae)
                if empty_prompt_embedding is None:
                    empty_prompt_embedding = empty_prompt_embedding_for(base_model, cad)
            else:
                unet = build_unet(config.unet, latent, latent, config.resolution // config.vae.downsample_factor)
                vae = build_vae(config.vae, config.resolution)
                if empty_prompt_embedding is None:
                    empty_prompt_embedding = torch.randn(1, EMPTY_PROMPT_TOKENS, cad, generator=generator, device="cpu")
            if empty_prompt_embedding.dim() != 3 or empty_prompt_embedding.shape[-1] != cad:
                raise ValueError(
                    f"empty-prompt embedding must be (1, L, {cad}), got {tuple(empty_prompt_embedding.shape)}"
                )
            self.vae = vae
            self.conditioning = ConditioningBuilder(config, generator=generator, features=parts.pop("features", None))
            if config.use_ldm_prior:
                # a fine-tuned UNet is one of the avatar's parts; a frozen one is the base's
                self.unet = parts.pop("unet", unet) if config.train_unet else unet
                self.controlnet = parts.pop("controlnet", None)
                if self.controlnet is None:
                    self.controlnet = ControlNetModel.from_unet(
                        unet,
                        conditioning_channels=config.conditioning_channels,
                        conditioning_embedding_out_channels=tuple(config.conditioning_embedding_channels),
                    )
                self.cond_embedding = None
            else:
                # "w/o LDM prior": random UNet, conditioning embedded to the latent grid and concatenated.
                width = config.unet.block_out_channels[0]
                self.unet = parts.pop("unet", None)
                if self.unet is None:
                    self.unet = build_unet(
                        config.unet, latent + width, latent, config.resolution // config.vae.downsample_factor
                    )
                self.controlnet = None
                self.cond_embedding = parts.pop("cond_embedding", None)
                if self.cond_embedding is None:
                    self.cond_embedding = ConditioningEmbedding(
                        conditioning_embedding_channels=width,
                        conditioning_channels=config.conditioning_channels,
                        block_out_channels=tuple(config.conditioning_embedding_channels),
                    )
                    # Nothing pretrained to protect here: a zero output layer would only block the
                    # gradient to the embedding at the start, so use the default initialisation.
                    self.cond_embedding.conv_out.reset_parameters()
            if config.use_expression:
                self.expression_tokens = parts.pop("expression_tokens", None)
                if self.expression_tokens is None:
                    self.expression_tokens = ExpressionTokens(config.expression_dim, config.expression_tokens, cad)
                self.expression_layers = parts.pop("expression_layers", None)
                if self.expression_layers is None:
                    self.expression_layers = ExpressionAttentionLayers.from_unet(self.unet)
                self.expression_layers.install(self.unet)
            else:
                self.expression_tokens = None
                self.expression_layers = None
        if parts:
            raise ValueError(f"model parts {sorted(parts)} are not used by this config")
        self._check_parts()

        self.register_buffer("empty_prompt_embedding", empty_prompt_embedding[:1].float(), persistent=False)
        self.noise_scheduler = training_scheduler(config.scheduler)
        # read here, on the host: training moves alphas_cumprod to the device, and a read there would be a host
        # sync in every single-pass render (one that a CUDA graph's capture refuses); from a schedule built on the
        # CPU, since a model built on the meta device (the FLOP counts) has no values in its own
        with torch.device("cpu"):
            alpha = float(training_scheduler(config.scheduler).alphas_cumprod[self.single_pass_timestep()])
        self._single_pass_scale = -((1.0 - alpha) ** 0.5)
        # config.train_timesteps: the timesteps the loss draws from (None: all of the scheduler's)
        table = render_timesteps(config.scheduler, config.train_timesteps) if config.train_timesteps else None
        self.register_buffer("train_timestep_table", table, persistent=False)
        self.requires_grad_(False)
        for module in self.trainable_modules().values():
            module.requires_grad_(True)
        self.vae.eval()
        if config.use_ldm_prior and not config.train_unet:
            self.unet.eval()

    # ---- structure ----------------------------------------------------------------------
    def _check_parts(self) -> None:
        """Loaded parts must have the shapes the config asks for."""
        c = self.config
        problems = []
        if self.controlnet is not None and self.controlnet.config.conditioning_channels != c.conditioning_channels:
            problems.append(f"controlnet conditioning_channels {self.controlnet.config.conditioning_channels} "
                            f"!= {c.conditioning_channels}")
        if self.expression_tokens is not None:
            want = {"expression_dim": c.expression_dim, "num_tokens": c.expression_tokens,
                    "width": c.unet.cross_attention_dim}
            got = {k: self.expression_tokens.config[k] for k in want}
            if got != want:
                problems.append(f"expression_tokens {got} != {want}")
        if problems:
            raise ValueError("model parts do not match the config: " + "; ".join(problems))

    def _check_base(self, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
        """A loaded base's own UNet and VAE are used: every layout field of ``config.unet`` / ``config.vae`` must
        equal the loaded config's (a difference would be ignored, yet recorded in config.json), else a ValueError
        naming each flag."""
        c = self.config
        problems = [f"{_model_flag(f'unet.{name}')}: the base has {base!r}, the config {ours!r}"
                    for name, (base, ours) in _unet_layout(unet.config, c).items() if base != ours]
        problems += [f"{_model_flag(f'vae.{name}')}: the base has {base!r}, the config {ours!r}"
                     for name, (base, ours) in _vae_layout(vae.config, c).items() if base != ours]
        if unet.config.in_channels != c.vae.latent_channels:
            problems.append(f"the base UNet's in_channels {unet.config.in_channels} != "
                            f"{_model_flag('vae.latent_channels')} {c.vae.latent_channels}")
        if problems:
            raise ValueError(f"base model {self.base_model} does not match the config: " + "; ".join(problems))

    @staticmethod
    def part_names(config: DiffusionAvatarsConfig) -> list[str]:
        """The trainable parts with parameters under ``config`` (the folders of a checkpoint)."""
        names = [] if config.features.mapping == "none" else ["features"]
        if config.use_ldm_prior:
            names += ["controlnet", "unet"] if config.train_unet else ["controlnet"]
        else:
            names += ["unet", "cond_embedding"]
        if config.use_expression:
            names += ["expression_tokens", "expression_layers"]
        return names

    def parts(self) -> dict[str, ModelMixin]:
        """Name -> diffusers model of every trainable part with parameters."""
        modules = {"features": self.conditioning.features, "controlnet": self.controlnet, "unet": self.unet,
                   "cond_embedding": self.cond_embedding, "expression_tokens": self.expression_tokens,
                   "expression_layers": self.expression_layers}
        return {name: modules[name] for name in self.part_names(self.config)}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Name -> module for every trained part (the feature maps under "conditioning")."""
        modules: dict[str, nn.Module] = {"conditioning": self.conditioning}
        if self.controlnet is not None:
            modules["controlnet"] = self.controlnet
            if self.config.train_unet:
                modules["unet"] = self.unet
        else:
            modules["unet"] = self.unet
            modules["cond_embedding"] = self.cond_embedding
        if self.expression_layers is not None:
            modules["expression_tokens"] = self.expression_tokens
            modules["expression_layers"] = self.expression_layers
        return modules

    def parameter_groups(self, lr_networks: float = 1e-4, lr_features: float = 1e-2) -> list[dict]:
        """Optimizer parameter groups: networks at ``lr_networks``, feature maps at ``lr_features``."""
        features = [p for p in self.conditioning.features.parameters() if p.requires_grad]
        feature_ids = {id(p) for p in features}
        networks = [p for p in self.parameters() if p.requires_grad and id(p) not in feature_ids]
        groups = [{"params": networks, "lr": lr_networks, "name": "networks"}]
        if features:
            groups.append({"params": features, "lr": lr_features, "name": "features"})
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights only, keyed by their names in this module."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        copy_matching(self.trainable_state_dict(), state, source)

    @property
    def num_expression_layers(self) -> int:
        return 0 if self.expression_layers is None else len(self.expression_layers)

    @property
    def latent_factor(self) -> int:
        return self.config.vae.downsample_factor

    # ---- forward pieces -------------------------------------------------------------------
    def encode_expression(self, expression: torch.Tensor | None) -> torch.Tensor | None:
        """Expression code (B, D) -> tokens (B, T, cross_attention_dim) for :meth:`denoise`;
        None for a model without expression conditioning."""
        if self.expression_layers is None:
            return None
        if expression is None:
            raise KeyError("batch lacks 'expression' but the model uses expression conditioning")
        return self.expression_tokens(expression)

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor,
        expression_tokens: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """Network output for noisy ``latents``; ``expression_tokens`` from :meth:`encode_expression`
        (None: the expression layers add nothing). ``conditioning_scale`` multiplies the ControlNet's
        residuals (the renderers pass ``config.render_conditioning_scale``; training 1).

        Each network runs in the dtype of its own weights (inputs are cast to it), so a model whose
        parts DeepSpeed or a renderer cast to bf16 works with float32 inputs, with or without
        autocast. The output is in the UNet's dtype."""
        batch = latents.shape[0]
        expected = (latents.shape[2] * self.latent_factor, latents.shape[3] * self.latent_factor)
        if tuple(cond.shape[2:]) != expected:
            raise ValueError(f"conditioning is {tuple(cond.shape[2:])}, expected {expected} "
                             f"for latents {tuple(latents.shape)}")
        unet_dtype = _dtype_of(self.unet)
        kwargs = None if expression_tokens is None else {TOKENS_KWARG: expression_tokens}
        if self.controlnet is not None:
            dtype = _dtype_of(self.controlnet)
            context = self.empty_prompt_embedding.to(dtype).expand(batch, -1, -1)
            down, mid = self.controlnet(
                latents.to(dtype), timesteps, encoder_hidden_states=context, controlnet_cond=cond.to(dtype),
                return_dict=False,
            )
            if dtype != unet_dtype:
                down, mid = [d.to(unet_dtype) for d in down], mid.to(unet_dtype)
            if conditioning_scale != 1.0:
                down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
            return self.unet(
                latents.to(unet_dtype),
                timesteps,
                encoder_hidden_states=self.empty_prompt_embedding.to(unet_dtype).expand(batch, -1, -1),
                cross_attention_kwargs=kwargs,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
        embedded = self.cond_embedding(cond.to(_dtype_of(self.cond_embedding)))
        context = self.empty_prompt_embedding.to(unet_dtype).expand(batch, -1, -1)
        sample = torch.cat([latents.to(unet_dtype), embedded.to(unet_dtype)], dim=1)
        return self.unet(sample, timesteps, encoder_hidden_states=context, cross_attention_kwargs=kwargs,
                         return_dict=False)[0]

    def single_pass_timestep(self) -> int:
        """Timestep used by the "w/o diffusion" ablation (the last, pure-noise one)."""
        return self.config.scheduler.num_train_timesteps - 1

    def single_pass_latents(self, output: torch.Tensor) -> torch.Tensor:
        """The "w/o diffusion" ablation's clean latents from its one network output (zero latent input at
        :meth:`single_pass_timestep`), float32.

        The output is read the way the base was trained, as the v-prediction there:
        x0 = sqrt(a_T) x_T - sqrt(1 - a_T) v with x_T = 0, i.e. x0 = -v under the zero-terminal-SNR schedule
        (a_T = 0). So the pass starts from the frozen base's own estimate (the mean latent); read directly as
        x0 it would start from the negated mean, and the ControlNet would first have to undo the base's sign."""
        return output.float() * self._single_pass_scale

    def single_pass(self, denoise: Callable[..., torch.Tensor], cond: torch.Tensor,
                    latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The "w/o diffusion" ablation's clean latents (B, *latent_shape), float32: one call
        ``denoise(latents, timesteps, cond)`` (this model's :meth:`denoise` with the expression tokens bound, or a
        renderer's compiled one) on a zero latent at :meth:`single_pass_timestep`, read by
        :meth:`single_pass_latents`."""
        size = cond.shape[0]
        steps = torch.full((size,), self.single_pass_timestep(), device=cond.device, dtype=torch.long)
        zeros = torch.zeros((size, *latent_shape), device=cond.device)  # float32, as the samplers' latents
        return self.single_pass_latents(denoise(zeros, steps, cond))

    @torch.no_grad()
    def encode_posterior(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> the frozen VAE's posterior (mean, std), unscaled, float32.

        The VAE runs in the dtype of its weights (bf16 when the trainer or a renderer stores it so),
        outside autocast, as in diffusers' train_controlnet: CUDA autocast would run its group
        norms in fp32, each a cast of a full-resolution activation to fp32 and back."""
        with autocast.suspended(image.device.type):
            dist = self.vae.encode(image.to(_dtype_of(self.vae))).latent_dist
        return dist.mean.float(), dist.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """A sample of the posterior (``mean``, ``std``), scaled to the diffusion model's latents."""
        return (mean + std * _randn(mean.shape, generator, mean)) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (a posterior sample), float32."""
        return self.sample_latents(*self.encode_posterior(image), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], float32 (the VAE runs in its own dtype)."""
        scaled = latents.float() / self.vae.config.scaling_factor
        image = self.vae.decode(scaled.to(_dtype_of(self.vae))).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    def training_loss(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """MSE to the scheduler's velocity (or, w/o diffusion, of :meth:`single_pass` to the clean latent).
        Key "loss". With ``latent_mean`` and ``latent_std`` in ``batch`` (the trainer's
        :class:`~avatars.training.latent_cache.LatentCache`), the VAE posterior of ``image`` is taken from
        them instead of encoding it again."""
        image = batch["image"]
        if image.shape[2] % (self.latent_factor * 2 ** (len(self.config.unet.block_out_channels) - 1)):
            raise ValueError(f"image size {tuple(image.shape[2:])} is not divisible by the model's total downsampling")
        cond = self.conditioning(batch)
        if "latent_mean" in batch:
            posterior = batch["latent_mean"], batch["latent_std"]
        else:
            posterior = self.encode_posterior(image)
        latents = self.sample_latents(*posterior, generator)
        batch_size = latents.shape[0]
        tokens = self.encode_expression(batch.get("expression"))
        if self.config.use_diffusion:
            noise = _randn(latents.shape, generator, latents)
            table = self.train_timestep_table
            steps = self.noise_scheduler.config.num_train_timesteps if table is None else len(table)
            if generator is None:
                timesteps = torch.randint(0, steps, (batch_size,), device=latents.device)
            else:
                timesteps = torch.randint(0, steps, (batch_size,), generator=generator, device=generator.device)
                timesteps = _host_to(timesteps, latents.device)
            if table is not None:
                timesteps = table[timesteps]
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
            pred = self.denoise(noisy, timesteps, cond, tokens)
        else:
            pred = self.single_pass(partial(self.denoise, expression_tokens=tokens), cond, tuple(latents.shape[1:]))
            target = latents
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss}

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Same as :meth:`training_loss` (so DDP / DeepSpeed engines can call the module)."""
        return self.training_loss(batch, generator)

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the checkpoint directory (:mod:`avatars.models.avatar_checkpoint`) atomically."""
        save_checkpoint(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, base_model: str | os.PathLike | None = None
    ) -> "DiffusionAvatarsModel":
        """Loads a checkpoint written by :meth:`save_pretrained` (format 2, or the older format 1).
        ``base_model`` defaults to the directory recorded at save time; the text encoder is not
        needed."""
        return load_checkpoint(cls, directory, base_model)


def _model_flag(name: str) -> str:
    """``unet.layers_per_block (--model.unet.layers-per-block; --train.model.unet.layers-per-block in launch_all)``."""
    flag = name.replace("_", "-")
    return f"{name} (--model.{flag}; --train.model.{flag} in launch_all)"


def _per_block(value, blocks: int) -> tuple:
    """A diffusers per-block setting (an int for every block, or one per block) as a tuple of ``blocks``."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * blocks


def _unet_layout(base, config: DiffusionAvatarsConfig) -> dict[str, tuple]:
    """Field of :class:`~avatars.configs.UNetConfig` -> (the loaded UNet config's value, the config's), as
    :func:`~avatars.models.base_networks.build_unet` maps them."""
    unet = config.unet
    blocks = len(base.block_out_channels)
    # diffusers' legacy naming: attention_head_dim is the head count unless num_attention_heads is given
    heads = base.num_attention_heads if base.num_attention_heads is not None else base.attention_head_dim
    return {
        "block_out_channels": (tuple(base.block_out_channels), tuple(unet.block_out_channels)),
        "down_block_types": (tuple(base.down_block_types), tuple(unet.down_block_types)),
        "up_block_types": (tuple(base.up_block_types), tuple(unet.up_block_types)),
        "layers_per_block": (_per_block(base.layers_per_block, blocks), _per_block(unet.layers_per_block, blocks)),
        "attention_heads": (_per_block(heads, blocks), tuple(unet.attention_heads)),
        "cross_attention_dim": (base.cross_attention_dim, unet.cross_attention_dim),
        "use_linear_projection": (bool(base.use_linear_projection), unet.use_linear_projection),
        "norm_num_groups": (base.norm_num_groups, unet.norm_num_groups),
        "upcast_attention": (bool(base.upcast_attention), unet.upcast_attention),
    }


def _vae_layout(base, config: DiffusionAvatarsConfig) -> dict[str, tuple]:
    """Field of :class:`~avatars.configs.VAEConfig` -> (the loaded VAE config's value, the config's)."""
    vae = config.vae
    scaling = base.scaling_factor
    return {
        "block_out_channels": (tuple(base.block_out_channels), tuple(vae.block_out_channels)),
        "layers_per_block": (base.layers_per_block, vae.layers_per_block),
        "latent_channels": (base.latent_channels, vae.latent_channels),
        # a float read back from JSON: equal within 1e-8, as before
        "scaling_factor": (scaling, scaling if abs(scaling - vae.scaling_factor) <= 1e-8 else vae.scaling_factor),
        "norm_num_groups": (base.norm_num_groups, vae.norm_num_groups),
    }


@torch.no_grad()
def copy_matching(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Copies ``state`` into ``target`` (name -> tensor, e.g. a model's trainable parameters) in place,
    in the targets' dtypes, refusing a state whose names or shapes differ (KeyError / ValueError naming
    ``source``)."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise KeyError(
            f"{source} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in target.items():
        value = state[name]
        if value.shape != tensor.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, model {tuple(tensor.shape)}")
        tensor.copy_(value.to(tensor.dtype))


def _dtype_of(module: nn.Module) -> torch.dtype:
    """dtype of a module's (first) floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
