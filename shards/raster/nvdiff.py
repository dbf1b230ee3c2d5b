"""nvdiffrast backend: the same output contract as `cpu.py`, rasterized on CUDA.

Clip space is built so that nvdiffrast's pixel centres coincide with the OpenCV
ones: nvdiffrast puts the centre of output column x at NDC (2x + 1) / W - 1 and of
output row y at NDC (2y + 1) / H - 1 (row 0 at NDC y = -1, no flip), so with
w = camera z:

    x_clip = (2 / W) * (K[0] . p) + (1 / W - 1) * z
    y_clip = (2 / H) * (K[1] . p) + (1 / H - 1) * z

z_clip is an OpenGL depth range [near, far] with far just beyond the farthest
vertex (best depth precision, nothing clipped). Triangles crossing the near plane
are removed beforehand, as on the CPU backend, instead of being clipped.
nvdiffrast snaps vertices to 1/16 pixel, so coverage can differ from the CPU
backend for pixel centres within ~1/32 pixel of an edge.
"""

from __future__ import annotations

import torch

from ..contract import Camera
from .buffers import RasterBuffers
from .common import NEAR, camera_tensors, normals_to_camera, vertex_normals, visible_faces

_contexts: dict[torch.device, object] = {}


def _context(device: torch.device):
    """One RasterizeCudaContext per CUDA device, created on first use."""
    if device not in _contexts:
        import nvdiffrast.torch as dr

        _contexts[device] = dr.RasterizeCudaContext(device=device)
    return _contexts[device]


def clip_matrix(K: torch.Tensor, width: int, height: int, near: float, far: float) -> torch.Tensor:
    """(4, 4) float64 map from homogeneous OpenCV camera coordinates to nvdiffrast clip space."""
    P = torch.zeros(4, 4, dtype=torch.float64, device=K.device)
    P[0, :3] = 2.0 / width * K[0]
    P[0, 2] += 1.0 / width - 1.0
    P[1, :3] = 2.0 / height * K[1]
    P[1, 2] += 1.0 / height - 1.0
    P[2, 2] = (far + near) / (far - near)
    P[2, 3] = -2.0 * far * near / (far - near)
    P[3, 2] = 1.0
    return P


def rasterize_nvdiffrast(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
                         attributes: torch.Tensor | None = None, near: float = NEAR) -> RasterBuffers:
    """Rasterize on the GPU; outputs go back to the device of `vertices`."""
    if not torch.cuda.is_available():
        raise RuntimeError("rasterizer backend 'nvdiffrast' needs CUDA, but torch.cuda.is_available() is False; "
                           "use backend='cpu' (or 'auto')")
    import nvdiffrast.torch as dr

    out_device = vertices.device
    dev = out_device if out_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    H, W = camera.height, camera.width
    C = 0 if attributes is None else attributes.shape[1]
    vertices, faces = vertices.to(dev), faces.to(dev)
    K, R, t = camera_tensors(camera, dev)
    cam = vertices.to(torch.float64) @ R.T + t
    keep = visible_faces(cam[:, 2], faces, near)
    if len(keep) == 0:
        return RasterBuffers.empty(H, W, C, out_device)
    tri = faces[keep].to(torch.int32).contiguous()
    far = max(float(cam[tri.long().reshape(-1), 2].max()) * 1.5, near * 10.0)
    hom = torch.cat([cam, torch.ones_like(cam[:, :1])], dim=1)
    pos = (hom @ clip_matrix(K, W, H, near, far).T).float().unsqueeze(0).contiguous()
    rast, _ = dr.rasterize(_context(dev), pos, tri, resolution=(H, W), grad_db=False)
    rast = rast[0]

    mask = rast[..., 3] > 0
    normals_cam = normals_to_camera(vertex_normals(vertices, faces).T.to(torch.float64), R).T
    channels = [cam[:, 2:3], normals_cam]
    if attributes is not None:
        channels.append(attributes.to(dev, torch.float64))
    attr = torch.cat(channels, dim=1).float().unsqueeze(0).contiguous()
    interp, _ = dr.interpolate(attr, rast.unsqueeze(0), tri)
    interp = interp[0]
    m = mask.unsqueeze(-1)

    local = rast[..., 3].long() - 1  # nvdiffrast triangle ids are offset by one (0 = empty)
    triangle_id = torch.where(mask, keep[local.clamp_min(0)], torch.full_like(local, -1)).int()
    u, v = rast[..., 0], rast[..., 1]  # weights of vertices 0 and 1 (perspective-correct)
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * m
    normals = torch.nn.functional.normalize(interp[..., 1:4], dim=-1) * m
    out = RasterBuffers(mask=mask, depth=interp[..., 0] * mask, normals=normals,
                        attributes=interp[..., 4:4 + C] * m, triangle_id=triangle_id, barycentrics=bary)
    return out.to(out_device)
