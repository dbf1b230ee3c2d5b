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


def test_expression_channels_hold_the_code_inside_the_mask_and_zero_outside():
    """The tiny preset's expression channels: the frame's code at every face pixel, after the feature maps; the
    "w/o expression" ablation and the paper config have none."""
    import pytest

    from avatars.configs import paper_config, tiny_config
    from avatars.models.conditioning import ConditioningBuilder, expression_channels

    batch = _batch()
    batch["expression"] = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]])
    out = expression_channels(batch, 3)
    inside = batch["mask"][:, 0] > 0.5
    assert torch.all(out.permute(0, 2, 3, 1)[~inside] == 0)
    for b in range(2):
        torch.testing.assert_close(out[b].permute(1, 2, 0)[inside[b]], batch["expression"][b].expand(16, 3))
    with pytest.raises(ValueError, match="expression"):
        expression_channels(batch, 4)

    config = tiny_config(expression_dim=3, resolution=8, conditioning_embedding_channels=(8, 16, 32))
    assert config.expression_channels and config.conditioning_channels == 9 + 16 + 3
    cond = ConditioningBuilder(config)(batch)
    assert cond.shape[1] == config.conditioning_channels
    torch.testing.assert_close(cond[:, -3:], out)
    assert tiny_config(use_expression=False).conditioning_channels == 9 + 16
    assert not paper_config().expression_channels and paper_config().conditioning_channels == 73


def test_the_conditioning_image_is_the_concatenation_laid_out_channels_last():
    """Same values as ``torch.cat(dim=1)``, channels-last strides (the fast layout of the embedding's
    convolutions), and the gradient still reaches every part that needs one (the feature planes)."""
    from avatars.configs import tiny_config
    from avatars.models.conditioning import ConditioningBuilder, concat_channels_last, expression_channels

    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(2, c, 8, 8, generator=gen, requires_grad=c == 4) for c in (9, 4, 3)]
    out = concat_channels_last(parts)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out, torch.cat(parts, dim=1))
    (out * torch.arange(16.0).view(1, 16, 1, 1)).sum().backward()
    assert torch.equal(parts[1].grad, torch.arange(9.0, 13.0).view(1, 4, 1, 1).expand(2, 4, 8, 8))

    batch = _batch()
    batch["expression"] = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]])
    config = tiny_config(expression_dim=3, resolution=8, conditioning_embedding_channels=(8, 16, 32))
    builder = ConditioningBuilder(config)
    cond = builder(batch)
    assert cond.is_contiguous(memory_format=torch.channels_last)
    expected = torch.cat([rasterized_channels(batch, builder.depth_center, builder.depth_scale),
                          builder.features(batch["canonical"], batch["mask"]), expression_channels(batch, 3)], dim=1)
    assert torch.equal(cond, expected)
    cond.sum().backward()
    assert builder.features.spatial.grad is not None and builder.features.spatial.grad.abs().sum() > 0


def test_depth_normalisation_uses_the_configured_centre_and_scale():
    """DiffusionAvatarsConfig.depth_center / depth_scale reach the conditioning: depth (z - c) / s inside the mask."""
    from avatars.configs import tiny_config
    from avatars.models.conditioning import ConditioningBuilder

    batch = _batch()
    batch["expression"] = torch.zeros(2, 3)
    config = tiny_config(expression_dim=3, resolution=8, conditioning_embedding_channels=(8, 16, 32),
                         depth_center=0.95, depth_scale=0.05)
    depth = ConditioningBuilder(config)(batch)[:, 0]
    inside = batch["mask"][:, 0] > 0.5
    torch.testing.assert_close(depth[inside], (batch["depth"][:, 0][inside] - 0.95) / 0.05)
    assert depth[inside].max() > 2  # the default (z - 1) / 0.3 stays below 0.34 on these depths (0.9 to 1.1)
    assert torch.all(depth[~inside] == BACKGROUND)
