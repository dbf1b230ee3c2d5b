"""The CPU rasterizer as it was before its compiled kernels (torch ops only), frozen as the reference
that `test_raster_kernels.py` compares the compiled backend with, bit for bit.

Copied unchanged from shards/raster/cpu.py + cpu_coverage.py at commit 1745134, with the two helpers of
shards/raster/common.py that only the old backend used (visible_faces, flat_nonzero; only the imports
joined); do not "improve" it: its value is that it is the old arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shards.contract import Camera
from shards.raster.buffers import RasterBuffers
from shards.raster.common import (
    NEAR,
    camera_tensors,
    normals_to_camera,
    unit_planar,
    vertex_normals_planar,
    visible_face_mask,
)


def visible_faces(cam_z: torch.Tensor, faces: torch.Tensor, near: float = NEAR) -> torch.Tensor:
    """Indices of faces whose three vertices all lie at camera z >= near."""
    return flat_nonzero(visible_face_mask(cam_z, faces, near))


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of a flattened bool tensor (int64).

    On CPU numpy's flatnonzero is 5-10x faster than torch.nonzero, and compaction is
    the single most expensive step of the CPU rasterizer.
    """
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
    return torch.nonzero(mask.reshape(-1)).squeeze(1)


#: Largest stencil side; bigger bounding boxes are split into TILE x TILE tiles.
TILE = 32
#: Stencil sides: a box side n gets the smallest of these >= n (at most 1.5x waste).
STENCIL_SIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
#: Upper bound on (triangle, pixel) candidates evaluated at once (memory bound).
MAX_CANDIDATES = 1 << 21
#: A stencil class is folded into a larger populated one when that costs fewer extra
#: candidates than this: one more chunk costs ~75 small tensor ops, which is worth
#: about this many candidate tests.
MERGE_BUDGET = 1 << 15
#: Bounding boxes grow by this much (pixels) so that float rounding at a box border
#: cannot exclude a pixel that the edge test would accept.
_BOX_MARGIN = 1.0 / 64.0
#: z-buffer value of a pixel no triangle covers.
EMPTY = torch.iinfo(torch.int64).max


@dataclass
class TriangleSetup:
    """Per-triangle data of the triangles that can cover a pixel, one column per triangle.

    Rows-by-triangles layout: a chunk gathers columns, and each coefficient row then
    broadcasts over a (stencil, triangles) candidate block along its long contiguous axis.
    (Small trailing dimensions such as (T, 2) are avoided: torch's CPU kernels are
    several times slower on them.)
    """

    face: torch.Tensor  # (T,) int64 index into the near-filtered face list
    x0: torch.Tensor  # (T,) int64 first candidate column
    y0: torch.Tensor  # (T,) int64 first candidate row
    nx: torch.Tensor  # (T,) int64 candidate columns
    ny: torch.Tensor  # (T,) int64 candidate rows
    edges: torch.Tensor  # (12, T) float32: ax, ay, bx - ax, by - ay (3 rows each, edges 0-2)
    owns: torch.Tensor  # (3, T) bool: the inside side is where the canonical edge function >= 0
    plane: torch.Tensor  # (5, T) float32: (u0, v0, 1/z0, d(1/z)/du, d(1/z)/dv)


