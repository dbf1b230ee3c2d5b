"""Geometry shared by both backends: camera matrices, near-plane culling, vertex normals."""

from __future__ import annotations

import numpy as np
import torch

from ..contract import Camera

#: Triangles with any vertex at camera z below this are dropped (not clipped).
NEAR = 0.01


def camera_tensors(camera: Camera, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, R, t) as float64 tensors; K's last row must be (0, 0, 1) so that w == camera z.

    Checked on the host arrays; on CUDA the matrices travel through pinned memory without
    blocking, so nothing waits for the GPU."""
    if not np.array_equal(camera.K[2], [0.0, 0.0, 1.0]):
        raise ValueError(f"camera {camera.serial}: intrinsics must have last row (0, 0, 1), got {camera.K[2].tolist()}")
    K = host_to_device(camera.K, device)
    w2c = host_to_device(camera.world_to_cam, device)
    return K, w2c[:3, :3], w2c[:3, 3]


def host_to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A float64 copy of a small host array on `device` (CUDA: pinned, non-blocking)."""
    host = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64))
    if torch.device(device).type != "cuda":
        return host.clone().to(device)
    return host.pin_memory().to(device, non_blocking=True)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted smooth vertex normals (V, 3), unit length (0 for unused vertices).

    The unnormalised face cross product is twice the face area, so summing it weights
    each face by area; its direction follows the face winding (v0, v1, v2).
    """
    return vertex_normals_planar(vertices.T.contiguous(), faces.long().T.contiguous()).T.contiguous()


def vertex_normals_planar(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """`vertex_normals` on planar data: (3, V) positions, (3, F) faces -> (3, V) normals.

    Planar layout because torch's CPU kernels are several times slower on (N, 3) rows.
    """
    flat = f.reshape(-1)
    X, Y, Z = (c.index_select(0, flat).view(3, -1) for c in v)  # [corner, face]
    e1x, e1y, e1z = X[1] - X[0], Y[1] - Y[0], Z[1] - Z[0]
    e2x, e2y, e2z = X[2] - X[0], Y[2] - Y[0], Z[2] - Z[0]
    face_n = (e1y * e2z - e1z * e2y, e1z * e2x - e1x * e2z, e1x * e2y - e1y * e2x)
    n = torch.zeros_like(v)
    for c in range(3):  # every corner of a face receives the face's normal
        n[c].index_add_(0, flat, face_n[c].repeat(3))
    return unit_planar(n)


def unit_planar(n: torch.Tensor) -> torch.Tensor:
    """Normalise the columns of a (3, N) tensor in place (zero columns stay zero)."""
    length = (n[0] * n[0]).add_(n[1] * n[1]).add_(n[2] * n[2]).sqrt_()
    return n.div_(torch.where(length > 0, length, torch.ones_like(length)))


def normals_to_camera(normals_world: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Rotate (3, V) world normals into the camera frame (inverse transpose, computed on the
    host, so a scaled rotation also works and nothing waits for a GPU); returns unit (3, V) normals."""
    R = camera.world_to_cam[:3, :3]
    M = host_to_device(np.linalg.inv(R).T, normals_world.device).to(normals_world.dtype)
    return unit_planar(M @ normals_world)


def visible_face_mask(cam_z: torch.Tensor, faces: torch.Tensor, near: float = NEAR) -> torch.Tensor:
    """(F,) bool: the face's three vertices all lie at camera z >= near."""
    corner_ok = (cam_z >= near).index_select(0, faces.reshape(-1).long()).view(-1, 3)
    return corner_ok[:, 0] & corner_ok[:, 1] & corner_ok[:, 2]
