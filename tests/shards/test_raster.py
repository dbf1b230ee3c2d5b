"""CPU rasterizer against analytic scenes (planes, a sphere, single triangles, grids).

Every expected value is computed independently of the rasterizer, in float64 numpy:
ray-plane / ray-sphere intersections and a point-in-triangle test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shards.contract import Camera
from shards.raster import RasterBuffers, available_backends, rasterize, vertex_normals
from shards.synthetic.head import sphere_mesh


def pinhole(width: int, height: int, focal: float, cx: float | None = None, cy: float | None = None,
            world_to_cam: np.ndarray | None = None, skew: float = 0.0) -> Camera:
    cx = (width - 1) / 2 if cx is None else cx
    cy = (height - 1) / 2 if cy is None else cy
    K = np.array([[focal, skew, cx], [0, focal, cy], [0, 0, 1]], dtype=np.float64)
    return Camera("test", K, np.eye(4) if world_to_cam is None else world_to_cam, width, height)


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """OpenCV world_to_cam (x right, y down, z forward) looking from eye at target."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, dtype=np.float64))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, -R @ eye
    return M


def pixel_rays(cam: Camera) -> np.ndarray:
    """(H, W, 3) camera-space ray directions with z == 1 through every pixel centre."""
    j, i = np.meshgrid(np.arange(cam.width, dtype=np.float64), np.arange(cam.height, dtype=np.float64))
    pix = np.stack([j, i, np.ones_like(j)], -1)
    return pix @ np.linalg.inv(cam.K).T


def cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """z component of the cross product of 2-D vectors (broadcasting)."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def to_cam(cam: Camera, points: np.ndarray) -> np.ndarray:
    return points @ cam.world_to_cam[:3, :3].T + cam.world_to_cam[:3, 3]


def uv_sphere(n_lat: int, n_lon: int, radius: float, center) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed UV sphere, outward winding (vertices on the sphere, faces inscribed)."""
    dirs, faces = sphere_mesh(n_lat, n_lon)
    v = dirs * radius + np.asarray(center)
    return torch.tensor(v, dtype=torch.float32), torch.tensor(faces, dtype=torch.int64)


def assert_empty_outside(buf: RasterBuffers) -> None:
    off = ~buf.mask
    assert (buf.depth[off] == 0).all()
    assert (buf.normals[off] == 0).all()
    assert (buf.attributes[off] == 0).all()
    assert (buf.barycentrics[off] == 0).all()
    assert (buf.triangle_id[off] == -1).all()


def coverage_count(vertices: torch.Tensor, faces: torch.Tensor, cam: Camera) -> torch.Tensor:
    """How many triangles cover each pixel, drawing one triangle at a time."""
    count = torch.zeros(cam.height, cam.width, dtype=torch.int32)
    for f in faces:
        count += rasterize(vertices, f[None], cam, backend="cpu").mask.int()
    return count


# ----------------------------------------------------------------------------------------
# Planes


