"""Encoding of one training sample as WebDataset tar members, shared by writer and loader.

Members of sample `<key>` (all little-endian):

======================  =====================================================
`<key>.rgb.npy.zst`     uint8 (H, W, 3) RGB target, matted onto the background
`<key>.alpha.npy.zst`   uint8 (H, W) ground-truth foreground alpha
`<key>.geom.npy.zst`    uint16 (6, H, W): depth, canonical x, y, z, ambient 0, 1
`<key>.nrm.npy.zst`     uint8 (3, H, W): camera-space normals, (n + 1) / 2 * 255
`<key>.expr.npy`        float32 (D,) expression code
`<key>.json`            person, sequence, timestep, serial, split, camera, quantisation
`<key>.sha256`          hex sha256 over the members above (`sample_checksum`)
======================  =====================================================

`.npy.zst` members are `.npy` files compressed with zstd (level 3): lossless,
2-4x smaller than raw on these images, and decompressed at GB/s, where decoding a
PNG of the same image costs ~10-30 ms at 512^2 and dominated loading. Each zstd
frame carries its content checksum (xxhash64), but `expr.npy` and `json` are stored raw:
a flipped byte there (a timestep, the depth range) would decode without a word. So every
sample carries a sha256 over all its other members (each one's name, length and bytes, in
`MEMBERS` order), checked before anything is decoded (`decode_raw`, `decode_sample`): a
flipped byte anywhere in a sample fails when that sample is read, with or without the
shard's manifest, and without hashing whole shards (~0.7 ms per MB with SHA-NI, a fraction
of the decode).

Quantisation (like the original's 16-bit PNG buffers, but one array): depth 0
means "no surface" (the rasterized mask), else 1 + round((z - lo) / (hi - lo) *
65534) with per-sample lo/hi stored in the JSON; canonical coordinates are mapped
from [-1, 1] to [0, 65535] (first normalised to [-1, 1] with the person's
ranges: spatial ones isotropically, each ambient one on its own; `normalise_canonical`). Normals get 8 bits. A 16-bit
step is 3e-5 of the range: far below what a 512^2 feature plane can resolve.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from numcodecs import Zstd

#: Every member of a sample, in the order they are written; the last is the checksum over the others.
MEMBERS = ("rgb.npy.zst", "alpha.npy.zst", "geom.npy.zst", "nrm.npy.zst", "expr.npy", "json", "sha256")
CHECKSUM = MEMBERS[-1]
#: Bumped whenever the bytes `encode_sample` writes change (part of the shard spec digest,
#: so older shards are rebuilt). 2: zstd frames carry content checksums. 3: the `sha256` member.
CODEC_VERSION = 3
U16 = 65535
_ZSTD = Zstd(level=3, checksum=True)


class SampleChecksumError(ValueError):
    """A sample's bytes differ from the checksum it was written with: corrupt on disk (or in transfer)."""


def sample_checksum(members: dict[str, bytes]) -> bytes:
    """Hex sha256 (ASCII) over each member but the checksum itself: its name, its length and its bytes, in
    `MEMBERS` order (the lengths keep bytes from moving from one member to the next unnoticed)."""
    h = hashlib.sha256()
    for ext in MEMBERS[:-1]:
        data = members[ext]
        h.update(ext.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest().encode()


def verify_sample(members: dict[str, bytes]) -> None:
    """SampleChecksumError unless the sample's `sha256` member matches its other members (one flipped
    byte anywhere, the uncompressed `expr.npy` and `json` included, is caught)."""
    missing = [ext for ext in MEMBERS if ext not in members]
    if missing:
        raise SampleChecksumError(f"the sample lacks {', '.join(missing)} (a shard of an older codec or a damaged "
                                  "one)")
    stored, actual = members[CHECKSUM], sample_checksum(members)
    if stored != actual:
        raise SampleChecksumError(f"sample checksum mismatch (sha256 {actual[:12].decode()}... of its members, "
                                  f"{stored[:12].decode('ascii', 'replace')}... recorded when written): corrupt "
                                  "bytes")


@dataclass
class DecodedSample:
    """A sample as float arrays (channel-first), before augmentation."""

    key: str
    rgb: np.ndarray  # (3, H, W) float32 in [0, 1], matted
    alpha: np.ndarray  # (1, H, W) float32 in [0, 1]
    mask: np.ndarray  # (1, H, W) float32 {0, 1}
    depth: np.ndarray  # (1, H, W) float32 camera z, 0 outside
    canonical: np.ndarray  # (5, H, W) float32, 0 outside
    normals: np.ndarray  # (3, H, W) float32 unit, 0 outside
    expression: np.ndarray  # (D,) float32
    meta: dict


def normalise_canonical(canonical: np.ndarray, bounds: list[list[float]],
                        ambient_bounds: list[list[float]] | None = None, margin: float = 0.05) -> np.ndarray:
    """Map canonical coords into [-1, 1] with the person's ranges (+ margin), then clip.

    Spatial xyz: isotropically with ``bounds`` (the shape is kept). Ambient dims: each axis on
    its own with ``ambient_bounds`` [[min a0, min a1], [max a0, max a1]], so the ambient map is
    used over its whole extent (NPHM's ambient values span about [-0.2, 0.2]; the official code
    maps that fixed range onto the map); an axis without spread (FLAME-style zeros) maps to 0.
    Without ``ambient_bounds`` the ambient values are only clipped.
    """
    lo, hi = np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin)
    out = canonical.astype(np.float64).copy()
    out[..., :3] = (out[..., :3] - centre) / max(half, 1e-12)
    if ambient_bounds is not None:
        a_lo, a_hi = np.asarray(ambient_bounds[0], np.float64), np.asarray(ambient_bounds[1], np.float64)
        a_centre, a_half = (a_lo + a_hi) / 2, (a_hi - a_lo) / 2 * (1 + margin)
        flat = a_half <= 1e-12
        out[..., 3:5] = np.where(flat, 0.0, (out[..., 3:5] - a_centre) / np.where(flat, 1.0, a_half))
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _npy_zst(a: np.ndarray) -> bytes:
    return bytes(_ZSTD.encode(_npy(a)))


