"""Learned spatial feature maps sampled at the rasterized canonical coordinates.

All maps are registered ``nn.Parameter`` s (the optimizer gives them their own learning rate,
and DeepSpeed ZeRO needs them registered on the model). :class:`FeaturePlanes` is a diffusers
model: ``save_pretrained`` / ``from_pretrained`` store its config and maps.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from avatars.configs import FeatureConfig

#: Lookup coordinate of background pixels: every bilinear tap of it lies outside the planes
#: (``align_corners=False``: -1 and 1 are the outer texel edges), so it samples zeros.
OUTSIDE = 2.0


def _sample(planes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample P planes (P, C, R, R) at coords (P, B, 2, H, W) in [-1, 1] -> (B, P * C, H, W),
    plane by plane in channel order, with one ``grid_sample`` call in float32.

    ``coords[:, :, 0]`` indexes a plane's width axis, ``coords[:, :, 1]`` its height axis
    (``grid_sample`` convention), ``align_corners=False``, zeros outside [-1, 1]. The frames of
    the batch are stacked along the grid's height, so no plane is copied per frame. float32
    whatever the planes' dtype: a bf16 coordinate is off by up to a texel of a 512 plane.
    """
    count, batch, _, height, width = coords.shape
    grid = coords.float().permute(0, 1, 3, 4, 2).reshape(count, batch * height, width, 2)
    out = F.grid_sample(planes.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(count, -1, batch, height, width).permute(2, 0, 1, 3, 4).reshape(batch, -1, height, width)


def spherical_uv(xyz: torch.Tensor) -> torch.Tensor:
    """Map canonical xyz (B, 3, H, W) to (azimuth / pi, elevation / (pi / 2)) in [-1, 1].

    Azimuth is measured around the y axis from +z (the face's forward axis) towards +x;
    elevation is the angle above the xz plane. The origin maps to (0, 0).
    """
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    radius = torch.sqrt(x * x + y * y + z * z).clamp_min(1e-8)
    azimuth = torch.atan2(x, z) / math.pi
    elevation = torch.asin((y / radius).clamp(-1.0, 1.0)) / (math.pi / 2)
    return torch.stack([azimuth, elevation], dim=1)


class FeaturePlanes(ModelMixin, ConfigMixin):
    """TriPlane / spherical-UV feature map plus ambient map; the arguments are the fields of
    :class:`FeatureConfig` (``generator`` draws the initial maps and is not part of the config)."""

    ignore_for_config = ["generator"]

    @register_to_config
    def __init__(self, mapping: str = FeatureConfig.mapping, resolution: int = FeatureConfig.resolution,
                 channels: int = FeatureConfig.channels, init_std: float = FeatureConfig.init_std,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.feature_config = FeatureConfig(mapping=mapping, resolution=resolution, channels=channels,
                                            init_std=init_std)
        r, c = resolution, channels
        if mapping == "none":
            self.spatial = None
            self.ambient = None
            return

        def init(*shape: int) -> nn.Parameter:
            # Drawn on CPU with the seeded generator, then moved to the default device (or meta).
            values = torch.randn(*shape, generator=generator, device="cpu") * init_std
            return nn.Parameter(values.to(torch.empty(0).device))

        if mapping == "triplane":
            self.spatial = init(3, c, r, r)  # planes xy, xz, yz
        elif mapping == "spherical":
            self.spatial = init(1, 3 * c, r, r)
        else:
            raise ValueError(f"unknown feature mapping {mapping!r}")
        self.ambient = init(c, r, r)

    @classmethod
    def from_feature_config(cls, config: FeatureConfig, generator: torch.Generator | None = None) -> "FeaturePlanes":
        return cls(**dataclasses.asdict(config), generator=generator)

    @property
    def out_channels(self) -> int:
        return self.feature_config.num_output_channels

    def forward(self, canonical: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """canonical (B, 5, H, W) xyz + ambient, mask (B, 1, H, W) -> (B, out_channels, H, W)."""
        if self.spatial is None:
            return canonical.new_zeros(canonical.shape[0], 0, *canonical.shape[2:])
        ambient = canonical[:, 3:5]
        background = (mask <= 0).unsqueeze(0)  # (1, B, 1, H, W), against coordinates (P, B, 2, H, W)

        def lookup(planes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
            # Background pixels (canonical 0) would all sample the planes' centre, and in the backward
            # each would add its zero gradient to the same four texels: on a GPU, atomics contending
            # for one address per channel, for most of the frame. Outside [-1, 1] they sample and add
            # nothing; their features are 0 either way (zeros padding here, the mask below).
            return _sample(planes, coords.masked_fill(background, OUTSIDE))

        if self.feature_config.mapping == "triplane":
            # planes xy, xz, yz, ambient; slices, so no index tensor travels to the device
            coords = torch.stack([canonical[:, 0:2], canonical[:, 0:3:2], canonical[:, 1:3], ambient])
            feats = lookup(torch.cat([self.spatial, self.ambient.unsqueeze(0)]), coords)
        else:
            feats = torch.cat([lookup(self.spatial, spherical_uv(canonical[:, 0:3]).unsqueeze(0)),
                               lookup(self.ambient.unsqueeze(0), ambient.unsqueeze(0))], dim=1)
        return feats * mask.to(feats.dtype)
