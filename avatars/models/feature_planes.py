"""Learned spatial feature maps sampled at the rasterized canonical coordinates.

All maps are registered ``nn.Parameter`` s (the optimizer gives them their own learning rate,
and DeepSpeed ZeRO needs them registered on the model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avatars.configs import FeatureConfig


def _sample(plane: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``plane`` (C, R, R) at ``coords`` (B, 2, H, W) in [-1, 1] -> (B, C, H, W).

    ``coords[:, 0]`` indexes the plane's width axis, ``coords[:, 1]`` its height axis
    (``grid_sample`` convention), ``align_corners=False``, zeros outside [-1, 1].
    """
    batch = coords.shape[0]
    grid = coords.permute(0, 2, 3, 1).to(plane.dtype)
    planes = plane.unsqueeze(0).expand(batch, -1, -1, -1)
    return F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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


class FeaturePlanes(nn.Module):
    """TriPlane / spherical-UV feature map plus ambient map (see :class:`FeatureConfig`)."""

    def __init__(self, config: FeatureConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        r, c = config.resolution, config.channels
        if config.mapping == "none":
            self.spatial = None
            self.ambient = None
            return

        def init(*shape: int) -> nn.Parameter:
            # Drawn on CPU with the seeded generator, then moved to the default device (or meta).
            values = torch.randn(*shape, generator=generator, device="cpu") * config.init_std
            return nn.Parameter(values.to(torch.empty(0).device))

        if config.mapping == "triplane":
            self.spatial = init(3, c, r, r)  # planes xy, xz, yz
        elif config.mapping == "spherical":
            self.spatial = init(1, 3 * c, r, r)
        else:
            raise ValueError(f"unknown feature mapping {config.mapping!r}")
        self.ambient = init(c, r, r)

    @property
    def out_channels(self) -> int:
        return self.config.num_output_channels

    def forward(self, canonical: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """canonical (B, 5, H, W) xyz + ambient, mask (B, 1, H, W) -> (B, out_channels, H, W)."""
        if self.spatial is None:
            return canonical.new_zeros(canonical.shape[0], 0, *canonical.shape[2:])
        xyz, ambient = canonical[:, 0:3], canonical[:, 3:5]
        if self.config.mapping == "triplane":
            pairs = ((0, 1), (0, 2), (1, 2))
            feats = [_sample(self.spatial[i], xyz[:, list(p)]) for i, p in enumerate(pairs)]
        else:
            feats = [_sample(self.spatial[0], spherical_uv(xyz))]
        feats.append(_sample(self.ambient, ambient))
        return torch.cat(feats, dim=1) * mask.to(feats[0].dtype)
