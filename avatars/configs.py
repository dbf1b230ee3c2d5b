"""Configuration dataclasses and presets for the DiffusionAvatars model.

One dataclass per component. Presets are factories: :func:`paper_config` (Stable Diffusion 2.1
layout, 512x512, needs a local pretrained base model) and :func:`tiny_config` (random weights,
64x64, for CPU tests). Ablations of the paper's Table 3 are switches on :class:`DiffusionAvatarsConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from common.configs import from_jsonable, to_jsonable

#: Rasterized channels fed to the ControlNet: depth 1 + canonical xyz 3 + normals 3 + ambient 2.
RASTER_CHANNELS = 1 + 3 + 3 + 2

FeatureMapping = Literal["triplane", "spherical", "none"]


@dataclass
class UNetConfig:
    """Layout of the denoising UNet: the random base's (and the "w/o LDM prior" ablation's from-scratch UNet) is
    built from it.

    When a pretrained base model is loaded, its own UNet is used, and every field here must equal the loaded UNet's
    config (``DiffusionAvatarsModel._check_base``; a difference is refused naming the flag), so the ``config.json``
    saved with an avatar describes the networks it ran.
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    """Output channels of each down block (SD2.1: 320, 640, 1280, 1280)."""
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    """diffusers down block types, one per entry of ``block_out_channels``."""
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    """diffusers up block types, one per entry of ``block_out_channels``."""
    layers_per_block: int = 2
    """ResNet layers per down block (up blocks have one more)."""
    attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    """Number of attention heads per block (SD2.1: 5, 10, 20, 20). Passed to diffusers as its legacy
    ``attention_head_dim`` argument, which UNet2DConditionModel treats as head count."""
    cross_attention_dim: int = 1024
    """Width of the cross-attention context (SD2.1 / OpenCLIP-H: 1024). The expression tokens have this width too,
    because the expression layers start as copies of each block's attn2."""
    use_linear_projection: bool = True
    """Linear (instead of 1x1 conv) projection in the transformer blocks (SD2.1: True)."""
    norm_num_groups: int = 32
    """Group-norm groups."""
    upcast_attention: bool = True
    """SD2.1's UNet config field, carried so that a random model built from this config has SD2.1's config; a loaded
    base must agree with it (one that says otherwise is refused). The attention processors here ignore it: it asks
    diffusers' plain attention processor for float32 scores under fp16 (the 768-pixel v-model overflows without);
    the processor every layer here runs, PyTorch's scaled_dot_product_attention (AttnProcessor2_0), does not read
    it, and nothing here runs fp16 (bf16 or fp32). The ControlNet and the expression layers inherit it from the
    UNet."""


@dataclass
class VAEConfig:
    """Layout of the frozen AutoencoderKL: the random base's is built from it. A loaded base's own VAE is used, and
    every field here must equal its config (refused otherwise, naming the flag)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Encoder/decoder block widths; the spatial factor is ``2 ** (len - 1)`` (SD: 8)."""
    layers_per_block: int = 2
    """ResNet layers per block."""
    latent_channels: int = 4
    """Latent channels (SD: 4)."""
    scaling_factor: float = 0.18215
    """Latents are multiplied by this after encoding (SD: 0.18215)."""
    norm_num_groups: int = 32
    """Group-norm groups."""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class FeatureConfig:
    """Learned spatial feature planes sampled at the rasterized canonical coordinates.

    ``mapping`` selects the variant:

    * ``"triplane"`` (paper): three planes (xy, xz, yz) of ``channels`` channels each, sampled
      with the canonical xyz, plus an ambient map of ``channels`` channels sampled with the two
      ambient coordinates. Yields ``4 * channels`` conditioning channels (64 for 16).
    * ``"spherical"`` (ablation "spherical UV"): one 2-D map of ``3 * channels`` channels sampled
      at (azimuth, elevation) of the canonical xyz (same texel memory and conditioning width as
      the TriPlane, only the parametrisation differs), plus the ambient map. ``4 * channels``.
    * ``"none"`` (ablation "w/o spatial features"): no learned maps. 0 channels.

    Coordinates are used directly as ``grid_sample`` coordinates (canonical space is roughly
    [-1, 1]), bilinear, ``align_corners=False``, zero padding; samples are multiplied by the mask.
    """

    mapping: FeatureMapping = "triplane"
    """'triplane' (paper), 'spherical' or 'none' (the two ablations; see the class docstring)."""
    resolution: int = 512
    """Resolution of every plane / map (paper: 512)."""
    channels: int = 16
    """Channels per TriPlane plane and of the ambient map (paper: 16)."""
    init_std: float = 1.0
    """Standard deviation of the normal initialisation of the maps: the official N(0, 1). Measured
    (benchmarks/bench_feature_planes.py, README): 0.1 and 1 fit a person's appearance equally fast, so the official
    value is kept; at 1 the sampled features start on the scale of the rasterized channels (about [-1, 1]) the
    ControlNet also sees."""

    @property
    def num_output_channels(self) -> int:
        if self.mapping == "none":
            return 0
        return 4 * self.channels


