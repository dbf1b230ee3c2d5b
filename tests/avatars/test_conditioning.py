"""The rasterized conditioning channels: normalisation inside the mask, a distinct background."""

import torch

from avatars.models.conditioning import BACKGROUND, rasterized_channels


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=gen), dim=1) * mask
    canonical = (torch.rand(2, 5, 8, 8, generator=gen) * 2 - 1) / 1.05 * mask
    depth = (0.9 + 0.2 * torch.rand(2, 1, 8, 8, generator=gen)) * mask
    return {"mask": mask, "depth": depth, "normals": normals, "canonical": canonical}


def test_background_is_minus_one_in_every_channel_and_unlike_any_face_pixel():
    batch = _batch()
    out = rasterized_channels(batch, depth_center=1.0, depth_scale=0.3)
    inside = batch["mask"][:, 0] > 0.5
    assert BACKGROUND == -1.0
    assert torch.all(out.permute(0, 2, 3, 1)[~inside] == -1.0)
    face = out.permute(0, 2, 3, 1)[inside]
    torch.testing.assert_close(face[:, 0], ((batch["depth"][:, 0][inside]) - 1.0) / 0.3)
    torch.testing.assert_close(face[:, 1:4], batch["canonical"].permute(0, 2, 3, 1)[inside][:, :3])
    torch.testing.assert_close(face[:, 4:7], batch["normals"].permute(0, 2, 3, 1)[inside])
    torch.testing.assert_close(face[:, 7:9], batch["canonical"].permute(0, 2, 3, 1)[inside][:, 3:])
    # no face pixel looks like background: the buffers' old "0 outside" was a valid face value
    assert torch.all((face - BACKGROUND).abs().amax(1) > 0.05)
