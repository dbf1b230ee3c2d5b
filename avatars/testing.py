"""Synthetic inputs for tests and benchmarks (no data on disk needed)."""

from __future__ import annotations

import torch


def synthetic_batch(batch_size: int = 2, size: int = 64, expression_dim: int = 16, seed: int = 0) -> dict:
    """A batch following docs/CONTRACTS.md "Training batch": a sphere-like head in a disc mask,
    smooth canonical coordinates / normals / depth, a target image that is a smooth function of
    the position, per-sample random ambient coordinates and expression codes."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    mask = ((xs**2 + ys**2) < 0.6).float()[None, None].expand(batch_size, 1, size, size).contiguous()
    z = torch.sqrt((1 - xs**2 - ys**2).clamp_min(0))
    xyz = torch.stack([xs, ys, z])[None].expand(batch_size, 3, size, size)
    ambient = 0.3 * torch.randn(batch_size, 2, 1, 1, generator=g).expand(batch_size, 2, size, size)
    canonical = (torch.cat([xyz, ambient], 1) * mask).contiguous()
    image = (torch.stack([xs, ys, xs * ys])[None] * mask).expand(batch_size, 3, size, size).contiguous()
    return {
        "image": image,
        "mask": mask,
        "depth": ((1.0 - 0.2 * z)[None, None] * mask).contiguous(),
        "normals": (xyz * mask).contiguous(),
        "canonical": canonical,
        "expression": torch.randn(batch_size, expression_dim, generator=g),
        "__key__": [f"person/seq/frame_{i:05d}/cam_0" for i in range(batch_size)],
    }


def activate_zero_layers(model, seed: int = 1, scale: float = 0.1):
    """Give a fresh model's zero-initialised layers (ControlNet outputs, expression ``to_out``) small
    random weights, so that conditioning and expression change its renders (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    if model.controlnet is not None:
        c = model.controlnet
        layers += [*c.controlnet_down_blocks, c.controlnet_mid_block, c.controlnet_cond_embedding.conv_out]
    if model.expression_layers is not None:
        layers += list(model.expression_layers.output_projections())
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model