def setup_triangles(u: torch.Tensor, v: torch.Tensor, inv_z: torch.Tensor, faces_t: torch.Tensor,
                    width: int, height: int) -> TriangleSetup:
    """Edge functions, bounding boxes and 1/z planes of all drawable triangles.

    `u`, `v` (V,) float32 projected vertices, `inv_z` (V,) float64, `faces_t` (3, F).
    Everything is 1-D per corner / per edge: gathers along dim 1 and small trailing
    dimensions are several times slower in torch's CPU kernels.
    """
    X = [u.index_select(0, f) for f in faces_t]
    Y = [v.index_select(0, f) for f in faces_t]
    x0 = torch.minimum(torch.minimum(X[0], X[1]), X[2]).sub_(_BOX_MARGIN).ceil_().clamp_(min=0)
    y0 = torch.minimum(torch.minimum(Y[0], Y[1]), Y[2]).sub_(_BOX_MARGIN).ceil_().clamp_(min=0)
    x1 = torch.maximum(torch.maximum(X[0], X[1]), X[2]).add_(_BOX_MARGIN).floor_().clamp_(max=width - 1)
    y1 = torch.maximum(torch.maximum(Y[0], Y[1]), Y[2]).add_(_BOX_MARGIN).floor_().clamp_(max=height - 1)
    Xd, Yd = [x.double() for x in X], [y.double() for y in Y]  # float32 differences are exact in float64
    d1x, d1y, d2x, d2y = Xd[1] - Xd[0], Yd[1] - Yd[0], Xd[2] - Xd[0], Yd[2] - Yd[0]
    area2 = d1x * d2y - d1y * d2x  # twice the signed screen area
    ok = torch.isfinite(area2) & (area2 != 0) & (x0 <= x1) & (y0 <= y1)  # NaN compares False
    idx = flat_nonzero(ok)
    X, Y, iz = ([t.index_select(0, idx) for t in c] for c in (X, Y, [inv_z.index_select(0, f) for f in faces_t]))
    area2, d1x, d1y, d2x, d2y = (t.index_select(0, idx) for t in (area2, d1x, d1y, d2x, d2y))
    x0, y0, x1, y1 = (t.index_select(0, idx).long() for t in (x0, y0, x1, y1))

    edges = torch.empty(4, 3, len(idx), dtype=torch.float32, device=u.device)  # ax, ay, ex, ey
    owns = torch.empty(3, len(idx), dtype=torch.bool, device=u.device)
    positive = area2 > 0
    for k in range(3):  # edge k runs from vertex k+1 to vertex k+2 (it is opposite vertex k)
        ax, ay, bx, by = X[(k + 1) % 3], Y[(k + 1) % 3], X[(k + 2) % 3], Y[(k + 2) % 3]
        swap = (ax > bx) | ((ax == bx) & (ay > by))
        torch.where(swap, bx, ax, out=edges[0, k])
        torch.where(swap, by, ay, out=edges[1, k])
        torch.sub(torch.where(swap, ax, bx), edges[0, k], out=edges[2, k])
        torch.sub(torch.where(swap, ay, by), edges[1, k], out=edges[3, k])
        torch.ne(positive, swap, out=owns[k])

    f1, f2 = iz[1] - iz[0], iz[2] - iz[0]
    ga = (f1 * d2y - f2 * d1y).div_(area2)
    gb = (f2 * d1x - f1 * d2x).div_(area2)
    plane = torch.stack([X[0], Y[0], iz[0].float(), ga.float(), gb.float()])
    return TriangleSetup(idx, x0, y0, x1 - x0 + 1, y1 - y0 + 1, edges.view(12, -1), owns, plane)


def _stencil_side(n: torch.Tensor) -> torch.Tensor:
    """Stencil side for a box side n: the smallest of STENCIL_SIDES >= n, TILE beyond."""
    table = torch.tensor([min(s for s in STENCIL_SIDES if s >= m) for m in range(TILE + 1)], device=n.device)
    return table.index_select(0, n.clamp(max=TILE))