@dataclass
class SchedulerConfig:
    """Noise schedule shared by training and sampling (v-prediction, zero terminal SNR)."""

    num_train_timesteps: int = 1000
    """Training timesteps (at least 2: the rescale to zero terminal SNR of one is NaN)."""
    beta_start: float = 0.00085
    """First beta of SD's ``scaled_linear`` schedule (before rescaling to zero terminal SNR); 0 <= beta_start <
    beta_end."""
    beta_end: float = 0.012
    """Last beta of SD's ``scaled_linear`` schedule (before rescaling to zero terminal SNR); below 1, and a value the
    rescale would make NaN is refused (:func:`schedule_problem`: e.g. 0.3 of 1000 timesteps, or below ~1e-6)."""


@dataclass
class DiffusionAvatarsConfig:
    """Full model configuration (saved as ``config.json`` next to the trainable weights)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    """Layout of the denoising UNet: builds the random base's; with --base-model the base's UNet is used and every
    field must equal its config (a difference is refused)."""
    vae: VAEConfig = field(default_factory=VAEConfig)
    """Layout of the frozen autoencoder: builds the random base's; with --base-model the base's VAE is used and every
    field must equal its config (a difference is refused)."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    """The learned feature planes sampled at the canonical coordinates."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Noise schedule of training and sampling."""
    resolution: int = 512
    """Training / rendering resolution (square images; height = width)."""
    expression_dim: Annotated[int, tyro.conf.Suppress] = 100
    """Dimension of the per-frame expression code (declared by the data; NPHM 206, MonoNPHM 100). The trainer
    sets it from the data, so no command line offers it."""
    expression_tokens: int = 4
    """Number of expression tokens (paper: 4), each of width ``unet.cross_attention_dim``."""
    conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    """Channels of ControlNet's conditioning embedding (paper/diffusers: 16, 32, 96, 256). Its length must be
    ``log2(vae.downsample_factor) + 1`` so it downsamples like the VAE."""
    depth_center: float = 1.0
    """Depth normalisation: (depth - depth_center) / depth_scale inside the mask (outside it every
    rasterized channel is -1, see avatars/models/conditioning.py)."""
    depth_scale: float = 0.3
    """Depth normalisation scale (see depth_center); a positive number."""
    use_expression: bool = True
    """Ablation "w/o expression conditioning": no expression tokens, no expression layers, no expression channels."""
    expression_channels: bool = False
    """Also give the ControlNet (w/o LDM prior: the conditioning embedding) the expression code per pixel: its
    ``expression_dim`` values inside the face mask (0 outside), appended to the conditioning image after the feature
    maps. The paper feeds the code only as 4 tokens to the UNet's expression cross-attentions; on the tiny preset
    those learn nothing of the expression-only effects (gaze, mouth-interior colour) in its 600 steps, with the
    channels the held-out renders reproduce 0.16-0.37 of them (README "The expression pathway on the current
    defaults"). Without expression conditioning it does nothing."""
    use_diffusion: bool = True
    """Ablation "w/o diffusion": one forward pass (zero latent input, last timestep) predicting the clean latent
    directly, trained with MSE to the target latent (like DNR). The output is read as the base's v-prediction
    there (x0 = -v at zero terminal SNR), so the pass starts from the frozen base's own estimate
    (``DiffusionAvatarsModel.single_pass_latents``)."""
    use_ldm_prior: bool = True
    """Ablation "w/o LDM prior": a trainable UNet from random init, conditioned directly by concatenating a
    conditioning embedding to the latent input; no ControlNet."""
    train_unet: bool = False
    """Fine-tune the base UNet with the ControlNet, at the networks' learning rate (the paper keeps it
    frozen). Measured on the tiny preset: better PSNR, SSIM and LPIPS at 18% more training CPU, not
    the default (README "What the tiny preset's budget leaves"). Needs the LDM prior (without it the UNet
    is trained from scratch anyway). Render it with ``conditioning_scale`` 1: the fine-tuned UNet is fitted to
    the residuals as trained, and the tiny preset's 1.4 cost it LPIPS on 8 of 8 pairs (README "A conditioning
    scale for the tiny avatars' renders")."""
    conditioning_scale: float = 1.0
    """Scale of the ControlNet's residuals in the renderers' denoising steps (diffusers'
    ``controlnet_conditioning_scale``); training always adds them at 1. Paper and official: 1. Above 1,
    each step moves further from the frozen base's prior towards what the conditioning says. Not used
    without diffusion (the single pass is a regression: 1.4 cost it 1.8 dB) or without the LDM prior
    (no ControlNet); see :attr:`render_conditioning_scale`."""
    train_timesteps: int = 0
    """Timesteps the diffusion loss draws from, uniformly: 0, all ``scheduler.num_train_timesteps`` (the paper and
    the official code); N, only the N an N-step render visits (trailing spacing: the same for DDPM, DDIM and
    DPM-Solver++; 20: 999, 949, ..., 49). Tiny preset: 20, the evaluation's steps; measured on the main job's 8
    persons x 2 seeds at 600 steps: held-out PSNR +0.19 dB (better on 15 of 16), face PSNR +0.24, colour error
    -0.16, LPIPS level, at the same cost; its avatars render at 10 or 50 steps as well as those trained on every
    timestep (README "Training on the timesteps the render visits"). Not used without diffusion (the single pass has no
    timestep to draw)."""
    requires_pretrained_base: bool = True
    """Whether the avatar needs a pretrained base (saved with it: one that does is loaded only with that base).
    True (paper preset): training without --base-model is refused. False (tiny preset): without --base-model the
    base is the seeded random one (launch_all instead pretrains the main job's tiny base and trains on it). The
    trainer overrides it: a run with --base-model always saves True, whatever this says (the avatar needs the base
    it was trained on); one with TrainConfig.random_base (Python callers only) always saves False."""
    init_seed: Annotated[int, tyro.conf.Suppress] = 0
    """Seed of every random initialisation (frozen random base, feature maps, new layers), so a model without
    pretrained base is rebuilt identically by ``from_pretrained``. The trainer sets it to its ``--seed``, so no
    command line offers it."""

    @property
    def expression_channel_count(self) -> int:
        """Expression channels of the conditioning image (``expression_dim`` with ``expression_channels``, else 0)."""
        return self.expression_dim if self.use_expression and self.expression_channels else 0

    @property
    def render_conditioning_scale(self) -> float:
        """The scale the renderers give the ControlNet: ``conditioning_scale`` when sampling by diffusion, 1 for
        the w/o-diffusion single pass."""
        return self.conditioning_scale if self.use_diffusion else 1.0

    @property
    def conditioning_channels(self) -> int:
        """Channels of the conditioning image: rasterized buffers + sampled features (+ the expression code)."""
        return RASTER_CHANNELS + self.features.num_output_channels + self.expression_channel_count

    def validate(self) -> None:
        n = len(self.unet.block_out_channels)
        unet = self.unet
        if not (len(unet.down_block_types) == len(unet.up_block_types) == len(unet.attention_heads) == n):
            raise ValueError("unet: block_out_channels, down/up_block_types and attention_heads need equal lengths")
        factor = self.vae.downsample_factor
        if 2 ** (len(self.conditioning_embedding_channels) - 1) != factor:
            raise ValueError(
                f"conditioning_embedding_channels {self.conditioning_embedding_channels} downsample by "
                f"{2 ** (len(self.conditioning_embedding_channels) - 1)}, but the VAE downsamples by {factor}"
            )
        multiple = factor * 2 ** (n - 1)
        if self.resolution % multiple:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {multiple}")
        if self.features.mapping not in ("triplane", "spherical", "none"):
            raise ValueError(f"features.mapping must be triplane|spherical|none, got {self.features.mapping!r}")
        if self.train_unet and not self.use_ldm_prior:
            raise ValueError("train_unet fine-tunes the pretrained UNet; without the LDM prior (use_ldm_prior=False) "
                             "the UNet is trained from scratch anyway")
        if not (math.isfinite(self.conditioning_scale) and self.conditioning_scale > 0):
            raise ValueError(f"conditioning_scale must be a positive number, got {self.conditioning_scale}")
        if (problem := schedule_problem(self.scheduler)) is not None:  # NaN losses from the first step
            raise ValueError(problem)
        if not 0 <= self.train_timesteps <= self.scheduler.num_train_timesteps:
            raise ValueError(f"train_timesteps must be 0 (all) or at most scheduler.num_train_timesteps "
                             f"({self.scheduler.num_train_timesteps}), got {self.train_timesteps}")
        if self.expression_dim <= 0 or self.expression_tokens <= 0:
            raise ValueError("expression_dim and expression_tokens must be positive")
        # each divided by zero, made NaN or failed deep inside a network's construction, after the data and base
        # stages; refused here, when the options are parsed
        if not (math.isfinite(self.depth_scale) and self.depth_scale > 0):
            raise ValueError(f"{_flag('depth_scale')} must be a positive number (depth is divided by it), got "
                             f"{self.depth_scale}")
        if not math.isfinite(self.depth_center):
            raise ValueError(f"{_flag('depth_center')} must be a finite number, got {self.depth_center}")
        features = self.features
        for name in ("resolution", "channels"):
            if getattr(features, name) < 1:
                raise ValueError(f"{_flag('features.' + name)} must be >= 1, got {getattr(features, name)}")
        if not (math.isfinite(features.init_std) and features.init_std >= 0):
            raise ValueError(f"{_flag('features.init_std')} must be a finite number >= 0, got {features.init_std}")
        if any(c < 1 for c in self.conditioning_embedding_channels):
            raise ValueError(f"{_flag('conditioning_embedding_channels')} must all be >= 1, got "
                             f"{self.conditioning_embedding_channels}")

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionAvatarsConfig":
        """From :meth:`to_dict`'s output; every field typed and checked, unknown fields refused."""
        return from_jsonable(cls, data)