def encode_sample(rgb: np.ndarray, alpha: np.ndarray, mask: np.ndarray, depth: np.ndarray, canonical: np.ndarray,
                  normals: np.ndarray, expression: np.ndarray, meta: dict) -> dict[str, bytes]:
    """Bytes of every member; inputs channel-last: rgb/alpha uint8 (H,W,3)/(H,W), float buffers (H,W[,C]).

    A sample without a mesh pixel (``mask`` empty) or without a foreground pixel (``alpha`` all zero) is refused
    with ValueError: it is no training sample (the shard writer refuses both earlier, naming the sample)."""
    h, w = mask.shape
    if not mask.any():
        raise ValueError("the rasterized mask is empty (the mesh covers no pixel): nothing to condition on")
    if not alpha.any():
        raise ValueError("the alpha map is all zero (no foreground pixel)")
    geom = np.zeros((6, h, w), np.uint16)
    meta = dict(meta)
    z = depth[mask].astype(np.float64)
    lo, hi = float(z.min()), float(z.max())
    hi = hi if hi > lo else lo + 1e-6
    geom[0][mask] = 1 + np.round((z - lo) / (hi - lo) * (U16 - 1)).astype(np.uint16)
    c = np.clip(canonical[mask].astype(np.float64), -1, 1)
    geom[1:, mask] = np.round((c.T + 1) / 2 * U16).astype(np.uint16)
    meta["depth_range"] = [lo, hi]
    nrm = np.full((3, h, w), 128, np.uint8)
    nrm[:, mask] = np.round((np.clip(normals[mask], -1, 1).T + 1) / 2 * 255).astype(np.uint8)
    members = {
        "rgb.npy.zst": _npy_zst(rgb),
        "alpha.npy.zst": _npy_zst(alpha),
        "geom.npy.zst": _npy_zst(geom),
        "nrm.npy.zst": _npy_zst(nrm),
        "expr.npy": _npy(expression.astype(np.float32)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    members[CHECKSUM] = sample_checksum(members)
    return members


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _load_npy_zst(data: bytes) -> np.ndarray:
    return _load_npy(_ZSTD.decode(data))  # np.load copies the (read-only) bytes: the arrays are writable


@dataclass
class RawSample:
    """A sample's arrays as stored (quantised, channel-first), so crops and nearest-neighbour
    resizes can run on small integer arrays before anything is converted to float."""

    key: str
    rgb: np.ndarray  # (3, H, W) uint8
    alpha: np.ndarray  # (1, H, W) uint8
    geom: np.ndarray  # (6, H, W) uint16
    nrm: np.ndarray  # (3, H, W) uint8
    expression: np.ndarray  # (D,) float32
    meta: dict


def decode_raw(key: str, members: dict[str, bytes]) -> RawSample:
    """The sample's arrays as stored, after its checksum is verified (`verify_sample`: SampleChecksumError, a
    ValueError, for corrupt bytes); a member that decodes to something no encoder writes raises ValueError.

    Beyond the checksum, the two small plain members (expression, metadata) are checked for what they must be (a
    finite float32 code, an increasing finite depth range: a writer's bug, not bit rot). A sample with no mesh
    pixel or no foreground pixel (which writers before `shards.writer.SAMPLE_CHECKS` 1 let through) is refused
    too."""
    verify_sample(members)
    sample = RawSample(key, _load_npy_zst(members["rgb.npy.zst"]).transpose(2, 0, 1),
                       _load_npy_zst(members["alpha.npy.zst"])[None], _load_npy_zst(members["geom.npy.zst"]),
                       _load_npy_zst(members["nrm.npy.zst"]), _load_npy(members["expr.npy"]),
                       json.loads(members["json"]))
    _check_raw(sample)
    return sample


def _check_raw(s: RawSample) -> None:
    h, w = s.rgb.shape[1:]
    layout = {"rgb": (s.rgb, np.uint8, 3), "alpha": (s.alpha, np.uint8, 1), "geom": (s.geom, np.uint16, 6),
              "nrm": (s.nrm, np.uint8, 3)}
    for name, (a, dtype, channels) in layout.items():
        if a.dtype != dtype or a.shape != (channels, h, w):
            raise ValueError(f"{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} ({channels}, {h}, {w})")
    if not s.geom[0].any():  # depth 0 everywhere: the rasterized mask is empty
        raise ValueError("the rasterized mask is empty (the mesh covers no pixel); re-run jobs/preprocess.py, which "
                         "refuses such samples")
    if not s.alpha.any():
        raise ValueError("the alpha map is all zero (no foreground pixel); re-run jobs/preprocess.py, which refuses "
                         "such samples")
    e = s.expression
    if e.dtype != np.float32 or e.ndim != 1 or not np.isfinite(e).all():
        raise ValueError(f"expression must be a finite float32 vector, got {e.dtype} {e.shape}")
    depth = s.meta.get("depth_range") if isinstance(s.meta, dict) else None
    if (not isinstance(depth, list) or len(depth) != 2 or not all(isinstance(x, (int, float)) for x in depth)
            or not np.isfinite(depth).all() or not depth[0] < depth[1]):
        raise ValueError(f"metadata's depth_range must be two finite increasing numbers, got {depth!r}")


def _as_unsigned(geom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor to compare with 0, tensor whose `copy_` into float gives the unsigned values).

    16-bit input (uint16, or int16 holding the uint16 bit pattern) is compared as int16;
    on CPU its bits are read as torch.uint16, which `copy_` converts in one pass (uint16
    has few kernels, but copies); elsewhere it is widened to int32, which every backend has.
    """
    if geom.dtype not in (torch.int16, torch.uint16):
        return geom, geom
    bits = geom.view(torch.int16)
    return bits, bits.view(torch.uint16) if geom.device.type == "cpu" else bits.to(torch.int32) & 0xFFFF


def dequantize(geom: torch.Tensor, nrm: torch.Tensor, depth_range: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Batched inverse of the quantisation, in torch on any device.

    geom: (B, 6, H, W) uint16 values (any integer dtype; int16 is read as its uint16 bit
    pattern), nrm: (B, 3, H, W) uint8, depth_range: (B, 2). Returns float32 (mask
    (B,1,H,W), depth (B,1,H,W), normals (B,3,H,W), canonical (B,5,H,W)), 0 outside the mask:
    views of one (B, 10, H, W) tensor, filled in place (a few passes over memory instead
    of a dozen temporaries: ~8x faster on CPU at 512^2).
    """
    b, _, h, w = geom.shape
    out = torch.empty((b, 10, h, w), dtype=torch.float32, device=geom.device)
    mask, depth, normals, canonical = out[:, 0:1], out[:, 1:2], out[:, 2:5], out[:, 5:10]
    bits, g = _as_unsigned(geom)
    mask.copy_(bits[:, :1] != 0)
    lo, hi = (depth_range[:, k].to(torch.float32).view(-1, 1, 1, 1) for k in (0, 1))
    depth.copy_(g[:, :1]).sub_(1).mul_((hi - lo) / (U16 - 1)).add_(lo).mul_(mask)
    canonical.copy_(g[:, 1:]).mul_(2 / U16).sub_(1).mul_(mask)
    normals.copy_(nrm).mul_(2 / 255).sub_(1)
    x, y, z = normals[:, 0:1], normals[:, 1:2], normals[:, 2:3]
    # Explicit sum of squares: Tensor.norm(dim=1) over channels is ~20x slower on CPU.
    inv = torch.addcmul(torch.addcmul(x * x, y, y), z, z).clamp_min_(1e-12).rsqrt_().mul_(mask)
    normals.mul_(inv)
    return mask, depth, normals, canonical


def decode_sample(key: str, members: dict[str, bytes]) -> DecodedSample:
    """Inverse of `encode_sample` (up to quantisation), at full resolution."""
    raw = decode_raw(key, members)
    geo = dequantize(torch.from_numpy(raw.geom.view(np.int16))[None], torch.from_numpy(raw.nrm)[None],
                     torch.tensor([raw.meta["depth_range"]]))
    mask, depth, normals, canonical = (t[0].numpy() for t in geo)
    return DecodedSample(key, raw.rgb.astype(np.float32) / 255, raw.alpha.astype(np.float32) / 255, mask, depth,
                         canonical, normals, raw.expression, raw.meta)
