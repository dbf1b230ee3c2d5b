import math

import torch

from avatars.configs import FeatureConfig
from avatars.models.feature_planes import FeaturePlanes, spherical_uv


def _ramp(resolution: int) -> torch.Tensor:
    # texel centres at (i + 0.5) / R * 2 - 1 (align_corners=False)
    return (torch.arange(resolution) + 0.5) / resolution * 2 - 1


def test_triplane_bilinear_sampling_and_mask():
    planes = FeaturePlanes(FeatureConfig(mapping="triplane", resolution=8, channels=1))
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
    planes = FeaturePlanes(FeatureConfig(mapping="spherical", resolution=8, channels=2))
    assert tuple(planes.spatial.shape) == (1, 6, 8, 8)
    out = planes(torch.rand(2, 5, 4, 4), torch.ones(2, 1, 4, 4))
    assert out.shape == (2, 8, 4, 4) == (2, planes.out_channels, 4, 4)


def test_no_spatial_features_variant():
    planes = FeaturePlanes(FeatureConfig(mapping="none"))
    assert list(planes.parameters()) == []
    assert planes(torch.rand(2, 5, 4, 4), torch.ones(2, 1, 4, 4)).shape == (2, 0, 4, 4)
