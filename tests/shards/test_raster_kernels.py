"""The compiled CPU backend against the torch implementation it replaced, bit for bit.

`raster_reference.py` is the old backend, frozen. Every buffer must be *equal* (not close):
the synthetic images, the shards and their sha256 depend on them, and a run over data
made by the old code must find it up to date.
"""

from __future__ import annotations

import numpy as np
import pytest
import raster_reference
import torch
from test_raster import bumpy_head, look_at, pinhole, plane_quad

from shards.raster import rasterize, rasterize_views
from shards.raster.cpu import rasterize_cpu, rasterize_cpu_views

FIELDS = ("mask", "depth", "normals", "attributes", "triangle_id", "barycentrics")


def assert_identical(new, old, what: str) -> None:
    for name in FIELDS:
        a, b = getattr(new, name), getattr(old, name)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name)
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        assert bool(same.all()), f"{what}: {name} differs at {int((~same).sum())} entries"


def orbit(width: int, height: int, n: int, distance: float = 3.2) -> list:
    cams = []
    for k in range(n):
        a = 2 * np.pi * k / n
        eye = np.array([distance * np.sin(a), 0.6 * np.sin(3 * a), -distance * np.cos(a)])
        cams.append(pinhole(width, height, focal=0.9 * width, world_to_cam=look_at(eye, np.zeros(3))))
    return cams


@pytest.mark.parametrize("size", [(64, 48), (200, 160)])
def test_closed_mesh_many_cameras_matches_torch_implementation(size):
    # ~1 pixel per triangle at 64 x 48 (the synthetic data's regime); 200 x 160 has boxes of
    # several stencil classes. One camera sits inside the mesh's near range: faces are dropped.
    v, f = bumpy_head(24, 40)
    attrs = torch.cat([v, v.norm(dim=1, keepdim=True), torch.sin(3 * v[:, :1])], 1)
    cams = orbit(*size, 6) + [pinhole(*size, focal=40.0, world_to_cam=look_at(np.array([0.0, 0.0, -1.05]),
                                                                             np.zeros(3)))]
    new = rasterize_cpu_views(v, f, cams, attrs)
    for i, cam in enumerate(cams):
        assert_identical(new[i], raster_reference.rasterize_cpu(v, f, cam, attrs), f"camera {i}")
    assert all(b.mask.any() for b in new)


@pytest.mark.parametrize("seed", [0, 1])
def test_triangle_soup_matches_torch_implementation(seed):
    """Slivers, zero-area and NaN faces, triangles far larger than a tile (tiles), faces across
    the near plane, shared edges and exact pixel-centre vertices, with and without attributes."""
    rng = np.random.default_rng(seed)
    cam = pinhole(96, 72, focal=70.0)
    n = 150
    centre = np.concatenate([rng.uniform(-1.5, 1.5, (n, 2)), rng.uniform(0.3, 5.0, (n, 1))], 1)
    scale = np.exp(rng.uniform(np.log(0.005), np.log(3.0), (n, 1, 1)))
    tri = centre[:, None, :] + scale * rng.normal(size=(n, 3, 3))
    tri[:20, 2] = tri[:20, 0] + 1e-4 * (tri[:20, 1] - tri[:20, 0])  # slivers
    tri[20:25, 2] = tri[20:25, 1]  # zero area
    tri[25, 1] = np.nan
    tri[26:30, :, 2] = 2.0  # pixel-centre vertices: x, y on the pixel grid at z = 2 (focal 70)
    tri[26:30, :, :2] = (np.round(rng.uniform(10, 60, (4, 3, 2))) - [47.5, 35.5]) * 2.0 / 70.0
    quad, quad_f = plane_quad(-9.0, 9.0, -9.0, 9.0, z=6.0)  # two triangles far larger than the image
    v = torch.cat([torch.tensor(tri.reshape(-1, 3), dtype=torch.float32), quad])
    f = torch.cat([torch.arange(3 * n).view(n, 3), quad_f + 3 * n])
    f[30:60] = f[30:60].flip(1)  # mixed winding
    attrs = torch.tensor(rng.normal(size=(len(v), 5)), dtype=torch.float32)
    ref = raster_reference.rasterize_cpu(v, f, cam, attrs)
    assert ref.mask.all() and (ref.triangle_id < n).float().mean() > 0.3
    assert_identical(rasterize_cpu(v, f, cam, attrs), ref, "soup with attributes")
    assert_identical(rasterize_cpu(v, f, cam), raster_reference.rasterize_cpu(v, f, cam), "soup without")


def test_views_api_equals_one_call_per_camera():
    v, f = bumpy_head(12, 20)
    cams = orbit(40, 30, 3)
    views = rasterize_views(v, f, cams, attributes=v, backend="cpu")
    assert len(views) == 3
    for cam, b in zip(cams, views):
        assert_identical(b, rasterize(v, f, cam, attributes=v, backend="cpu"), "views vs single")
    assert rasterize_views(v, f, [], backend="cpu") == []
    with pytest.raises(ValueError, match="backend"):
        rasterize_views(v, f, cams, backend="vulkan")
    with pytest.raises(ValueError, match="face indices"):
        rasterize_views(v, f + len(v), cams, backend="cpu")