def _flag(name: str) -> str:
    """A model field with its flags: ``scheduler.beta_end (--model.scheduler.beta-end; --train.model.scheduler.beta-end
    in launch_all)``."""
    flag = name.replace("_", "-")
    return f"{name} (--model.{flag}; --train.model.{flag} in launch_all)"


def schedule_problem(scheduler: SchedulerConfig) -> str | None:
    """Why ``scheduler`` makes no usable noise schedule, naming the flag, or None.

    The schedule (avatars/schedulers.py) is diffusers' ``scaled_linear`` betas rescaled to zero terminal SNR, in
    float32: one timestep, or betas whose signal level no longer changes in float32 between the last two
    timesteps (too small a beta_end; too large, so the level underflows before the end: beta_end 0.3 of 1000
    timesteps), make it NaN, and every loss after it. Checked here in float64, with margins, without diffusers."""
    steps, start, end = scheduler.num_train_timesteps, scheduler.beta_start, scheduler.beta_end
    if steps < 2:
        return (f"{_flag('scheduler.num_train_timesteps')} must be >= 2 (the zero-terminal-SNR rescale of one "
                f"timestep is NaN), got {steps}")
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end < 1):
        return (f"{_flag('scheduler.beta_start')} and {_flag('scheduler.beta_end')} must satisfy "
                f"0 <= beta_start < beta_end < 1, got {start} and {end}")
    first, last = math.sqrt(start), math.sqrt(end)
    log_alpha_bar = [0.0] * steps  # log of the cumulative product of (1 - beta)
    total = 0.0
    for i in range(steps):
        total += math.log1p(-(first + (last - first) * i / (steps - 1)) ** 2)
        log_alpha_bar[i] = total
    root = [math.exp(value / 2) for value in log_alpha_bar]  # sqrt(alpha_bar)
    # the rescale: sqrt(alpha_bar) - its last value, times root[0] / (root[0] - root[-1]); the second-to-last
    # timestep's level must stay a distinct float32 and its square a normal one
    gap = root[-2] - root[-1]
    if gap < 1e-6 * root[-2]:
        why = "does not change in float32 (too small a beta_end)"
    elif (gap * root[0] / (root[0] - root[-1])) ** 2 < 1e-37:
        why = "below float32's range (too large a beta_end)"
    else:
        return None
    return (f"{_flag('scheduler.beta_end')} {end} with {steps} timesteps (beta_start {start}) makes the "
            f"zero-terminal-SNR schedule NaN: the signal level of the last timesteps {why}")