def plane_quad(x0: float, x1: float, y0: float, y1: float, z: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis-aligned rectangle at depth z, wound so that its normal faces the camera (-z)."""
    v = torch.tensor([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=torch.float32)
    return v, torch.tensor([[0, 3, 1], [1, 3, 2]])


def test_plane_depth_normals_and_coverage():
    cam = pinhole(64, 48, focal=50.0, cx=31.3, cy=23.6)
    v, f = plane_quad(-0.5, 0.7, -0.3, 0.4, z=2.0)
    attrs = torch.arange(12, dtype=torch.float32).reshape(4, 3) + 1
    buf = rasterize(v, f, cam, attributes=attrs, backend="cpu")

    uv = cam.project(v.double().numpy())
    j, i = np.meshgrid(np.arange(64), np.arange(48))
    expected = (j > uv[:, 0].min()) & (j < uv[:, 0].max()) & (i > uv[:, 1].min()) & (i < uv[:, 1].max())
    assert expected.sum() > 500
    np.testing.assert_array_equal(buf.mask.numpy(), expected)
    m = buf.mask
    assert (buf.depth[m] == 2.0).all()
    assert (buf.normals[m] == torch.tensor([0.0, 0.0, -1.0])).all()
    assert set(buf.triangle_id[m].unique().tolist()) == {0, 1}
    assert torch.allclose(buf.barycentrics[m].sum(-1), torch.ones(int(m.sum())), atol=1e-6)
    assert_empty_outside(buf)


def test_tilted_plane_depth_is_ray_plane_intersection():
    # A plane seen obliquely: depth varies across the image, so perspective matters.
    eye = np.array([0.8, -0.5, -3.0])
    cam = pinhole(80, 60, focal=70.0, world_to_cam=look_at(eye, np.zeros(3)))
    v, f = plane_quad(-1.0, 1.0, -1.0, 1.0, z=0.0)
    buf = rasterize(v, f, cam, backend="cpu")
    m = buf.mask.numpy()
    assert m.sum() > 1000
    # Plane z=0 in camera space: n . X = d.
    R, t = cam.world_to_cam[:3, :3], cam.world_to_cam[:3, 3]
    n_cam, d = R @ np.array([0.0, 0.0, 1.0]), (R @ np.array([0.0, 0.0, 1.0])) @ t
    rays = pixel_rays(cam)
    depth = d / (rays @ n_cam)
    np.testing.assert_allclose(buf.depth.numpy()[m], depth[m], rtol=2e-6)
    # The quad's normal (0, 0, -1) in world space, rotated into the camera frame.
    np.testing.assert_allclose(buf.normals.numpy()[m], np.broadcast_to(-n_cam, (m.sum(), 3)), atol=1e-6)


# ----------------------------------------------------------------------------------------
# Sphere


def test_sphere_depth_normals_and_silhouette():
    center, radius = np.array([0.1, -0.05, 4.0]), 1.0
    n_lat, n_lon = 64, 128
    v, f = uv_sphere(n_lat, n_lon, radius, center)
    cam = pinhole(112, 96, focal=160.0)
    buf = rasterize(v, f, cam, attributes=v, backend="cpu")
    m = buf.mask.numpy()

    # The inscribed mesh lies between the sphere and the ball of radius r - sag, where
    # sag comes from the largest angular circumradius of a face (half its diagonal).
    rho = 0.5 * math.hypot(math.pi / n_lat, 2 * math.pi / n_lon)
    inner = radius * math.cos(rho)
    rays = pixel_rays(cam)

    def first_hit(r: float) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, depth) of each pixel ray against the sphere of radius r around center."""
        a, b = (rays * rays).sum(-1), rays @ center
        disc = b * b - a * (center @ center - r * r)
        return disc > 0, (b - np.sqrt(np.maximum(disc, 0))) / a * rays[..., 2]

    outer_hit, depth = first_hit(radius)
    inner_hit, inner_depth = first_hit(inner)
    assert inner_hit.sum() > 4000
    assert not (m & ~outer_hit).any()  # the mesh never sticks out of the sphere
    assert not (inner_hit & ~m).any()  # ... and never misses the inner ball
    err = buf.depth.numpy().astype(np.float64) - depth
    assert (err[m] >= -1e-5).all()
    assert (err[inner_hit] <= inner_depth[inner_hit] - depth[inner_hit] + 1e-5).all()

    hit = rays[inner_hit] * (depth[inner_hit] / rays[inner_hit][:, 2])[:, None]
    n_true = (hit - center) / radius
    cos = (buf.normals.numpy()[inner_hit].astype(np.float64) * n_true).sum(-1)
    assert np.median(cos) > 1 - 1e-6
    assert cos.min() > 1 - 2e-4
    np.testing.assert_allclose(np.linalg.norm(buf.normals.numpy()[m], axis=-1), 1.0, atol=1e-5)
    # The attribute is the vertex position: interpolating it gives the hit point on the mesh.
    np.testing.assert_allclose(buf.attributes.numpy()[m][:, 2], buf.depth.numpy()[m], atol=1e-5)
    assert_empty_outside(buf)


# ----------------------------------------------------------------------------------------
# Single triangles


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_triangle_coverage_barycentrics_and_attributes(seed):
    rng = np.random.default_rng(seed)
    cam = pinhole(72, 56, focal=60.0, cx=35.2, cy=27.9, skew=0.7 * seed)
    # Vertices at different depths; the triangle covers a good part of the image.
    pix = rng.uniform([4, 4], [68, 52], size=(3, 2))
    z = rng.uniform(1.5, 4.0, size=3)
    X = np.linalg.solve(cam.K, np.concatenate([pix, np.ones((3, 1))], 1).T).T * z[:, None]
    v = torch.tensor(X, dtype=torch.float32)
    Xf = v.double().numpy()
    M = rng.normal(size=(3, 4))
    c = rng.normal(size=4)
    attrs = torch.tensor(Xf @ M + c, dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2]] if seed % 2 == 0 else [[0, 2, 1]])
    buf = rasterize(v, faces, cam, attributes=attrs, backend="cpu")

    # Independent point-in-triangle test on the projected (float32-rounded) vertices.
    p = cam.project(Xf)
    j, i = np.meshgrid(np.arange(72, dtype=np.float64), np.arange(56, dtype=np.float64))
    q = np.stack([j, i], -1)
    e = np.stack([cross2(p[(k + 2) % 3] - p[(k + 1) % 3], q - p[(k + 1) % 3]) for k in range(3)], -1)
    e *= np.sign(cross2(p[1] - p[0], p[2] - p[0]))
    inside = (e > 0).all(-1)
    ambiguous = (np.abs(e) < 1e-3).any(-1)
    assert inside.sum() > 200 and ambiguous.sum() < 5
    np.testing.assert_array_equal(buf.mask.numpy()[~ambiguous], inside[~ambiguous])
    m = buf.mask.numpy()
    assert (buf.triangle_id.numpy()[m] == 0).all()

    # Barycentrics are weights of the 3-D hit point: it must project onto the pixel centre.
    bary = buf.barycentrics.numpy()[m].astype(np.float64)
    order = faces[0].numpy()
    hit = bary @ Xf[order]
    np.testing.assert_allclose(cam.K[:2] @ (hit / hit[:, 2:]).T, q[m].T, atol=2e-3)
    # ... and lie on the pixel's ray at the triangle plane (independent ray-plane intersection).
    n = np.cross(Xf[1] - Xf[0], Xf[2] - Xf[0])
    rays = pixel_rays(cam)[m]
    t = (n @ Xf[0]) / (rays @ n)
    exact = rays * t[:, None]
    np.testing.assert_allclose(buf.depth.numpy()[m], exact[:, 2], rtol=1e-5)
    # Perspective-correct interpolation of an attribute linear in world space.
    np.testing.assert_allclose(buf.attributes.numpy()[m], exact @ M + c, rtol=1e-4, atol=1e-4)
    assert_empty_outside(buf)


