"""nvdiffrast backend: the same output contract as `cpu.py`, rasterized on CUDA.

Clip space is built so that nvdiffrast's pixel centres coincide with the OpenCV
ones: nvdiffrast puts the centre of output column x at NDC (2x + 1) / W - 1 and of
output row y at NDC (2y + 1) / H - 1 (row 0 at NDC y = -1, no flip), so with
w = camera z:

    x_clip = (2 / W) * (K[0] . p) + (1 / W - 1) * z
    y_clip = (2 / H) * (K[1] . p) + (1 / H - 1) * z

z_clip is an OpenGL depth range [near, far] with far just beyond the farthest
vertex (best depth precision, nothing clipped). Triangles crossing the near plane
are dropped, as on the CPU backend, instead of being clipped (pointed at a vertex
outside the frustum, so that no host sync is needed to compact them).
nvdiffrast snaps vertices to 1/16 pixel, so coverage can differ from the CPU
backend for pixel centres within ~1/32 pixel of an edge.
"""

from __future__ import annotations

import torch

from ..contract import Camera
from .buffers import RasterBuffers
from .common import NEAR, camera_tensors, normals_to_camera, vertex_normals, visible_face_mask
from .nvdiff_plugin import call_with_plugin

_contexts: dict[torch.device, object] = {}


def nvdiffrast_torch():
    """`nvdiffrast.torch` with its CUDA plugin built and importable (see `nvdiff_plugin`)."""
    import nvdiffrast.torch as dr

    call_with_plugin(dr.get_log_level)
    return dr


def _context(device: torch.device):
    """One RasterizeCudaContext per CUDA device, created on first use."""
    if device not in _contexts:
        _contexts[device] = nvdiffrast_torch().RasterizeCudaContext(device=device)
    return _contexts[device]


def clip_matrix(K: torch.Tensor, width: int, height: int, near: float,
                far: float | torch.Tensor) -> torch.Tensor:
    """(4, 4) float64 map from homogeneous OpenCV camera coordinates to nvdiffrast clip space.

    `far` may be a 0-d tensor on K's device (no host round trip)."""
    # Entries are written with in-place ops on views (fill_/add_ take the scalar as a kernel
    # argument): `P[i, j] = 1.0` copies a CPU scalar tensor to the device, a host sync on CUDA.
    P = torch.zeros(4, 4, dtype=torch.float64, device=K.device)
    P[0, :3] = 2.0 / width * K[0]
    P[0, 2].add_(1.0 / width - 1.0)
    P[1, :3] = 2.0 / height * K[1]
    P[1, 2].add_(1.0 / height - 1.0)
    P[2, 2].fill_((far + near) / (far - near))
    P[2, 3].fill_(-2.0 * far * near / (far - near))
    P[3, 2].fill_(1.0)
    return P


def prepare(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, attributes: torch.Tensor | None,
            near: float = NEAR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip-space positions (1, V + 1, 4), triangles (F, 3) int32 and attributes (1, V + 1, 4 + C)
    (camera z, camera normals, `attributes`) for nvdiffrast, without a host synchronisation.

    Faces with a vertex nearer than `near` are not compacted away (that needs a sync to size
    the result): they point at an extra vertex V placed outside the view frustum, so nvdiffrast
    culls them and its triangle ids stay the input face indices. The far plane (just beyond the
    farthest vertex of a kept face) is computed on the device."""
    dev = vertices.device
    n_vertices = vertices.shape[0]
    K, R, t = camera_tensors(camera, dev)
    cam = vertices.to(torch.float64) @ R.T + t
    faces = faces.long()
    keep = visible_face_mask(cam[:, 2], faces, near)
    tri = torch.where(keep.unsqueeze(1), faces, n_vertices).to(torch.int32).contiguous()
    face_z = torch.where(keep.unsqueeze(1), cam[:, 2][faces], near)
    far = torch.clamp_min(face_z.amax() * 1.5, near * 10.0)
    hom = torch.cat([cam, torch.ones_like(cam[:, :1])], dim=1)
    pos = (hom @ clip_matrix(K, camera.width, camera.height, near, far).T).float()
    outside = pos.new_full((1, 4), 2.0)  # x/w = y/w = z/w = 2: outside every clip plane
    outside[:, 3] = 1.0
    pos = torch.cat([pos, outside]).unsqueeze(0).contiguous()

    normals_cam = normals_to_camera(vertex_normals(vertices, faces).T.to(torch.float64), camera).T
    channels = [cam[:, 2:3], normals_cam]
    if attributes is not None:
        channels.append(attributes.to(dev, torch.float64))
    attr = torch.cat(channels, dim=1).float()
    attr = torch.cat([attr, attr.new_zeros(1, attr.shape[1])]).unsqueeze(0).contiguous()
    return pos, tri, attr


def rasterize_nvdiffrast(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera,
                         attributes: torch.Tensor | None = None, near: float = NEAR) -> RasterBuffers:
    """Rasterize on the GPU; outputs go back to the device of `vertices`. With CUDA inputs
    nothing here waits for the GPU (nvdiffrast's own kernels aside)."""
    if not torch.cuda.is_available():
        raise RuntimeError("rasterizer backend 'nvdiffrast' needs CUDA, but torch.cuda.is_available() is False; "
                           "use backend='cpu' (or 'auto')")
    out_device = vertices.device
    dev = out_device if out_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    H, W = camera.height, camera.width
    C = 0 if attributes is None else attributes.shape[1]
    if faces.shape[0] == 0:
        return RasterBuffers.empty(H, W, C, out_device)
    context = _context(dev)
    dr = nvdiffrast_torch()
    pos, tri, attr = prepare(vertices.to(dev), faces.to(dev), camera, attributes, near)
    rast, _ = dr.rasterize(context, pos, tri, resolution=(H, W), grad_db=False)
    interp, _ = dr.interpolate(attr, rast, tri)
    rast, interp = rast[0], interp[0]

    mask = rast[..., 3] > 0
    m = mask.unsqueeze(-1)
    # nvdiffrast triangle ids are offset by one (0 = empty); culled faces never show up.
    triangle_id = (rast[..., 3].int() - 1).masked_fill(~mask, -1)
    u, v = rast[..., 0], rast[..., 1]  # weights of vertices 0 and 1 (perspective-correct)
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * m
    normals = torch.nn.functional.normalize(interp[..., 1:4], dim=-1) * m
    out = RasterBuffers(mask=mask, depth=interp[..., 0] * mask, normals=normals,
                        attributes=interp[..., 4:4 + C] * m, triangle_id=triangle_id, barycentrics=bary)
    return out.to(out_device)