def paper_config(expression_dim: int = 100, **overrides: Any) -> DiffusionAvatarsConfig:
    """The paper's setting: SD2.1 layout, 512x512, TriPlanes 512x512x16, 73 input channels."""
    config = DiffusionAvatarsConfig(expression_dim=expression_dim, **overrides)
    config.validate()
    return config


def tiny_config(expression_dim: int = 16, **overrides: Any) -> DiffusionAvatarsConfig:
    """CPU test preset: 64x64 images, VAE factor 4, UNet with ~1 M parameters, random weights; the expression code
    also reaches the ControlNet as conditioning channels (``expression_channels``, see its docstring)."""
    config = DiffusionAvatarsConfig(
        unet=UNetConfig(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            attention_heads=(2, 4),
            cross_attention_dim=32,
            use_linear_projection=True,
            norm_num_groups=8,
            upcast_attention=False,
        ),
        vae=VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8),
        features=FeatureConfig(mapping="triplane", resolution=32, channels=4),
        resolution=64,
        expression_dim=expression_dim,
        conditioning_embedding_channels=(8, 16, 32),
        expression_channels=True,
        conditioning_scale=1.4,
        train_timesteps=20,
        requires_pretrained_base=False,
    )
    config = dataclasses.replace(config, **overrides) if overrides else config
    config.validate()
    return config


