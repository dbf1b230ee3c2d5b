import math

import pytest
import torch

from avatars.configs import FeatureConfig
from avatars.models.feature_planes import FeaturePlanes, spherical_uv


def _ramp(resolution: int) -> torch.Tensor:
    # texel centres at (i + 0.5) / R * 2 - 1 (align_corners=False)
    return (torch.arange(resolution) + 0.5) / resolution * 2 - 1


def test_triplane_bilinear_sampling_and_mask():
    planes = FeaturePlanes.from_feature_config(FeatureConfig(mapping="triplane", resolution=8, channels=1))
    r = _ramp(8)
    with torch.no_grad():
        planes.spatial[0, 0] = r[None, :]  # xy plane: value = x (width axis)
        planes.spatial[1, 0] = r[:, None]  # xz plane: value = z (height axis)
        planes.spatial[2, 0] = r[None, :] * 2  # yz plane: value = 2 y
        planes.ambient[0] = r[:, None] + r[None, :]  # ambient: a0 + a1
    coords = torch.tensor([[0.1, -0.3, 0.5, 0.2, -0.4], [0.6, 0.2, -0.5, 0.0, 0.3]])  # inside the texel centres' range
    canonical = coords.T.reshape(1, 5, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    out = planes(canonical, mask)
    assert out.shape == (1, 4, 1, 2)
    expected = torch.tensor([0.1, 0.5, -0.6, -0.2])
    torch.testing.assert_close(out[0, :, 0, 0], expected, atol=1e-5, rtol=0)
    assert torch.all(out[..., 1] == 0)  # outside the mask


def test_spherical_uv_mapping_and_variant():
    points = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    uv = spherical_uv(points.T.reshape(1, 3, 1, 4))[0, :, 0].T
    torch.testing.assert_close(uv[:3], torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]]))
    assert math.isclose(abs(uv[3, 0].item()), 1.0, abs_tol=1e-6)
    planes = FeaturePlanes.from_feature_config(FeatureConfig(mapping="spherical", resolution=8, channels=2))
    assert tuple(planes.spatial.shape) == (1, 6, 8, 8)
    out = planes(torch.rand(2, 5, 4, 4), torch.ones(2, 1, 4, 4))
    assert out.shape == (2, 8, 4, 4) == (2, planes.out_channels, 4, 4)


def test_no_spatial_features_variant():
    planes = FeaturePlanes.from_feature_config(FeatureConfig(mapping="none"))
    assert list(planes.parameters()) == []
    assert planes(torch.rand(2, 5, 4, 4), torch.ones(2, 1, 4, 4)).shape == (2, 0, 4, 4)


def test_fused_lookup_equals_one_grid_sample_per_plane():
    """One grid_sample over all planes (frames stacked along the grid) == the per-plane lookup."""
    import torch.nn.functional as F

    planes = FeaturePlanes.from_feature_config(FeatureConfig(mapping="triplane", resolution=16, channels=3),
                           generator=torch.Generator().manual_seed(0))
    canonical = torch.rand(3, 5, 6, 7, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    mask = (torch.rand(3, 1, 6, 7) > 0.3).float()

    def one(plane, coords):
        grid = coords.permute(0, 2, 3, 1)
        return F.grid_sample(plane.unsqueeze(0).expand(3, -1, -1, -1), grid, align_corners=False)

    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = torch.cat([one(planes.spatial[i], canonical[:, list(p)]) for i, p in enumerate(pairs)]
                         + [one(planes.ambient, canonical[:, 3:5])], dim=1) * mask
    torch.testing.assert_close(planes(canonical, mask), expected, rtol=0, atol=1e-6)


def test_bf16_planes_are_sampled_in_float32():
    """The lookup coordinate stays float32: in bf16, 0.501 rounds to 0.5, an eighth of a texel
    of a 256 plane; the plane values here (texel indices) are exact in bf16."""
    planes = FeaturePlanes.from_feature_config(FeatureConfig(mapping="triplane", resolution=256, channels=1))
    with torch.no_grad():
        planes.spatial[0, 0] = torch.arange(256.0)[None, :]  # value = texel column
    coords = torch.zeros(1, 5, 1, 1)
    coords[0, 0] = 0.501
    expected = (0.501 + 1) / 2 * 256 - 0.5  # continuous texel position (align_corners=False)
    planes.to(torch.bfloat16)
    out = planes(coords, torch.ones(1, 1, 1, 1))
    assert out.dtype == torch.float32
    assert abs(out[0, 0, 0, 0].item() - expected) < 1e-3


def test_planes_start_as_the_official_standard_normal():
    """The official code initialises every neural texture with N(0, 1) (init_neural_textures_gain 1)."""
    from avatars.configs import FeatureConfig
    from avatars.models.feature_planes import FeaturePlanes

    assert FeatureConfig().init_std == 1.0 == FeaturePlanes().config.init_std  # one default
    planes = FeaturePlanes.from_feature_config(FeatureConfig(resolution=64, channels=4),
                                               generator=torch.Generator().manual_seed(0))
    for p in (planes.spatial, planes.ambient):
        assert abs(float(p.mean())) < 0.02 and abs(float(p.std()) - 1.0) < 0.02


@pytest.mark.parametrize("mapping", ["triplane", "spherical"])
def test_init_std_scales_the_initial_planes(mapping):
    """FeatureConfig.init_std is the std of every initial map, also when the model config builds them."""
    from avatars.configs import tiny_config
    from avatars.models.conditioning import ConditioningBuilder

    def planes(std: float) -> FeaturePlanes:
        features = FeatureConfig(mapping=mapping, resolution=64, channels=4, init_std=std)
        builder = ConditioningBuilder(tiny_config(features=features), generator=torch.Generator().manual_seed(0))
        assert builder.features.config.init_std == std
        return builder.features

    unit, small = planes(1.0), planes(0.1)
    for a, b in ((unit.spatial, small.spatial), (unit.ambient, small.ambient)):
        assert abs(float(b.detach().std()) - 0.1) < 0.002 and abs(float(b.detach().mean())) < 0.002
        torch.testing.assert_close(b, a * 0.1)  # the same draws, scaled