def test_barycentrics_follow_face_vertex_order():
    cam = pinhole(32, 32, focal=30.0)
    v = torch.tensor([[-0.5, -0.5, 2.0], [0.6, -0.4, 2.5], [0.0, 0.6, 3.0]])
    a = rasterize(v, torch.tensor([[0, 1, 2]]), cam, backend="cpu")
    b = rasterize(v, torch.tensor([[1, 2, 0]]), cam, backend="cpu")
    assert torch.equal(a.mask, b.mask)
    assert torch.allclose(a.barycentrics[a.mask], b.barycentrics[b.mask][:, [2, 0, 1]], atol=1e-6)


# ----------------------------------------------------------------------------------------
# Occlusion, near plane, culling


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins_whatever_the_order(near_first):
    cam = pinhole(40, 40, focal=40.0)
    near = [[-0.6, -0.5, 2.0], [0.5, -0.6, 2.0], [0.0, 0.7, 2.0]]
    far = [[-0.7, 0.6, 3.0], [0.0, -0.9, 3.0], [0.8, 0.6, 3.0]]
    tris = [near, far] if near_first else [far, near]
    v = torch.tensor(tris, dtype=torch.float32).reshape(6, 3)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    label = torch.tensor([[1.0]] * 3 + [[2.0]] * 3) if near_first else torch.tensor([[2.0]] * 3 + [[1.0]] * 3)
    buf = rasterize(v, faces, cam, attributes=label, backend="cpu")
    near_id = 0 if near_first else 1
    alone = [rasterize(v, faces[k:k + 1], cam, backend="cpu").mask for k in range(2)]
    both = alone[0] & alone[1]
    assert both.sum() > 100
    assert (buf.triangle_id[both] == near_id).all()
    assert (buf.depth[both] == 2.0).all()
    assert (buf.attributes[both] == 1.0).all()
    assert torch.equal(buf.mask, alone[0] | alone[1])