#: Samplers a render can use (avatars.schedulers builds them): here, so that a renderer's options are
#: checked without importing diffusers.
SAMPLERS = ("ddpm", "ddim", "dpm")


@dataclass
class RenderOptions:
    """How :class:`RenderPipeline` runs a model."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Weights of the networks and the VAE: "auto" = bf16 on CUDA, fp32 elsewhere (on the CPU bf16
    renders single frames slower, see README)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the networks of a denoising step ("auto": on CUDA only; a CPU compile takes
    minutes for little gain). On CUDA the "reduce-overhead" mode records CUDA graphs per bucket."""
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """Record each bucket's whole render (conditioning, the DDPM loop or the single pass, the VAE
    decode) as one CUDA graph and replay it per call: one launch instead of thousands of eager
    kernel launches, and nothing to compile (the recording is one eager render). "auto": on CUDA
    when ``compile`` is off (compile's "reduce-overhead" mode records its own graphs); "on" needs
    CUDA and turns compile's "auto" off. DDIM and DPM-Solver++ (host reads in diffusers' steps) stay
    eager."""
    batch_buckets: tuple[int, ...] = ()
    """Batch sizes a call runs at (padded up to the smallest that holds it). Empty: powers of two
    up to the renderer's max batch size, plus that size. One bucket: no batching effect at all."""
    decode_chunk: int = 8
    """Most frames the VAE decodes at once (memory: the float32 decode of 32 512x512 frames
    reserved 74 GiB on an H100)."""
    compile_cache: Path | None = None
    """Folder (shared storage on a cluster) that keeps the compiled code between processes: the
    warm-up loads it first and saves what it compiled, so only the first replica of a torch
    version and device kind compiles (see avatars/pipelines/compile_cache.py). None: each process
    compiles (torch's own per-machine cache still applies)."""

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.cuda_graphs == "on" and self.compile == "on":
            raise ValueError("cuda_graphs='on' and compile='on': choose one (compile's reduce-overhead mode "
                             "records its own CUDA graphs)")
        if any(int(b) < 1 for b in self.batch_buckets):
            raise ValueError(f"batch buckets must be >= 1, got {self.batch_buckets}")
        if self.decode_chunk < 1:
            raise ValueError("decode_chunk must be >= 1")

    def precision_on(self, device_type: str) -> str:
        """"bf16" or "fp32" on a device of this type ("cuda", "cpu", ...)."""
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision

    def compiles_on(self, device_type: str) -> bool:
        # an explicit cuda_graphs="on" takes the place of compile's "auto"
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda" and self.cuda_graphs != "on")

    def graphs_on(self, device_type: str) -> bool:
        """Whether renders on this device type replay recorded CUDA graphs ("on" off CUDA is an error)."""
        if self.cuda_graphs == "on" and device_type != "cuda":
            raise ValueError(f"cuda_graphs='on' needs a CUDA device, got {device_type!r}")
        if self.compiles_on(device_type):
            return False
        return self.cuda_graphs == "on" or (self.cuda_graphs == "auto" and device_type == "cuda")

    def buckets(self, max_batch_size: int) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted({int(b) for b in self.batch_buckets}))
        sizes = {max_batch_size}
        size = 1
        while size < max_batch_size:
            sizes.add(size)
            size *= 2
        return tuple(sorted(sizes))
