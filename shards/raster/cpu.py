"""The CPU rasterizer: the backend that runs where there is no GPU.

The synthetic data generator and the shards stage render ~1500 images per person with
it, 16 cameras of the same mesh at a time, so `rasterize_cpu_views` takes all cameras
of one mesh and does the camera-independent work (smooth vertex normals, face and
attribute layouts, scratch arrays) once:

1. Per camera, in torch (float64): camera coordinates and projection of the vertices,
   and the vertex normals rotated into the camera frame.
2. Triangle set-up (`cpu_kernels.setup_triangles`): near-plane test, bounding boxes,
   canonical edges, 1/z planes; stencil classes and their folding (`fold_classes`).
3. Coverage and depth test (`cpu_kernels.depth_test`): one int64 z-buffer entry per
   pixel holding (nearness, face) of the nearest face.
4. Shading (`cpu_kernels.shade`): float64 perspective-correct barycentrics and depth
   of the winning face per covered pixel, normals and attributes interpolated with them.

Steps 2-4 are compiled loops (numba): at 128 x 128 the synthetic heads have about one
pixel per triangle, where tensor ops spend their time on per-op overhead and temporaries.

Coverage rule (watertight): a pixel centre is inside a triangle when every edge
function is positive, or zero on an edge that the triangle "owns". Each edge is
evaluated from its endpoints in a canonical order (lexicographically smaller
projected (u, v) first), so the two triangles sharing an edge compute bit-identical
values of opposite orientation whatever the winding or vertex indices. A zero goes
to the triangle on the positive side of the canonically directed edge: exactly one
of two neighbours, and exactly one triangle of a closed fan around a vertex that
sits on a pixel centre. So no holes and no pixel counted twice, even with mixed
winding or duplicated vertices.

Candidates: each triangle's pixel bounding box is covered by a stencil of `sx * sy`
pixels (sides from STENCIL_SIDES; boxes larger than TILE are cut into tiles). The
stencils, their tiles and the folding of rare stencil classes into larger ones are
those of the torch implementation this replaced (a folded stencil tests a few more
pixels outside the box), so that even a degenerate sliver's float32 edge test sees
the same candidates: the output is bit-identical to it (`tests/shards/test_raster_kernels.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..contract import Camera
from . import cpu_kernels as kernels
from .buffers import RasterBuffers
from .common import NEAR, camera_tensors, normals_to_camera, unit_planar, vertex_normals_planar

TILE = kernels.TILE
#: Stencil sides: a box side n gets the smallest of these >= n (at most 1.5x waste).
STENCIL_SIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
#: A stencil class is folded into a larger populated one when that costs fewer extra
#: candidates than this (kept from the torch implementation, where one more class cost
#: ~75 tensor ops: the candidates, and so the output of slivers, depend on it).
MERGE_BUDGET = 1 << 15
#: Covered pixels renormalised at once (the torch implementation's shading chunk).
SHADE_CHUNK = 1 << 15
_NO_ATTRIBUTES = np.zeros((0, 0), np.float32)
_SIDE_TABLE = np.array([min(s for s in STENCIL_SIDES if s >= m) for m in range(TILE + 1)], np.int64)


def fold_classes(class_count: np.ndarray) -> np.ndarray:
    """Table class -> class it is tested as (class = w * (TILE + 1) + h; identity when not folded).

    Small classes go first; each is folded into the populated class with w' >= w and
    h' >= h that adds the fewest candidates, if that is within MERGE_BUDGET.
    """
    keys = np.flatnonzero(class_count).tolist()
    size = {k: divmod(k, TILE + 1) for k in keys}
    count = dict(zip(keys, class_count[keys].tolist()))
    target = {k: k for k in count}
    for k in sorted(count, key=count.get):
        w, h = size[k]
        best = None
        for k2, c2 in count.items():
            w2, h2 = size[k2]
            if k2 != k and c2 > 0 and w2 >= w and h2 >= h:
                extra = count[k] * (w2 * h2 - w * h)
                if extra <= MERGE_BUDGET and (best is None or extra < best[0]):
                    best = (extra, k2)
        if best is not None:
            count[best[1]] += count[k]
            count[k] = 0
            target[k] = best[1]
    table = np.arange((TILE + 1) ** 2, dtype=np.int64)
    for k in target:  # follow chains a -> b -> c
        t = target[k]
        while target[t] != t:
            t = target[t]
        table[k] = t
    return table


class _Scratch:
    """Per-triangle arrays of the set-up, allocated once for all cameras of a mesh."""

    def __init__(self, faces: int):
        self.ints = np.empty((faces, 6), np.int64)
        self.floats = np.empty((faces, 17), np.float32)
        self.owns = np.empty((faces, 3), np.bool_)
        self.class_count = np.zeros((TILE + 1) ** 2, np.int64)


def _rasterize_view(v64_t: torch.Tensor, faces: np.ndarray, world_normals: torch.Tensor,
                    attributes: np.ndarray | None, camera: Camera, near: float, scratch: _Scratch) -> RasterBuffers:
    H, W = camera.height, camera.width
    out = RasterBuffers.empty(H, W, 0 if attributes is None else attributes.shape[1], "cpu")
    K, R, t = camera_tensors(camera, "cpu")
    cam = (R @ v64_t).add_(t.unsqueeze(1))  # (3, V) camera coordinates
    uvw = K @ cam
    u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
    z = cam[2].contiguous()
    s = scratch
    s.class_count[:] = 0
    n = kernels.setup_triangles(u.float().numpy(), v.float().numpy(), (1.0 / z).numpy(), z.numpy(), faces, near,
                                W, H, _SIDE_TABLE, s.ints, s.floats, s.owns, s.class_count)
    if n == 0:
        return out
    zbuf = np.full(H * W, kernels.EMPTY, np.int64)
    kernels.depth_test(n, s.ints, s.floats, s.owns, _SIDE_TABLE, fold_classes(s.class_count), zbuf, W, H)
    normals = normals_to_camera(world_normals, camera).numpy()
    C = out.attributes.shape[-1]
    covered = np.empty(H * W, np.int64)
    raw = torch.empty(3, H * W)
    count = kernels.shade(zbuf, faces, u.numpy(), v.numpy(), z.numpy(), normals,
                          _NO_ATTRIBUTES if attributes is None else attributes,
                          out.mask.view(-1).numpy(), out.depth.view(-1).numpy(), out.triangle_id.view(-1).numpy(),
                          out.barycentrics.view(-1, 3).numpy(), covered, raw.numpy(),
                          out.attributes.view(H * W, C).numpy(), W)
    # Renormalised by torch, in the torch implementation's chunks: torch's float32 sqrt is not
    # always the correctly rounded one (~1 pixel in 3 differs by an ulp from numpy's or the
    # compiled loop's, measured with torch 2.14.1's AVX512 kernels); the same chunks keep even a
    # build whose vectorised and scalar-tail paths differ identical.
    for c in range(0, count, SHADE_CHUNK):
        e = min(c + SHADE_CHUNK, count)
        out.normals.view(-1, 3).numpy()[covered[c:e]] = unit_planar(raw[:, c:e]).numpy().T
    return out


def rasterize_cpu_views(vertices: torch.Tensor, faces: torch.Tensor, cameras: Sequence[Camera],
                        attributes: torch.Tensor | None = None, near: float = NEAR) -> list[RasterBuffers]:
    """Rasterize one mesh for several cameras (buffers on the inputs' device, computed on the CPU).

    The same buffers as one `rasterize_cpu` call per camera, with the camera-independent
    work done once.
    """
    dev = vertices.device
    vertices = vertices.detach().cpu()
    faces = faces.detach().cpu()
    world_normals = vertex_normals_planar(vertices.T.to(torch.float32).contiguous(), faces.long().T.contiguous())
    faces_np = faces.long().contiguous().numpy()
    attr = None if attributes is None else attributes.detach().to("cpu", torch.float32).contiguous().numpy()
    v64_t = vertices.to(torch.float64).T
    scratch = _Scratch(len(faces_np))
    out = [_rasterize_view(v64_t, faces_np, world_normals, attr, cam, near, scratch) for cam in cameras]
    return out if dev.type == "cpu" else [b.to(dev) for b in out]


def rasterize_cpu(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
                  attributes: torch.Tensor | None = None, near: float = NEAR) -> RasterBuffers:
    """Rasterize with the CPU backend (buffers on the inputs' device)."""
    return rasterize_cpu_views(vertices, faces, [camera], attributes, near)[0]


def compile_kernels() -> None:
    """Compile the loops into numba's on-disk cache (setup.sh runs this at install), so that the
    worker processes of a fresh checkout load them (~0.4 s) instead of each compiling them (~2.5 s)."""
    K = np.array([[8.0, 0.0, 3.5], [0.0, 8.0, 3.5], [0.0, 0.0, 1.0]])
    camera = Camera("compile", K, np.eye(4), 8, 8)
    vertices = torch.tensor([[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]])
    rasterize_cpu(vertices, torch.tensor([[0, 1, 2]]), camera, attributes=vertices)