def test_intersecting_triangles_split_at_the_intersection():
    # Two triangles crossing each other: each wins where it is nearer.
    cam = pinhole(48, 48, focal=40.0)
    v = torch.tensor([[-1, -1, 2.0], [1, -1, 4.0], [0, 1, 3.0],
                      [-1, -1, 4.0], [1, -1, 2.0], [0, 1, 3.0]])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    buf = rasterize(v, faces, cam, backend="cpu")
    a, b = (rasterize(v, faces[k:k + 1], cam, backend="cpu") for k in range(2))
    both = a.mask & b.mask
    nearer = torch.where(a.depth <= b.depth, 0, 1).int()
    clear = both & ((a.depth - b.depth).abs() > 1e-4)
    assert clear.sum() > 200 and (nearer[clear] == 0).any() and (nearer[clear] == 1).any()
    assert torch.equal(buf.triangle_id[clear], nearer[clear])
    assert torch.equal(buf.depth[both], torch.minimum(a.depth, b.depth)[both])


def test_triangles_crossing_the_near_plane_are_dropped():
    cam = pinhole(32, 32, focal=30.0)
    v = torch.tensor([[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0],
                      [-0.5, -0.5, 1.0], [0.5, -0.5, 0.005], [0.0, 0.5, 1.0]])
    buf = rasterize(v, torch.tensor([[3, 4, 5], [0, 1, 2]]), cam, backend="cpu")
    assert buf.mask.any()
    assert set(buf.triangle_id[buf.mask].unique().tolist()) == {1}
    behind = rasterize(v * torch.tensor([1.0, 1.0, -1.0]), torch.tensor([[0, 1, 2]]), cam, backend="cpu")
    assert not behind.mask.any()


def test_no_backface_culling_and_winding_only_flips_normals():
    v, f = uv_sphere(24, 48, 1.0, (0.0, 0.0, 4.0))
    cam = pinhole(48, 48, focal=50.0)
    a = rasterize(v, f, cam, backend="cpu")
    b = rasterize(v, f[:, [0, 2, 1]], cam, backend="cpu")
    assert torch.equal(a.mask, b.mask) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.triangle_id, b.triangle_id)
    assert torch.allclose(a.normals, -b.normals, atol=1e-6)
    # From inside the sphere only back faces are visible, and they are drawn.
    inside = rasterize(v, f, pinhole(48, 48, focal=20.0, world_to_cam=_translate(0, 0, -4.0)), backend="cpu")
    assert inside.mask.all()
    assert (inside.normals[..., 2] > 0).all()  # outward normals point away from a camera inside


def _translate(x: float, y: float, z: float) -> np.ndarray:
    M = np.eye(4)
    M[:3, 3] = (x, y, z)
    return M


# ----------------------------------------------------------------------------------------
# Watertightness


