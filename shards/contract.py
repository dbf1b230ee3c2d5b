"""The capture-root data contract: what a person's multi-view capture looks like on disk.

The layout follows NeRSemble (calibration + per-timestep image folders) plus one
folder of fitted meshes per sequence, so a real NeRSemble download with NPHM /
MonoNPHM / FLAME tracking maps onto it by moving files, not by converting them::

    <root>/<person>/calibration/camera_params.json
    <root>/<person>/sequences/<seq>/timesteps/frame_<t:05d>/images/cam_<serial>.png
    <root>/<person>/sequences/<seq>/timesteps/frame_<t:05d>/alpha_map/cam_<serial>.png
    <root>/<person>/tracking/meta.json
    <root>/<person>/tracking/<seq>/frame_<t:05d>.npz

Readers and writers for every file live here, so the synthetic generator, the
ingest and the tests all agree on one definition.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.io import DataError, atomic_write_bytes, atomic_write_json
from common.names import person_id_problem

#: Camera serials end the tar member names of the shards (``.../cam_<serial>.<ext>``), which WebDataset readers
#: split at the first dot of the base name.
SERIAL_RE = re.compile(r"\A[A-Za-z0-9_-]+\Z")


#: Spatial canonical dimensions (x, y, z) every mesh carries.
SPATIAL_DIMS = 3
#: Canonical dimensions of an NPHM-style mesh: 3 spatial + 2 ambient (hyper) dims.
NPHM_CANONICAL_DIMS = 5
#: Mesh kinds the contract accepts and the canonical width each one declares.
MESH_KINDS = {"nphm": NPHM_CANONICAL_DIMS, "flame": SPATIAL_DIMS}


#: zlib level of the mesh files: on meshes (float coordinates, int faces) level 1 writes files within
#: ~1% of the size of ``np.savez_compressed``'s level 6 in a third of the CPU (the synthetic head:
#: 12 instead of 32 ms per frame, 18.6 of them the faces at level 6).
NPZ_LEVEL = 1


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """A compressed ``.npz`` (what ``np.load`` reads: one ``<name>.npy`` member per array, the layout
    of ``np.savez_compressed``) deflated at :data:`NPZ_LEVEL`, through :func:`common.io.atomic_write_bytes`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=NPZ_LEVEL) as z:
        for name, array in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------
# Cameras


