"""Compiled (numba) loops of the CPU rasterizer: triangle set-up, coverage + depth test, shading.

The arithmetic is the torch implementation's, operation for operation and in the same
precision (float32 where it was float32, float64 where it was float64, no fused
multiply-add: numba compiles without fastmath), so the buffers are bit-identical to it
(`tests/shards/test_raster_kernels.py` compares them with the frozen torch version). Loops
instead of tensor ops because the synthetic meshes at 128 x 128 have ~1 pixel per triangle:
the torch version spent its time on ~600 small tensor ops and their temporaries per image.

Conventions are those of `cpu_coverage` (stencils, tiles, canonical edges, owned zeros, the
int64 (nearness, face) z-buffer key) and `cpu` (perspective-correct float64 shading).
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Largest stencil side; bigger bounding boxes are split into TILE x TILE tiles.
TILE = 32
#: z-buffer value of a pixel no triangle covers.
EMPTY = np.iinfo(np.int64).max
_LOW32 = 0xFFFFFFFF
_MARGIN = np.float32(1.0 / 64.0)
_NEAREST_CLAMP = np.float32(1e-30)


@njit(cache=True, nogil=True, inline="always")
def _canonical_edge(ax, ay, bx, by, positive):
    """(ax, ay, ex, ey, owns) of the edge a -> b evaluated from its lexicographically smaller end."""
    swap = (ax > bx) or (ax == bx and ay > by)
    if swap:
        ax, ay, bx, by = bx, by, ax, ay
    return ax, ay, bx - ax, by - ay, positive != swap


@njit(cache=True, nogil=True)
def setup_triangles(u, v, inv_z, cam_z, faces, near, width, height, side_table, ints, floats, owns, class_count):
    """Set-up of every drawable triangle; returns how many there are (T).

    `u`, `v` (V,) float32 projected vertices, `inv_z` / `cam_z` (V,) float64, `faces` (F, 3)
    int64. A face is drawable when its three vertices are at camera z >= near, its signed
    screen area is finite and non-zero and its bounding box holds a pixel centre. Fills rows
    [0, T) of: `ints` (F, 6) face index, box x0, y0, nx, ny, stencil class; `floats` (F, 17) float32: canonical
    edges 0-2 as ax, ay, ex, ey (4 each), then the 1/z plane (u0, v0, 1/z0, d(1/z)/du,
    d(1/z)/dv); `owns` (F, 3). Counts the stencils of each class (w * (TILE + 1) + h, tiles of
    big boxes included) into `class_count`.
    """
    n = 0
    for f in range(faces.shape[0]):
        i0, i1, i2 = faces[f, 0], faces[f, 1], faces[f, 2]
        if not (cam_z[i0] >= near and cam_z[i1] >= near and cam_z[i2] >= near):
            continue
        x_0, x_1, x_2 = u[i0], u[i1], u[i2]
        y_0, y_1, y_2 = v[i0], v[i1], v[i2]
        d1x = np.float64(x_1) - np.float64(x_0)
        d1y = np.float64(y_1) - np.float64(y_0)
        d2x = np.float64(x_2) - np.float64(x_0)
        d2y = np.float64(y_2) - np.float64(y_0)
        area2 = d1x * d2y - d1y * d2x  # twice the signed screen area
        if not np.isfinite(area2) or area2 == 0:
            continue  # a finite area also means finite vertices: min/max below see no NaN
        x0 = max(np.ceil(min(min(x_0, x_1), x_2) - _MARGIN), np.float32(0))
        y0 = max(np.ceil(min(min(y_0, y_1), y_2) - _MARGIN), np.float32(0))
        x1 = min(np.floor(max(max(x_0, x_1), x_2) + _MARGIN), np.float32(width - 1))
        y1 = min(np.floor(max(max(y_0, y_1), y_2) + _MARGIN), np.float32(height - 1))
        if not (x0 <= x1 and y0 <= y1):
            continue
        nx, ny = np.int64(x1) - np.int64(x0) + 1, np.int64(y1) - np.int64(y0) + 1
        ints[n, 0], ints[n, 1], ints[n, 2], ints[n, 3], ints[n, 4] = f, np.int64(x0), np.int64(y0), nx, ny
        positive = area2 > 0
        # edge k runs from vertex k+1 to vertex k+2 (it is opposite vertex k)
        floats[n, 0], floats[n, 1], floats[n, 2], floats[n, 3], owns[n, 0] = _canonical_edge(x_1, y_1, x_2, y_2,
                                                                                             positive)
        floats[n, 4], floats[n, 5], floats[n, 6], floats[n, 7], owns[n, 1] = _canonical_edge(x_2, y_2, x_0, y_0,
                                                                                             positive)
        floats[n, 8], floats[n, 9], floats[n, 10], floats[n, 11], owns[n, 2] = _canonical_edge(x_0, y_0, x_1, y_1,
                                                                                               positive)
        iz0 = inv_z[i0]
        f1, f2 = inv_z[i1] - iz0, inv_z[i2] - iz0
        floats[n, 12], floats[n, 13], floats[n, 14] = x_0, y_0, np.float32(iz0)
        floats[n, 15] = np.float32((f1 * d2y - f2 * d1y) / area2)
        floats[n, 16] = np.float32((f2 * d1x - f1 * d2x) / area2)
        sx, sy = side_table[min(nx, TILE)], side_table[min(ny, TILE)]
        ints[n, 5] = sx * (TILE + 1) + sy
        class_count[ints[n, 5]] += ((nx + sx - 1) // sx) * ((ny + sy - 1) // sy)
        n += 1
    return n


@njit(cache=True, nogil=True)
def depth_test(n, ints, floats, owns, side_table, target, zbuf, width, height):
    """Nearest (1/z, face) key of every pixel into `zbuf` (H * W int64, EMPTY where uncovered).

    Each triangle's box is covered by stencils of its class's side (tiles of TILE beyond),
    tested as the class `target` maps it to (a larger stencil at the same origin: the
    torch version's folding of small classes). A pixel centre is inside when, for every
    canonical edge, (py - ay) * ex >= (px - ax) * ey equals `owns` (float32, exact
    comparison); its key is (0x7FFFFFFF - float32 bits of max(1/z, 1e-30)) << 32 | face,
    so the minimum is the nearest face and exact ties go to the lower face index.
    """
    scratch = np.empty(1, np.float32)
    bits = scratch.view(np.int32)
    for t in range(n):
        face, bx0, by0, nx, ny = ints[t, 0], ints[t, 1], ints[t, 2], ints[t, 3], ints[t, 4]
        ax0, ay0, ex0, ey0 = floats[t, 0], floats[t, 1], floats[t, 2], floats[t, 3]
        ax1, ay1, ex1, ey1 = floats[t, 4], floats[t, 5], floats[t, 6], floats[t, 7]
        ax2, ay2, ex2, ey2 = floats[t, 8], floats[t, 9], floats[t, 10], floats[t, 11]
        pl0, pl1, pl2, pl3, pl4 = floats[t, 12], floats[t, 13], floats[t, 14], floats[t, 15], floats[t, 16]
        o0, o1, o2 = owns[t, 0], owns[t, 1], owns[t, 2]
        cls = target[ints[t, 5]]
        w, h = cls // (TILE + 1), cls % (TILE + 1)
        tx = ty = sx = sy = 1  # a box of at most TILE x TILE is one stencil
        if nx > TILE or ny > TILE:
            sx, sy = side_table[min(nx, TILE)], side_table[min(ny, TILE)]
            tx, ty = (nx + sx - 1) // sx, (ny + sy - 1) // sy
        for tile in range(tx * ty):
            ox = bx0 + (tile % tx) * sx
            oy = by0 + (tile // tx) * sy
            oxf, oyf = np.float32(ox), np.float32(oy)
            iz0 = pl2 + pl3 * (oxf - pl0) + pl4 * (oyf - pl1)
            for j in range(min(h, height - oy)):
                ryf = np.float32(j)
                pyf = ryf + oyf
                a0, a1, a2 = (pyf - ay0) * ex0, (pyf - ay1) * ex1, (pyf - ay2) * ex2
                row = pl4 * ryf + iz0
                base = (oy + j) * width + ox
                for i in range(min(w, width - ox)):
                    rxf = np.float32(i)
                    pxf = rxf + oxf
                    if ((a0 >= (pxf - ax0) * ey0) != o0 or (a1 >= (pxf - ax1) * ey1) != o1
                            or (a2 >= (pxf - ax2) * ey2) != o2):
                        continue
                    invz = row + pl3 * rxf
                    if not invz != invz:  # torch's clamp_min keeps NaN
                        invz = max(invz, _NEAREST_CLAMP)
                    scratch[0] = invz
                    key = ((np.int64(0x7FFFFFFF) - np.int64(bits[0])) << 32) | face
                    if key < zbuf[base + i]:
                        zbuf[base + i] = key


@njit(cache=True, nogil=True)
def shade(zbuf, faces, u, v, z, normals, attributes, mask, depth, triangle_id, bary, covered, raw_normals,
          out_attributes, width):
    """Perspective-correct barycentrics, depth, normals and attributes of every covered pixel.

    float64 edge functions e_k of the pixel centre against the winning face's projected
    vertices (`u`, `v` float64); the hit point's barycentrics are (e_k / z_k) / sum_j(e_j / z_j)
    and its depth sum(e) / sum_j(e_j / z_j). `normals` (3, V) and `attributes` (V, C) float32
    are interpolated as v0 + b1 (v1 - v0) + b2 (v2 - v0) with the float32 barycentrics
    (a constant stays exactly constant). The normals are left unnormalised in `raw_normals`
    (3, N), column j for pixel `covered[j]` (row-major); returns N. (The caller renormalises
    them with torch: its float32 sqrt is not always the correctly rounded one, and the
    buffers are to stay bit-identical to the torch implementation's.)
    """
    e = np.empty(3, np.float64)
    wk = np.empty(3, np.float64)
    qu = np.empty(3, np.float64)
    qv = np.empty(3, np.float64)
    fi = np.empty(3, np.int64)
    b32 = np.empty(3, np.float32)
    count = 0
    for p in range(zbuf.shape[0]):
        key = zbuf[p]
        if key == EMPTY:
            continue
        f = key & _LOW32
        py = np.float64(p // width)
        px = np.float64(p - (p // width) * width)
        for k in range(3):
            fi[k] = faces[f, k]
            qu[k], qv[k] = u[fi[k]], v[fi[k]]
        for k in range(3):
            a, b = (k + 1) % 3, (k + 2) % 3
            e[k] = (qu[b] - qu[a]) * (py - qv[a]) - (qv[b] - qv[a]) * (px - qu[a])
        for k in range(3):
            wk[k] = e[k] / z[fi[k]]
        total = wk[0] + wk[1] + wk[2]
        for k in range(3):
            b32[k] = np.float32(wk[k] / total)
            bary[p, k] = b32[k]
        depth[p] = np.float32((e[0] + e[1] + e[2]) / total)
        mask[p] = True
        triangle_id[p] = np.int32(f)
        for c in range(3):
            v0 = normals[c, fi[0]]
            o = (normals[c, fi[1]] - v0) * b32[1]
            o += (normals[c, fi[2]] - v0) * b32[2]
            raw_normals[c, count] = o + v0
        covered[count] = p
        count += 1
        for c in range(attributes.shape[1]):
            v0 = attributes[fi[0], c]
            o = (attributes[fi[1], c] - v0) * b32[1]
            o += (attributes[fi[2], c] - v0) * b32[2]
            out_attributes[p, c] = o + v0
    return count
