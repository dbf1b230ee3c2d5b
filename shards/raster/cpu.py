"""Vectorised torch rasterizer: the backend that runs where there is no GPU.

The synthetic data generator renders thousands of frames with it, so there is no
per-triangle Python loop:

1. Project the vertices (float64), drop faces with a vertex nearer than `near`.
2. Coverage and depth test (`cpu_coverage`): one int64 z-buffer entry per pixel
   holding the nearest face.
3. Shading, per covered pixel only and in chunks of SHADE_CHUNK pixels: float64
   perspective-correct barycentrics and depth of the winning face, then normals
   and attributes interpolated with them, written into the channel-last buffers.

Tensors are kept 1-D or (C, N) channel-first internally: torch's CPU kernels are
several times slower on (N, 3)-shaped data (gathers, broadcasts, dim-0 reductions).
"""

from __future__ import annotations

import torch

from ..contract import Camera
from .buffers import RasterBuffers
from .common import (
    NEAR,
    camera_tensors,
    flat_nonzero,
    normals_to_camera,
    unit_planar,
    vertex_normals_planar,
    visible_faces,
)
from .cpu_coverage import EMPTY, MAX_CANDIDATES, TILE, depth_test, setup_triangles

#: Covered pixels shaded at once: keeps float64 temporaries small enough to be reused
#: from the heap instead of being fresh (page-faulting) memory on every call.
SHADE_CHUNK = 1 << 15
_LOW32 = 0xFFFFFFFF


def _shade(fw: list[torch.Tensor], pix: torch.Tensor, width: int, u: torch.Tensor, v: torch.Tensor,
           z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective-correct barycentrics (3, N) and depth (N,) at covered pixels, in float64.

    `fw` are the winning faces' vertex indices (3 x (N,)); `u`, `v`, `z` (V,) float64
    projected vertices and camera depth. With screen-space edge functions e_k
    (e_k / sum(e) are the screen barycentrics), the hit point's barycentrics are
    (e_k / z_k) / sum_j(e_j / z_j) and its depth is sum(e) / sum_j(e_j / z_j).
    """
    py = torch.div(pix, width, rounding_mode="floor")
    px = (pix - py * width).double()
    py = py.double()
    qu = [u.index_select(0, i) for i in fw]
    qv = [v.index_select(0, i) for i in fw]
    e = torch.empty(3, len(pix), dtype=torch.float64, device=pix.device)
    for k in range(3):  # edge function of the edge opposite vertex k
        a, b = (k + 1) % 3, (k + 2) % 3
        torch.sub((qu[b] - qu[a]).mul_(py - qv[a]), (qv[b] - qv[a]).mul_(px - qu[a]), out=e[k])
    w = torch.stack([e[k] / z.index_select(0, fw[k]) for k in range(3)])
    total = w[0] + w[1] + w[2]
    return w.div_(total), (e[0] + e[1] + e[2]).div_(total)


def _interpolate(values: torch.Tensor, fw: list[torch.Tensor], bary: torch.Tensor) -> torch.Tensor:
    """(C, N) per-pixel values from (C, V) per-vertex values, one channel at a time.

    Written as v0 + b1 (v1 - v0) + b2 (v2 - v0) so that a constant stays exactly constant.
    """
    out = torch.empty(values.shape[0], len(fw[0]), dtype=values.dtype, device=values.device)
    for c, ch in enumerate(values):
        v0 = ch.index_select(0, fw[0])
        o = (ch.index_select(0, fw[1]) - v0).mul_(bary[1])
        o += (ch.index_select(0, fw[2]) - v0).mul_(bary[2])
        torch.add(o, v0, out=out[c])
    return out


def _resolve(zbuf: torch.Tensor, height: int, width: int, row_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Covered pixel indices (row-major in H x W) and the winning face of each."""
    z = zbuf.view(-1, row_stride)[:height, :width].reshape(-1)
    pix = flat_nonzero(z != EMPTY)
    return pix, z.index_select(0, pix) & _LOW32


def _write(out: RasterBuffers, pix: torch.Tensor, face_id: torch.Tensor, depth: torch.Tensor,
           bary: torch.Tensor, normals: torch.Tensor, attributes: torch.Tensor | None) -> None:
    """Scatter per-pixel results ((C, N) channel-first) into the channel-last buffers."""
    out.mask.view(-1).index_fill_(0, pix, True)
    out.depth.view(-1).index_copy_(0, pix, depth.float())
    out.triangle_id.view(-1).index_copy_(0, pix, face_id.int())
    out.barycentrics.view(-1, 3).index_copy_(0, pix, bary.float().T)
    out.normals.view(-1, 3).index_copy_(0, pix, normals.T)
    if attributes is not None:
        out.attributes.view(-1, attributes.shape[0]).index_copy_(0, pix, attributes.T)


def rasterize_cpu(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
                  attributes: torch.Tensor | None = None, near: float = NEAR,
                  max_candidates: int = MAX_CANDIDATES) -> RasterBuffers:
    """Rasterize with the vectorised torch backend (any device; written for CPU)."""
    H, W = camera.height, camera.width
    dev = vertices.device
    out = RasterBuffers.empty(H, W, 0 if attributes is None else attributes.shape[1], dev)
    K, R, t = camera_tensors(camera, dev)
    cam = (R @ vertices.to(torch.float64).T).add_(t.unsqueeze(1))  # (3, V) camera coordinates
    keep = visible_faces(cam[2], faces, near)
    if len(keep) == 0:
        return out
    faces_t = faces.long().index_select(0, keep).T.contiguous()  # (3, F)
    uvw = K @ cam
    u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
    setup = setup_triangles(u.float(), v.float(), 1.0 / cam[2], faces_t, W, H)
    if len(setup.face) == 0:
        return out

    row_stride = W + TILE  # stencils may overhang the right/bottom border by < TILE
    zbuf = torch.full(((H + TILE) * row_stride,), EMPTY, dtype=torch.int64, device=dev)
    depth_test(setup, zbuf, row_stride, max_candidates)
    pix, winner = _resolve(zbuf, H, W, row_stride)

    world_n = vertex_normals_planar(vertices.T.to(torch.float32).contiguous(), faces.long().T.contiguous())
    normals = normals_to_camera(world_n, camera)
    attr = None if attributes is None else attributes.to(dev, torch.float32).T.contiguous()
    z = cam[2].contiguous()
    for c in range(0, len(pix), SHADE_CHUNK):  # bounded temporaries, reused between chunks
        p, win = pix[c:c + SHADE_CHUNK], winner[c:c + SHADE_CHUNK]
        fw = [faces_t[k].index_select(0, win) for k in range(3)]
        bary, depth = _shade(fw, p, W, u, v, z)
        b32 = bary.float()
        n = unit_planar(_interpolate(normals, fw, b32))
        a = None if attr is None else _interpolate(attr, fw, b32)
        _write(out, p, keep.index_select(0, win), depth, bary, n, a)
    return out