def _json_type(value: object) -> str:
    """JSON's name for the type of a parsed value (for messages about the wrong kind of value)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


#: Tolerance of the rigid-transform check of world_2_cam (calibrations are stored as floats).
RIGID_TOL = 1e-3


def _extrinsics_problem(W: np.ndarray) -> str | None:
    """Why a 4x4 world_2_cam is not a rigid transform (rotation + translation), else None."""
    if not np.allclose(W[3], [0, 0, 0, 1], atol=RIGID_TOL):
        return f"world_2_cam's last row must be [0, 0, 0, 1], got {W[3].tolist()}"
    R = W[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=RIGID_TOL) or np.linalg.det(R) < 0:
        return ("world_2_cam's upper-left 3x3 is not a rotation (orthonormal, determinant +1; "
                f"determinant {np.linalg.det(R):.4g})")
    return None


def _intrinsics_problem(K: np.ndarray) -> str | None:
    """Why a 3x3 intrinsics matrix is not a pinhole camera matrix, else None."""
    if not np.allclose(K[2], [0, 0, 1]) or K[1, 0] != 0:
        return f"intrinsics must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}"
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        return f"focal lengths must be positive, got fx={K[0, 0]:g}, fy={K[1, 1]:g}"
    return None


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in the OpenCV convention.

    `world_to_cam` maps world points to camera coordinates with x right, y down and
    z forward (the NeRSemble `world_2_cam` matrix). `K` maps camera coordinates to
    pixels; the centre of the pixel in row `i`, column `j` is at (u, v) = (j, i).
    """

    serial: str
    K: np.ndarray  # (3, 3) float64
    world_to_cam: np.ndarray  # (4, 4) float64
    width: int
    height: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", np.asarray(self.K, dtype=np.float64).reshape(3, 3))
        object.__setattr__(self, "world_to_cam", np.asarray(self.world_to_cam, dtype=np.float64).reshape(4, 4))

    @property
    def position(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        R, t = self.world_to_cam[:3, :3], self.world_to_cam[:3, 3]
        return -R.T @ t

    def resized(self, width: int, height: int) -> "Camera":
        """The same camera for an image resized to (width, height)."""
        sx, sy = width / self.width, height / self.height
        K = self.K.copy()
        # Pixel centres sit at integer coordinates: scale about the -0.5 corner.
        K[0, 0] *= sx
        K[0, 1] *= sx  # skew: the x pixel coordinate's share of y / z
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 1] *= sy
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return Camera(self.serial, K, self.world_to_cam, width, height)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Project world points (N, 3) to pixel coordinates (N, 2)."""
        cam = points @ self.world_to_cam[:3, :3].T + self.world_to_cam[:3, 3]
        uvw = cam @ self.K.T
        return uvw[:, :2] / uvw[:, 2:3]


@dataclass(frozen=True)
class Calibration:
    """All cameras of one person's capture, keyed by serial, in a fixed order."""

    cameras: dict[str, Camera]

    @property
    def serials(self) -> list[str]:
        return list(self.cameras)

    def to_json(self) -> dict:
        return {
            "world_2_cam": {s: c.world_to_cam.tolist() for s, c in self.cameras.items()},
            "intrinsics": {s: c.K.tolist() for s, c in self.cameras.items()},
            "image_size": {s: [c.width, c.height] for s, c in self.cameras.items()},
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @staticmethod
    def load(path: Path, image_size: tuple[int, int] | None = None) -> "Calibration":
        """Read `camera_params.json`.

        NeRSemble stores one shared 3x3 `intrinsics` and no image size; this contract
        also accepts per-serial intrinsics and an `image_size` map ([width, height]).
        Without `image_size` in the file, `image_size` must be passed (the ingest reads
        it off the first image).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(path, "camera calibration file is missing") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"unreadable camera calibration: {e}") from None
        if not isinstance(raw, dict):
            raise DataError(path, f"expected a JSON object with keys 'world_2_cam' and 'intrinsics', "
                                  f"got a JSON {_json_type(raw)}")
        if "world_2_cam" not in raw or "intrinsics" not in raw:
            raise DataError(path, "expected keys 'world_2_cam' and 'intrinsics'")
        w2c, intr = raw["world_2_cam"], raw["intrinsics"]
        if not isinstance(w2c, dict):
            raise DataError(path, f"world_2_cam must be an object mapping camera serial -> 4x4 matrix, "
                                  f"got a JSON {_json_type(w2c)}")
        if not isinstance(intr, (dict, list)):
            raise DataError(path, f"intrinsics must be one 3x3 matrix or an object serial -> 3x3, "
                                  f"got a JSON {_json_type(intr)}")
        sizes = raw.get("image_size", {})
        if not isinstance(sizes, dict):
            raise DataError(path, f"image_size must be an object mapping camera serial -> [width, height], "
                                  f"got a JSON {_json_type(sizes)}")
        cameras: dict[str, Camera] = {}
        for serial in sorted(w2c):
            if not SERIAL_RE.match(serial):
                raise DataError(path, f"world_2_cam: camera serial {serial!r} must be letters, digits, '_' and '-' "
                                      "(it ends the shards' sample names, which are split at the first dot)")
            if isinstance(intr, dict) and serial not in intr:
                raise DataError(path, f"camera {serial} has extrinsics but no intrinsics")
            K = intr[serial] if isinstance(intr, dict) else intr
            size = sizes.get(serial, image_size)
            if size is None:
                raise DataError(path, f"camera {serial}: no image_size in the file and none given")
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size)):
                raise DataError(path, f"image_size of camera {serial} must be [width, height] as two positive "
                                      f"integers, got {size!r}")
            try:
                W = np.asarray(w2c[serial], dtype=np.float64)
                Km = np.asarray(K, dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise DataError(path, f"camera {serial}: non-numeric matrix ({e})") from None
            if W.shape != (4, 4) or Km.shape != (3, 3):
                raise DataError(path, f"camera {serial}: world_2_cam must be 4x4 and intrinsics 3x3, "
                                      f"got {W.shape} and {Km.shape}")
            if not (np.isfinite(W).all() and np.isfinite(Km).all()):
                raise DataError(path, f"camera {serial}: non-finite calibration values")
            problem = _extrinsics_problem(W) or _intrinsics_problem(Km)
            if problem:
                raise DataError(path, f"camera {serial}: {problem}")
            # the last row within tolerance of [0, 0, 1] (float noise of a calibration tool) made exact, as the
            # rasterizers need it (w == camera z); dividing by K[2, 2] leaves the projection as it was
            Km = Km / Km[2, 2]
            Km[2, :2] = 0.0
            cameras[serial] = Camera(serial, Km, W, int(size[0]), int(size[1]))
        if not cameras:
            raise DataError(path, "no cameras in calibration")
        return Calibration(cameras)


# ----------------------------------------------------------------------------------------
# Meshes and tracking


@dataclass(frozen=True)
class TrackingMeta:
    """What the tracker declares about its meshes (tracking/meta.json)."""

    expression_dim: int
    mesh_kind: str = "nphm"  # "nphm": 3 spatial + 2 ambient canonical dims; "flame": 3 (template positions)

    @property
    def canonical_dim(self) -> int:
        return MESH_KINDS[self.mesh_kind]

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"expression_dim": self.expression_dim, "mesh_kind": self.mesh_kind,
                                 "canonical_dim": self.canonical_dim})

    @staticmethod
    def load(path: Path) -> "TrackingMeta":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(path, "tracking meta file is missing") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"unreadable tracking meta: {e}") from None
        if not isinstance(raw, dict):
            raise DataError(path, f"expected a JSON object with 'expression_dim' and 'mesh_kind', "
                                  f"got a JSON {_json_type(raw)}")
        kind = raw.get("mesh_kind", "nphm")
        if not isinstance(kind, str) or kind not in MESH_KINDS:
            raise DataError(path, f"mesh_kind must be one of {sorted(MESH_KINDS)}, got {kind!r}")
        dim = raw.get("expression_dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise DataError(path, f"expression_dim must be a positive integer, got {dim!r}")
        return TrackingMeta(expression_dim=dim, mesh_kind=kind)


@dataclass
class MeshFrame:
    """One fitted mesh: world-space vertices, faces, canonical coords, expression code."""

    vertices: np.ndarray  # (V, 3) float32, world space
    faces: np.ndarray  # (F, 3) int32, indices into vertices
    canonical: np.ndarray  # (V, canonical_dim) float32
    expression: np.ndarray  # (expression_dim,) float32

    def save(self, path: Path) -> None:
        atomic_save_npz(path, vertices=self.vertices.astype(np.float32), faces=self.faces.astype(np.int32),
                        canonical=self.canonical.astype(np.float32), expression=self.expression.astype(np.float32))

    @staticmethod
    def load(path: Path, data: bytes | None = None) -> "MeshFrame":
        """The mesh of the file at ``path``, or of ``data``, its bytes already read (the ingest hashes them); a
        DataError naming ``path`` when it is missing or does not read."""
        path = Path(path)
        try:
            with np.load(path if data is None else io.BytesIO(data)) as z:
                arrays = {k: z[k] for k in ("vertices", "faces", "canonical", "expression")}
        except FileNotFoundError:
            raise DataError(path, "mesh file is missing") from None
        except KeyError as e:
            raise DataError(path, f"mesh file lacks array {e}") from None
        except Exception as e:  # zipfile / pickle / format errors all mean "unreadable"
            raise DataError(path, f"unreadable mesh file: {e}") from None
        return MeshFrame(**arrays)

    def validate(self, path: Path, meta: TrackingMeta) -> None:
        """Raise DataError naming `path` if this mesh breaks the contract."""
        v, f, c, e = self.vertices, self.faces, self.canonical, self.expression
        if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
            raise DataError(path, f"vertices must have shape (V, 3) with V > 0, got {v.shape}")
        if not _finite32(v).all():
            bad = int((~_finite32(v)).any(axis=1).sum())
            raise DataError(path, f"{bad} vertices are NaN, inf or beyond float32's range")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
            raise DataError(path, f"faces must have shape (F, 3) with F > 0, got {f.shape}")
        if not np.issubdtype(f.dtype, np.integer):
            raise DataError(path, f"faces must be integer indices, got dtype {f.dtype}")
        if f.min() < 0 or f.max() >= len(v):
            raise DataError(path, f"face indices out of range [0, {len(v)}): min {f.min()}, max {f.max()}")
        if c.shape != (len(v), meta.canonical_dim):
            raise DataError(path, f"canonical coords must have shape ({len(v)}, {meta.canonical_dim}) for "
                                  f"mesh_kind {meta.mesh_kind!r}, got {c.shape}")
        if not _finite32(c).all():
            raise DataError(path, "canonical coordinates contain NaN, inf or values beyond float32's range")
        if e.shape != (meta.expression_dim,):
            raise DataError(path, f"expression code must have dimension {meta.expression_dim} (tracking/meta.json), "
                                  f"got shape {e.shape}")
        if not _finite32(e).all():
            raise DataError(path, "expression code contains NaN, inf or values beyond float32's range")


def _finite32(a: np.ndarray) -> np.ndarray:
    """Where `a` stays finite as float32, the dtype it is stored and trained in (a finite float64 of 1e39 does not)."""
    with np.errstate(over="ignore"):
        return np.isfinite(np.asarray(a).astype(np.float32, copy=False))


# ----------------------------------------------------------------------------------------
# Paths


FRAME_FMT = "frame_{:05d}"


def parse_frame_name(name: str) -> int | None:
    """The timestep of a `frame_<t:05d>` name, or None when `name` is not exactly that form."""
    digits = name[len("frame_"):]
    if not name.startswith("frame_") or not digits.isascii() or not digits.isdigit():
        return None
    t = int(digits)
    return t if FRAME_FMT.format(t) == name else None


@dataclass(frozen=True)
class PersonCapture:
    """Paths of one person's capture under a capture root."""

    root: Path
    person: str

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.person

    @property
    def calibration_path(self) -> Path:
        return self.dir / "calibration" / "camera_params.json"

    @property
    def tracking_meta_path(self) -> Path:
        return self.dir / "tracking" / "meta.json"

    def sequences(self) -> list[str]:
        seq_dir = self.dir / "sequences"
        if not seq_dir.is_dir():
            raise DataError(seq_dir, "sequences folder is missing")
        names = sorted(p.name for p in seq_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in names:  # it goes into the store, sample keys and digests, all UTF-8
            try:
                name.encode()
            except UnicodeEncodeError:
                raise DataError(seq_dir, f"sequence folder {ascii(name)}: its name is not valid UTF-8 (a name in "
                                         "another system's encoding): rename it and its tracking folder") from None
        return names

    def timesteps_dir(self, seq: str) -> Path:
        return self.dir / "sequences" / seq / "timesteps"

    def timesteps(self, seq: str) -> list[int]:
        """Timesteps of a sequence's frame folders; any other entry (a mis-named folder, a stray
        file) is an error, since it would otherwise be ignored silently."""
        d = self.timesteps_dir(seq)
        if not d.is_dir():
            raise DataError(d, "timesteps folder is missing")
        out = []
        for p in d.iterdir():
            if p.name.startswith("."):
                continue
            t = parse_frame_name(p.name)
            if t is None or not p.is_dir():
                raise DataError(p, "unexpected entry: the timesteps folder holds only frame folders named "
                                   "frame_<timestep, 5+ digits> (e.g. frame_00042)")
            out.append(t)
        return sorted(out)

    def image_path(self, seq: str, t: int, serial: str) -> Path:
        return self.timesteps_dir(seq) / FRAME_FMT.format(t) / "images" / f"cam_{serial}.png"

    def alpha_path(self, seq: str, t: int, serial: str) -> Path:
        return self.timesteps_dir(seq) / FRAME_FMT.format(t) / "alpha_map" / f"cam_{serial}.png"

    def mesh_dir(self, seq: str) -> Path:
        return self.dir / "tracking" / seq

    def mesh_path(self, seq: str, t: int) -> Path:
        return self.mesh_dir(seq) / (FRAME_FMT.format(t) + ".npz")

    def mesh_timesteps(self, seq: str) -> list[int]:
        d = self.mesh_dir(seq)
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            if p.name.startswith(".") or not p.name.endswith(".npz"):
                continue
            t = parse_frame_name(p.stem)
            if t is None:
                raise DataError(p, "mesh file name must be frame_<timestep, 5+ digits>.npz (e.g. frame_00042.npz)")
            out.append(t)
        return sorted(out)

    def image_serials(self, seq: str, t: int) -> list[str]:
        d = self.timesteps_dir(seq) / FRAME_FMT.format(t) / "images"
        if not d.is_dir():
            return []
        return sorted(p.stem[len("cam_"):] for p in d.glob("cam_*.png"))


def list_persons(root: Path) -> list[str]:
    """Person folders under a capture root (those with a calibration file; not dot-folders, where a writer
    builds a person before swapping it in). A folder whose name is no person id (a copy, ``000 copy``) is
    skipped with a warning naming it: it would otherwise stop every other person's run where its name is
    first used as one."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "capture root does not exist")
    persons = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not (p / "calibration" / "camera_params.json").is_file():
            continue
        if (why := person_id_problem(p.name)) is not None:
            warnings.warn(f"{p}: skipped: {why}", RuntimeWarning, stacklevel=2)
            continue
        persons.append(p.name)
    return persons


def find_persons(root: Path) -> list[str]:
    """`list_persons`, but finding none is an error: "nothing to do because nothing was found"
    must not pass for success."""
    persons = list_persons(root)
    if not persons:
        raise DataError(root, "no person folders (<person>/calibration/camera_params.json) under the capture root")
    return persons


def iter_images(capture: PersonCapture, seq: str, serials: list[str]) -> Iterator[tuple[int, str, Path]]:
    for t in capture.timesteps(seq):
        for s in serials:
            yield t, s, capture.image_path(seq, t, s)
