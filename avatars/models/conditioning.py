"""Builds the ControlNet conditioning image from a training batch (docs/CONTRACTS.md).

Channel order: normalised depth (1), canonical xyz (3), camera-space normals (3),
ambient coordinates (2), then the sampled feature maps (``FeatureConfig.num_output_channels``), then, with
``expression_channels``, the expression code inside the mask (``expression_dim``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from avatars.configs import RASTER_CHANNELS, DiffusionAvatarsConfig
from avatars.models.feature_planes import FeaturePlanes

REQUIRED_KEYS = ("mask", "depth", "normals", "canonical")
#: Value of every rasterized channel outside the mask (the official code's): no valid value
#: reaches it (normalised canonical coordinates stay within +-1/1.05, unit normals cannot be
#: (-1, -1, -1), depth is (z - 1) / 0.3 for heads about a metre away), while 0, the buffers'
#: "nothing here", is the centre of every channel's valid range: the face's centre, a normal
#: in the image plane, an object at depth_center.
BACKGROUND = -1.0


def rasterized_channels(batch: dict, depth_center: float, depth_scale: float) -> torch.Tensor:
    """(B, 9, H, W): depth normalised inside the mask, canonical xyz, normals, ambient; every
    channel is :data:`BACKGROUND` outside the mask."""
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks keys {missing} (see docs/CONTRACTS.md 'Training batch')")
    mask = batch["mask"]
    canonical = batch["canonical"]
    if canonical.shape[1] != 5:
        raise ValueError(f"batch['canonical'] must have 5 channels (xyz + ambient), got {canonical.shape[1]}")
    depth = (batch["depth"] - depth_center) / depth_scale
    out = torch.cat([depth, canonical[:, 0:3], batch["normals"], canonical[:, 3:5]], dim=1)
    assert out.shape[1] == RASTER_CHANNELS
    return torch.where(mask > 0.5, out, torch.full_like(out, BACKGROUND))


class ConditioningBuilder(nn.Module):
    """Rasterized channels + learned feature maps -> conditioning image."""

    def __init__(self, config: DiffusionAvatarsConfig, generator: torch.Generator | None = None,
                 features: FeaturePlanes | None = None):
        super().__init__()
        self.depth_center = config.depth_center
        self.depth_scale = config.depth_scale
        self.features = features if features is not None else FeaturePlanes.from_feature_config(
            config.features, generator=generator)
        if self.features.feature_config != config.features:
            raise ValueError(f"feature planes {self.features.feature_config} do not match the config {config.features}")
        self.out_channels = config.conditioning_channels
        self.expression_channels = config.expression_channel_count

    def forward(self, batch: dict) -> torch.Tensor:
        raster = rasterized_channels(batch, self.depth_center, self.depth_scale)
        feats = self.features(batch["canonical"], batch["mask"])
        parts = [raster, feats.to(raster.dtype)]
        if self.expression_channels:
            parts.append(expression_channels(batch, self.expression_channels).to(raster.dtype))
        return concat_channels_last(parts)


def concat_channels_last(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, dim=1)`` laid out channels-last (NHWC strides, the same values and shape).

    The ControlNet's conditioning embedding convolves this image at full resolution: the costliest
    convolutions of a tiny-preset training step (its first one reads all channels, and its input gradient
    reaches the feature planes). oneDNN runs them about twice as fast on channels-last input, forward and
    backward, and concatenating straight into that layout costs less than converting afterwards
    (``benchmarks/bench_conditioning_layout.py``). On CUDA the networks are channels-last already."""
    return torch.cat([p.permute(0, 2, 3, 1) for p in parts], dim=3).permute(0, 3, 1, 2)


def expression_channels(batch: dict, dim: int) -> torch.Tensor:
    """(B, dim, H, W): every pixel inside the mask holds the frame's expression code, 0 outside (as the
    feature maps), so the ControlNet's convolutions can combine it with where on the face a pixel is."""
    if "expression" not in batch:
        raise KeyError("batch lacks 'expression' but the model has expression channels")
    code, mask = batch["expression"], batch["mask"]
    if code.dim() != 2 or code.shape[1] != dim:
        raise ValueError(f"batch['expression'] must be (B, {dim}), got {tuple(code.shape)}")
    return code.to(mask.dtype)[:, :, None, None] * (mask > 0.5).to(mask.dtype)


class ConditioningEmbedding(ControlNetConditioningEmbedding, ModelMixin, ConfigMixin):
    """ControlNet's conditioning embedding as a diffusers model, for the "w/o LDM prior" ablation
    (the conditioning image embedded to the latent grid and concatenated to the UNet input)."""

    @register_to_config
    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int,
                 block_out_channels: tuple[int, ...]):
        super().__init__(conditioning_embedding_channels, conditioning_channels, tuple(block_out_channels))
