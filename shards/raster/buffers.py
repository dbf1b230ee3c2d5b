"""The one output type both rasterizer backends return (see docs/CONTRACTS.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RasterBuffers:
    """Per-pixel geometry buffers, channel-last, on the caller's device.

    Outside `mask` every float buffer is 0 and `triangle_id` is -1, so buffers can be
    stacked or saved without a separate validity pass.
    """

    mask: torch.Tensor  # (H, W) bool
    depth: torch.Tensor  # (H, W) float32, camera z
    normals: torch.Tensor  # (H, W, 3) float32, unit, OpenCV camera frame
    attributes: torch.Tensor  # (H, W, C) float32
    triangle_id: torch.Tensor  # (H, W) int32, index into `faces`, -1 outside
    barycentrics: torch.Tensor  # (H, W, 3) float32, perspective-correct

    @staticmethod
    def empty(height: int, width: int, channels: int, device: torch.device | str) -> "RasterBuffers":
        """Buffers of an image in which nothing was drawn."""
        f = dict(dtype=torch.float32, device=device)
        return RasterBuffers(
            mask=torch.zeros(height, width, dtype=torch.bool, device=device),
            depth=torch.zeros(height, width, **f),
            normals=torch.zeros(height, width, 3, **f),
            attributes=torch.zeros(height, width, channels, **f),
            triangle_id=torch.full((height, width), -1, dtype=torch.int32, device=device),
            barycentrics=torch.zeros(height, width, 3, **f),
        )

    def to(self, device: torch.device | str) -> "RasterBuffers":
        return RasterBuffers(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))