def _entries(s: TriangleSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(column into setup, x0, y0, sx, sy) per stencil; big boxes become several tiles."""
    sx, sy = _stencil_side(s.nx), _stencil_side(s.ny)
    tx, ty = (s.nx + sx - 1) // sx, (s.ny + sy - 1) // sy
    cols = torch.arange(len(s.face), device=s.face.device)
    count = tx * ty
    if bool((count == 1).all()):
        return cols, s.x0, s.y0, sx, sy
    cols = torch.repeat_interleave(cols, count)
    local = torch.arange(len(cols), device=cols.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    txc = tx[cols]
    return cols, s.x0[cols] + (local % txc) * sx[cols], s.y0[cols] + (local // txc) * sy[cols], sx[cols], sy[cols]


def _merge_classes(keys: torch.Tensor, counts: torch.Tensor) -> dict[int, int]:
    """Map each stencil class (key = w * (TILE + 1) + h) to the class it is processed as.

    Small classes go first; each is folded into the populated class with w' >= w and
    h' >= h that adds the fewest candidates, if that is within MERGE_BUDGET.
    """
    size = {k: divmod(k, TILE + 1) for k in keys.tolist()}
    count = dict(zip(keys.tolist(), counts.tolist()))
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
    for k in target:  # follow chains a -> b -> c
        while target[target[k]] != target[k]:
            target[k] = target[target[k]]
    return target


def depth_test(s: TriangleSetup, zbuf: torch.Tensor, row_stride: int, max_candidates: int) -> None:
    """Scatter (depth, face) keys of every covered (triangle, pixel) pair into `zbuf`."""
    cols, x0, y0, sx, sy = _entries(s)
    key = sx * (TILE + 1) + sy
    counts = torch.bincount(key, minlength=(TILE + 1) ** 2)
    keys = torch.nonzero(counts).squeeze(1)
    target = _merge_classes(keys, counts[keys])
    if any(k != t for k, t in target.items()):
        table = torch.arange((TILE + 1) ** 2, device=key.device)
        table[list(target)] = torch.tensor(list(target.values()), device=key.device)
        key = table[key]
    order = torch.argsort(key.to(torch.int16), stable=True)  # int16 sorts ~3x faster
    cols, x0, y0 = (t.index_select(0, order) for t in (cols, x0, y0))
    counts = torch.bincount(key, minlength=(TILE + 1) ** 2)
    keys = torch.nonzero(counts).squeeze(1)  # ascending, like the sorted stencils
    start = 0
    for k, n in zip(keys.tolist(), counts[keys].tolist()):
        w, h = divmod(k, TILE + 1)
        chunk = max(1, max_candidates // (w * h))
        for c in range(start, start + n, chunk):
            e = min(c + chunk, start + n)
            _raster_chunk(s, cols[c:e], x0[c:e], y0[c:e], w, h, zbuf, row_stride)
        start += n


def _floor_div(x: torch.Tensor, d: int) -> torch.Tensor:
    """x // d for non-negative int64 x; numpy divides by a scalar ~3x faster on CPU."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy() // d)
    return torch.div(x, d, rounding_mode="floor")


def _raster_chunk(s: TriangleSetup, cols: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, w: int, h: int,
                  zbuf: torch.Tensor, row_stride: int) -> None:
    """Edge-test one chunk of same-shaped (h x w) stencils and depth-test the covered pixels.

    The canonical edge function ex * (py - ay) - ey * (px - ax) >= 0 is decided as
    A >= B with A = ex * (py - ay) (one value per stencil row) and B = ey * (px - ax)
    (one per stencil column): exact, with one broadcast comparison per edge over the
    (h, w, n) candidate block. A triangle that does not own the edge's zeros needs
    A < B, i.e. the negation.
    """
    dev, n = cols.device, len(cols)
    ry = torch.arange(h, dtype=torch.float32, device=dev).unsqueeze(1)
    rx = torch.arange(w, dtype=torch.float32, device=dev).unsqueeze(1)
    x0f, y0f = x0.float(), y0.float()
    py, px = ry + y0f, rx + x0f  # (h, n), (w, n): exact integers
    e, owns = s.edges.index_select(1, cols), s.owns.index_select(1, cols)
    inside = None
    for k in range(3):
        ax, ay, ex, ey = e[k], e[3 + k], e[6 + k], e[9 + k]
        t = torch.ge((py - ay).mul_(ex).unsqueeze(1), (px - ax).mul_(ey).unsqueeze(0)).eq_(owns[k])
        inside = t if inside is None else inside.logical_and_(t)
    hit = flat_nonzero(inside)
    if len(hit) == 0:
        return
    # 1/z over the block from its plane, relative to each stencil's origin.
    pl = s.plane.index_select(1, cols)
    iz0 = pl[2] + pl[3] * (x0f - pl[0]) + pl[4] * (y0f - pl[1])
    invz = torch.add((pl[4] * ry).add_(iz0).unsqueeze(1), (pl[3] * rx).unsqueeze(0))
    invz = invz.view(-1).index_select(0, hit)
    # Nearest = largest 1/z; positive float32 bits order like the floats themselves.
    key = invz.clamp_min_(1e-30).view(torch.int32).long().neg_().add_(0x7FFFFFFF)
    tri = hit - _floor_div(hit, n) * n
    key.bitwise_left_shift_(32).bitwise_or_(s.face.index_select(0, cols).index_select(0, tri))
    row = (y0 * row_stride + x0).int() + torch.arange(h, dtype=torch.int32, device=dev).unsqueeze(1) * row_stride
    pix = torch.add(row.unsqueeze(1), torch.arange(w, dtype=torch.int32, device=dev).view(1, w, 1))
    zbuf.scatter_reduce_(0, pix.view(-1).index_select(0, hit).long(), key, "amin")

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
