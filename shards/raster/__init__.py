"""Triangle rasterizer with one output contract and two backends (docs/CONTRACTS.md).

    buf = rasterize(vertices, faces, camera, attributes=canonical, backend="auto")
    bufs = rasterize_views(vertices, faces, cameras, attributes=canonical)  # one mesh, many cameras

"auto" is nvdiffrast (`nvdiff.py`) when CUDA is available, else the CPU backend
(`cpu.py` + its compiled loops `cpu_kernels.py`). Conventions shared by both:

* Camera space is OpenCV: `camera.world_to_cam` maps world points to x right,
  y down, z forward; depth is camera z; normals are unit vectors in this frame.
* Pixels: the centre of the pixel in row i, column j projects to (u, v) = (j, i).
  A pixel is covered when its centre is inside a projected triangle (one sample
  per pixel, no anti-aliasing).
* Ties: a centre exactly on a shared edge or vertex belongs to exactly one of the
  triangles that meet there, so closed meshes are drawn without holes or double
  coverage (cpu: exact rule in `cpu`; nvdiffrast: its own fill rule after
  snapping vertices to 1/16 pixel). Equally deep surfaces: the cpu backend picks the
  lower face index.
* Near plane: a triangle with any vertex at camera z < NEAR (0.01) is dropped, not
  clipped. There is no far plane and no back-face culling: the nearest surface wins
  whatever its winding.
* Interpolation is perspective-correct: barycentrics are the weights of the 3-D hit
  point in face-vertex order, depth = 1 / sum(b_screen / z), normals are
  area-weighted smooth vertex normals interpolated with them and renormalised.
* Outside the mask every float buffer is 0 and triangle_id is -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..contract import Camera
from .buffers import RasterBuffers
from .common import NEAR, vertex_normals
from .cpu import rasterize_cpu, rasterize_cpu_views
from .nvdiff import nvdiffrast_torch, rasterize_nvdiffrast

__all__ = ["NEAR", "RasterBuffers", "available_backends", "check_face_indices", "rasterize", "rasterize_views",
           "vertex_normals"]

BACKENDS = ("auto", "cpu", "nvdiffrast")


def available_backends() -> list[str]:
    """Backends that can run here ("cpu" always; "nvdiffrast" with CUDA and the package)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        try:
            nvdiffrast_torch()  # imports the package and builds / loads its CUDA plugin
        except (ImportError, RuntimeError, OSError):
            return out
        out.append("nvdiffrast")
    return out


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
              attributes: torch.Tensor | None = None, backend: str = "auto") -> RasterBuffers:
    """Rasterize a triangle mesh into per-pixel geometry buffers for `camera`.

    "auto" uses nvdiffrast iff CUDA is available, else the CPU backend.
    """
    if _pick_backend(backend, vertices, faces, attributes) == "nvdiffrast":
        return rasterize_nvdiffrast(vertices, faces, camera, attributes)
    return rasterize_cpu(vertices, faces, camera, attributes)


def rasterize_views(vertices: torch.Tensor, faces: torch.Tensor, cameras: Sequence[Camera],
                    attributes: torch.Tensor | None = None, backend: str = "auto") -> list[RasterBuffers]:
    """`rasterize` of one mesh for each of `cameras` (the same buffers, in camera order).

    The CPU backend does the camera-independent work (vertex normals, layouts) once.
    """
    if _pick_backend(backend, vertices, faces, attributes) == "nvdiffrast":
        return [rasterize_nvdiffrast(vertices, faces, camera, attributes) for camera in cameras]
    return rasterize_cpu_views(vertices, faces, cameras, attributes)


def _pick_backend(backend: str, vertices: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor | None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; expected one of {BACKENDS}")
    _check_inputs(vertices, faces, attributes)
    if backend == "auto":
        return "nvdiffrast" if torch.cuda.is_available() else "cpu"
    return backend


def check_face_indices(faces: torch.Tensor, num_vertices: int) -> None:
    """Face indices must lie in [0, num_vertices). On the CPU a ValueError; on a GPU an
    asynchronous device assert with the same message (a host check would wait for the GPU)."""
    if len(faces) == 0:
        return
    message = f"face indices must lie in [0, {num_vertices})"
    if faces.device.type == "cpu":
        if int(faces.min()) < 0 or int(faces.max()) >= num_vertices:
            raise ValueError(message)
        return
    torch._assert_async(((faces >= 0) & (faces < num_vertices)).all(), message)


def _check_inputs(vertices: torch.Tensor, faces: torch.Tensor, attributes: torch.Tensor | None) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise ValueError(f"vertices must be a float (V, 3) tensor, got {tuple(vertices.shape)} {vertices.dtype}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point():
        raise ValueError(f"faces must be an integer (F, 3) tensor, got {tuple(faces.shape)} {faces.dtype}")
    check_face_indices(faces, len(vertices))
    if attributes is not None and (attributes.ndim != 2 or attributes.shape[0] != len(vertices)):
        raise ValueError(f"attributes must have shape ({len(vertices)}, C), got {tuple(attributes.shape)}")