def grid_mesh(nx: int, ny: int, x0: float, y0: float, step: float, jitter: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Quads split into triangles on the plane z = 1; interior vertices jittered."""
    xs, ys = np.meshgrid(x0 + step * np.arange(nx + 1), y0 + step * np.arange(ny + 1))
    pts = np.stack([xs, ys], -1).astype(np.float64)
    pts[1:-1, 1:-1] += rng.uniform(-jitter, jitter, size=pts[1:-1, 1:-1].shape)
    idx = np.arange((nx + 1) * (ny + 1)).reshape(ny + 1, nx + 1)
    faces = []
    for r in range(ny):
        for c in range(nx):
            a, b, d, e = idx[r, c], idx[r, c + 1], idx[r + 1, c], idx[r + 1, c + 1]
            faces += [[a, b, e], [a, e, d]] if (r + c) % 2 else [[a, b, d], [b, e, d]]
    v = np.concatenate([pts.reshape(-1, 2), np.ones(((nx + 1) * (ny + 1), 1))], 1)
    return v, np.array(faces)


@pytest.mark.parametrize("jitter,soup", [(0.0, False), (0.0, True), (1.3, False), (1.3, True)])
def test_grid_has_no_holes_and_no_double_coverage(jitter, soup):
    # focal 1, principal point 0, z = 1: world x, y are pixel coordinates, so with no
    # jitter every vertex sits on a pixel centre and every edge runs through centres.
    rng = np.random.default_rng(7)
    cam = pinhole(40, 36, focal=1.0, cx=0.0, cy=0.0)
    v, f = grid_mesh(6, 5, x0=3.0, y0=4.0, step=5.0, jitter=jitter, rng=rng)
    flip = rng.random(len(f)) < 0.5  # mixed winding must not matter
    f[flip] = f[flip][:, [0, 2, 1]]
    if soup:  # every triangle with its own vertex copies
        v, f = v[f.reshape(-1)], np.arange(3 * len(f)).reshape(-1, 3)
    vt, ft = torch.tensor(v, dtype=torch.float32), torch.tensor(f)
    count = coverage_count(vt, ft, cam).numpy()
    j, i = np.meshgrid(np.arange(40), np.arange(36))
    interior = (j > 3) & (j < 33) & (i > 4) & (i < 29)
    exterior = (j < 3) | (j > 33) | (i < 4) | (i > 29)
    assert count.max() == 1, f"{(count > 1).sum()} pixels covered twice"
    assert (count[interior] == 1).all(), f"{(count[interior] == 0).sum()} holes"
    assert (count[exterior] == 0).all()
    whole = rasterize(vt, ft, cam, backend="cpu")
    np.testing.assert_array_equal(whole.mask.numpy(), count == 1)


def test_closed_fan_around_a_pixel_centre_covers_it_once():
    # Eight triangles around a vertex lying exactly on pixel centre (10, 10).
    cam = pinhole(21, 21, focal=1.0, cx=0.0, cy=0.0)
    ang = np.arange(8) * np.pi / 4 + 0.3
    ring = np.stack([10 + 6 * np.cos(ang), 10 + 6 * np.sin(ang)], 1)
    v = np.concatenate([[[10.0, 10.0]], ring])
    v = torch.tensor(np.concatenate([v, np.ones((9, 1))], 1), dtype=torch.float32)
    f = torch.tensor([[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)])
    count = coverage_count(v, f, cam)
    assert count[10, 10] == 1
    assert count.max() == 1


def brute_force(vertices: np.ndarray, faces: np.ndarray, cam: Camera, near: float = 0.01):
    """Every (pixel, triangle) pair in float64 numpy: nearest covering face and its depth."""
    X = to_cam(cam, vertices)
    p = cam.project(vertices)
    j, i = np.meshgrid(np.arange(cam.width, dtype=np.float64), np.arange(cam.height, dtype=np.float64))
    q = np.stack([j, i], -1)[:, :, None, :]  # (H, W, 1, 2)
    a, b, c = (p[faces[:, k]] for k in range(3))  # (F, 2)
    e = np.stack([cross2(c - b, q - b), cross2(a - c, q - c), cross2(b - a, q - a)], -1)  # (H, W, F, 3)
    area = cross2(b - a, c - a)
    bary = e / area[:, None]
    inside = (bary > 0).all(-1) & (X[faces, 2] >= near).all(1)
    depth = 1.0 / (bary / X[faces, 2]).sum(-1)
    depth = np.where(inside, depth, np.inf)
    best = depth.argmin(-1)
    hit = np.isfinite(depth.min(-1))
    margin = (np.abs(bary) * np.abs(area)[:, None]).min(-1)  # distance-like: small near an edge
    ambiguous = (margin < 1e-6).any(-1)
    return hit, np.where(hit, best, -1), np.where(hit, depth.min(-1), 0.0), ambiguous


@pytest.mark.parametrize("seed", [3, 4])
def test_random_triangle_soup_matches_brute_force(seed):
    # Big and small, overlapping, interpenetrating, mixed winding, some crossing the near
    # plane: exercises stencil classes, tiles and the depth test against a reference.
    rng = np.random.default_rng(seed)
    cam = pinhole(64, 48, focal=50.0)
    n = 120
    centre = np.concatenate([rng.uniform(-1.5, 1.5, (n, 2)), rng.uniform(0.5, 5.0, (n, 1))], 1)
    scale = np.exp(rng.uniform(np.log(0.02), np.log(2.0), (n, 1, 1)))
    v = (centre[:, None, :] + scale * rng.normal(size=(n, 3, 3))).reshape(-1, 3)
    f = np.arange(3 * n).reshape(n, 3)
    vt = torch.tensor(v, dtype=torch.float32)
    buf = rasterize(vt, torch.tensor(f), cam, backend="cpu")
    hit, tid, depth, ambiguous = brute_force(vt.double().numpy(), f, cam)
    ok = ~ambiguous
    assert hit.sum() > 1000 and ambiguous.sum() < 10
    crosses_near = (v.reshape(n, 3, 3)[:, :, 2] < 0.01).any(1)
    assert crosses_near.any()  # some faces must be dropped
    np.testing.assert_array_equal(buf.mask.numpy()[ok], hit[ok])
    np.testing.assert_array_equal(buf.triangle_id.numpy()[ok], tid[ok])
    np.testing.assert_allclose(buf.depth.numpy()[ok], depth[ok], rtol=1e-6)
    assert not crosses_near[buf.triangle_id[buf.mask].numpy()].any()


# ----------------------------------------------------------------------------------------
# Empty output, dispatch


def test_nothing_visible_gives_empty_buffers():
    cam = pinhole(16, 12, focal=10.0)
    v, f = plane_quad(5.0, 6.0, 5.0, 6.0, z=2.0)  # off screen
    buf = rasterize(v, f, cam, attributes=torch.ones(4, 5), backend="cpu")
    assert buf.mask.shape == (12, 16) and not buf.mask.any()
    assert buf.attributes.shape == (12, 16, 5)
    assert_empty_outside(buf)
    none = rasterize(v, torch.zeros(0, 3, dtype=torch.int64), cam, backend="cpu")
    assert not none.mask.any() and none.attributes.shape == (12, 16, 0)
    nan = rasterize(torch.full((4, 3), float("nan")), f, cam, backend="cpu")
    assert not nan.mask.any()


def test_output_contract():
    cam = pinhole(20, 10, focal=10.0)
    v, f = plane_quad(-0.5, 0.5, -0.5, 0.5, z=2.0)
    buf = rasterize(v, f.int(), cam, backend="cpu")
    assert buf.mask.dtype == torch.bool and buf.mask.shape == (10, 20)
    assert buf.depth.dtype == torch.float32 and buf.depth.shape == (10, 20)
    assert buf.normals.shape == (10, 20, 3) and buf.barycentrics.shape == (10, 20, 3)
    assert buf.attributes.shape == (10, 20, 0)
    assert buf.triangle_id.dtype == torch.int32
    for name in ("depth", "normals", "barycentrics"):
        assert getattr(buf, name).dtype == torch.float32
        assert getattr(buf, name).is_contiguous()


def test_vertex_normals_are_area_weighted():
    # A big face with normal +z and a small one with normal +x share vertex 0.
    v = torch.tensor([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(v, f)
    # Face normals (0, 0, 16) and (1, 0, 0): each cross product is twice the face area.
    assert torch.allclose(n[0], torch.tensor([1.0, 0.0, 16.0]) / math.sqrt(257.0), atol=1e-6)
    assert torch.allclose(n[1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(n.norm(dim=1), torch.ones(5))


def test_dispatch_and_errors():
    cam = pinhole(8, 8, focal=8.0)
    v, f = plane_quad(-0.5, 0.5, -0.5, 0.5, z=2.0)
    with pytest.raises(ValueError, match="backend"):
        rasterize(v, f, cam, backend="opengl")
    with pytest.raises(ValueError, match="face indices"):
        rasterize(v, f + 10, cam, backend="cpu")
    with pytest.raises(ValueError, match="attributes"):
        rasterize(v, f, cam, attributes=torch.ones(3, 2), backend="cpu")
    assert "cpu" in available_backends()
    if not torch.cuda.is_available():
        assert available_backends() == ["cpu"]
        with pytest.raises(RuntimeError, match="CUDA"):
            rasterize(v, f, cam, backend="nvdiffrast")
        auto = rasterize(v, f, cam)
        assert torch.equal(auto.mask, rasterize(v, f, cam, backend="cpu").mask)


# ----------------------------------------------------------------------------------------
# Backend agreement (needs CUDA)


def bumpy_head(n_lat: int = 90, n_lon: int = 180) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-convex closed surface (sphere with bumps), so occlusion inside the mesh matters."""
    v, f = uv_sphere(n_lat, n_lon, 1.0, (0.0, 0.0, 0.0))
    d = v.double()
    r = 1 + 0.15 * torch.sin(5 * d[:, 0]) * torch.cos(4 * d[:, 1]) + 0.1 * torch.sin(7 * d[:, 2])
    return (d * r[:, None]).float(), f


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", [(256, 256), (250, 190)])
def test_cpu_and_nvdiffrast_agree(size):
    W, H = size
    v, f = bumpy_head()
    attrs = torch.cat([v, v.norm(dim=1, keepdim=True)], 1)
    for eye in ([0.3, -0.2, -3.2], [2.5, 0.5, -1.5], [-0.5, 2.8, 0.7]):
        cam = pinhole(W, H, focal=0.9 * W, world_to_cam=look_at(np.array(eye), np.zeros(3)))
        a = rasterize(v, f, cam, attributes=attrs, backend="cpu")
        b = rasterize(v.cuda(), f.cuda(), cam, attributes=attrs.cuda(), backend="nvdiffrast").to("cpu")
        # Coverage differs only for pixel centres within nvdiffrast's 1/16-pixel vertex
        # snapping of an edge: a thin band along the silhouette.
        assert (a.mask == b.mask).float().mean() > 0.995
        # Where both cover a pixel, the interpolated surface is the same (C0 across edges,
        # so picking the neighbouring triangle changes little); only pixels on an
        # occlusion boundary may see different surfaces.
        px = a.mask & b.mask
        assert ((a.depth[px] - b.depth[px]).abs() <= 1e-4 * a.depth[px]).float().mean() > 0.995
        assert ((a.normals[px] - b.normals[px]).abs().amax(-1) <= 1e-2).float().mean() > 0.995
        assert ((a.attributes[px] - b.attributes[px]).abs().amax(-1) <= 1e-2).float().mean() > 0.995
        # Same face: same perspective-correct barycentrics and values (float32 on the GPU).
        same = px & (a.triangle_id == b.triangle_id)
        assert same.sum() > 0.8 * px.sum()
        assert torch.allclose(a.barycentrics[same], b.barycentrics[same], atol=1e-3)
        assert torch.allclose(a.depth[same], b.depth[same], rtol=1e-5)
        assert torch.allclose(a.normals[same], b.normals[same], atol=1e-3)
        assert torch.allclose(a.attributes[same], b.attributes[same], atol=1e-3)
    on_gpu = rasterize(v.cuda(), f.cuda(), cam, backend="nvdiffrast")
    assert on_gpu.mask.device.type == "cuda"
    auto = rasterize(v, f, cam)
    assert auto.mask.device.type == "cpu"


def test_nvdiffrast_inputs_are_prepared_without_compaction():
    """The GPU backend's preparation (no CUDA needed): a face crossing the near plane is pointed
    at an extra vertex outside the frustum instead of being compacted away (that would need a
    host sync), the far plane is just beyond the farthest kept vertex, and clip space projects
    pixel centres where OpenCV does."""
    from shards.raster.nvdiff import prepare

    cam = pinhole(32, 24, focal=30.0)
    v = torch.tensor([[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 3.0],
                      [-0.5, -0.5, 1.0], [0.5, -0.5, 0.005], [0.0, 0.5, 9.0]])
    attrs = torch.arange(12, dtype=torch.float32).view(6, 2)
    pos, tri, attr = prepare(v, torch.tensor([[3, 4, 5], [0, 1, 2]]), cam, attrs)
    assert pos.shape == (1, 7, 4) and tri.dtype == torch.int32 and attr.shape == (1, 7, 1 + 3 + 2)
    assert tri.tolist() == [[6, 6, 6], [0, 1, 2]]
    outside = pos[0, 6, :3] / pos[0, 6, 3]
    assert (outside.abs() > 1).all()
    ndc = pos[0, :3, :3] / pos[0, :3, 3:]
    uv = v[:3].double() @ torch.tensor(cam.K).T
    uv = uv[:, :2] / uv[:, 2:]
    torch.testing.assert_close(ndc[:, 0].double(), (2 * uv[:, 0] + 1) / cam.width - 1, atol=1e-6, rtol=0)
    torch.testing.assert_close(ndc[:, 1].double(), (2 * uv[:, 1] + 1) / cam.height - 1, atol=1e-6, rtol=0)
    # far = 1.5 x the farthest vertex of a kept face (3.0; vertex 5 at 9.0 belongs to the dropped face)
    far_edge = torch.tensor([0.0, 0.0, 4.5, 1.0], dtype=torch.float64)
    z = (pos[0, 2, 2] / pos[0, 2, 3]).item()
    assert -1 < z < 1
    torch.testing.assert_close(attr[0, :6, 0], v[:, 2])  # camera z (identity camera)
    torch.testing.assert_close(attr[0, :6, 4:], attrs)
    assert (attr[0, 6] == 0).all()
    from shards.raster.nvdiff import clip_matrix

    P = clip_matrix(torch.tensor(cam.K), cam.width, cam.height, 0.01, torch.tensor(4.5, dtype=torch.float64))
    edge = P @ far_edge
    assert abs(edge[2] / edge[3] - 1.0) < 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvdiffrast_input_checks_do_not_sync():
    from shards.raster import check_face_indices
    from shards.raster.nvdiff import prepare

    v, f = bumpy_head(30, 60)
    cam = pinhole(64, 64, focal=60.0, world_to_cam=look_at(np.array([0.3, -0.2, -3.2]), np.zeros(3)))
    v, f = v.cuda(), f.cuda()
    prepare(v, f, cam, v)  # warm-up: pinned memory pool, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_face_indices(f, len(v))
        prepare(v, f, cam, v)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_nvdiffrast_clip_space_puts_pixel_centres_where_opencv_does():
    # Pure math (no GPU): nvdiffrast samples column j at NDC x = (2j + 1) / W - 1 and
    # row i at NDC y = (2i + 1) / H - 1, so the clip matrix must map (u, v) to those.
    from shards.raster.nvdiff import clip_matrix

    cam = pinhole(250, 190, focal=210.0, cx=121.7, cy=97.2, skew=0.4)
    near, far = 0.01, 9.0
    P = clip_matrix(torch.tensor(cam.K), cam.width, cam.height, near, far).numpy()
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.uniform(-1, 1, (50, 2)), rng.uniform(0.5, 8.0, (50, 1))], 1)
    clip = np.concatenate([X, np.ones((50, 1))], 1) @ P.T
    ndc = clip[:, :3] / clip[:, 3:]
    uv = X @ cam.K.T
    uv = uv[:, :2] / uv[:, 2:]
    np.testing.assert_allclose(ndc[:, 0], (2 * uv[:, 0] + 1) / cam.width - 1, atol=1e-12)
    np.testing.assert_allclose(ndc[:, 1], (2 * uv[:, 1] + 1) / cam.height - 1, atol=1e-12)
    np.testing.assert_allclose(clip[:, 3], X[:, 2])
    assert (np.abs(ndc[:, 2]) < 1).all()
    edge = np.array([[0, 0, near, 1.0], [0, 0, far, 1.0]]) @ P.T
    np.testing.assert_allclose(edge[:, 2] / edge[:, 3], [-1.0, 1.0], atol=1e-12)
