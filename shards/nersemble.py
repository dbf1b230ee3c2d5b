"""Convert a NeRSemble download plus per-frame tracking output into the project's capture layout.

Inputs (what the user provides)::

    <nersemble>/<id>/calibration/camera_params.json           NeRSemble's (shared intrinsics, world_2_cam)
    <nersemble>/<id>/sequences/<SEQ>/timesteps/frame_XXXXX/<image_folder>/cam_<serial>.jpg|png
    <nersemble>/<id>/sequences/<SEQ>/timesteps/frame_XXXXX/alpha_map/cam_<serial>.png
    <tracking>/<id>/meta.json                                 {"mesh_kind": "nphm" | "flame", "expression_dim": D}
    <tracking>/<id>/<SEQ>/frame_XXXXX.npz                     one fitted mesh per kept timestep

A tracking ``.npz`` holds ``vertices`` (V, 3) posed, in the calibration's world frame, and
``faces`` (F, 3) (or one ``<tracking>/<id>/faces.npy`` shared by every frame, as FLAME's fixed
topology), plus

* ``mesh_kind: nphm`` (NPHM / MonoNPHM): ``canonical`` (V, 5), the canonical point of each vertex
  (3 spatial + 2 ambient dims, from the backward deformation), and ``expression`` (D,) (NPHM 200 +
  6 eye parameters = 206, MonoNPHM 100);
* ``mesh_kind: flame``: ``template_vertices`` (V, 3) (the canonical positions) and ``expression``
  (the expression parameters), optionally ``jaw_pose`` (3) and ``eyes_pose`` (6), which are
  appended to the code; D is the total length.

Output: the capture layout of ``shards.contract`` (PNG images and alpha maps at the image size
used, per-camera intrinsics scaled to it, tracking ``.npz`` files and ``meta.json``), every
``frame_stride``-th timestep (NeRSemble records at 73 fps; the paper uses every 3rd). Everything
but the image data is checked before a person is written (errors name the file and the field; of the
images, each header and size); a person is written into a fresh folder that replaces its old one whole
once complete, and a person whose output is complete for the same settings is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.io import atomic_directory, read_marker
from common.names import person_id_problem

from .contract import (
    Calibration,
    Camera,
    DataError,
    MeshFrame,
    PersonCapture,
    TrackingMeta,
    atomic_write_bytes,
    atomic_write_json,
    parse_frame_name,
)

DONE_MARKER = "nersemble_conversion.json"


@dataclass
class ConvertConfig:
    """Where the download and the tracking are, and how to convert them."""

    nersemble: Path = Path("nersemble")
    """Root of the NeRSemble download (one folder per participant id)."""
    tracking: Path = Path("tracking")
    """Root of the tracking output: `<tracking>/<id>/meta.json` and `<tracking>/<id>/<SEQ>/frame_XXXXX.npz`."""
    out: Path = Path("data/captures")
    """Capture root to write (the input of jobs/ingest.py)."""
    persons: str = "all"
    """'all' (every id with tracking) or comma-separated participant ids."""
    sequences: str = "all"
    """'all' (every sequence with tracking) or comma-separated sequence names."""
    image_folder: str = "images-2x"
    """Image folder inside each timestep (NeRSemble: images-2x, half resolution JPEGs)."""
    frame_stride: int = 3
    """Keep timesteps whose number is a multiple of this (the paper: every 3rd of 73 fps)."""
    intrinsics_size: tuple[int, int] = (2200, 3208)
    """Image size (width, height) the calibration's intrinsics refer to (NeRSemble: the full
    2200x3208 frames); they are scaled to the size of the images converted."""

    def __post_init__(self) -> None:
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        # 0 divided by zero when the images' aspect was compared (every participant 'failed: ZeroDivisionError'), a
        # negative size gave negative intrinsics
        if len(self.intrinsics_size) != 2 or min(self.intrinsics_size) < 1:
            raise ValueError(f"--convert.intrinsics-size: the width and height the intrinsics are given for must "
                             f"be >= 1, got {' '.join(map(str, self.intrinsics_size))}")
        for pid in _names(self.persons) or []:  # an id becomes the output folder's name
            if (why := person_id_problem(pid)) is not None:
                raise ValueError(f"--convert.persons: {why}")


def _names(spec: str) -> list[str] | None:
    return None if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]


def list_participants(config: ConvertConfig) -> list[str]:
    """Participant ids to convert: those with a tracking folder (and a download)."""
    wanted = _names(config.persons)
    root = Path(config.tracking)
    if not root.is_dir():
        raise DataError(root, "tracking root does not exist")
    if wanted is None:
        ids = []
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") or not (p / "meta.json").is_file():
                continue
            if (why := person_id_problem(p.name)) is not None:  # a copy ('017 copy'): the others go on
                warnings.warn(f"{p}: skipped: {why}", RuntimeWarning, stacklevel=2)
                continue
            ids.append(p.name)
    else:
        ids = wanted
    if not ids:
        raise DataError(root, "no participant has tracking output (<tracking>/<id>/meta.json)")
    return ids


#: PIL modes of an alpha map and the factor to 8 bits: 8-bit, 1-bit and 16-bit grey levels (`convert("L")` clips
#: 16-bit values instead of scaling them: a 50% matte became opaque).
ALPHA_MODES = {"L": 1, "1": 1, "I;16": 257, "I;16B": 257, "I;16L": 257, "I": 257}


def _alpha_header(path: Path) -> tuple[int, int]:
    """The size of the alpha map at ``path``, whose header must read and whose mode must be a grey level."""
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except OSError as e:
        raise DataError(path, f"unreadable alpha map: {e}") from None
    if mode not in ALPHA_MODES:
        raise DataError(path, f"alpha map has PIL mode {mode}; a grey-level map (8 or 16 bits: "
                              f"{', '.join(ALPHA_MODES)}) is needed")
    return size


def _alpha(path: Path) -> Image.Image:
    """The alpha map at ``path`` as 8-bit grey levels (16-bit ones scaled, not clipped)."""
    try:
        with Image.open(path) as im:
            scale = ALPHA_MODES.get(im.mode)
            if scale is None:
                raise DataError(path, f"alpha map has PIL mode {im.mode}; a grey-level map is needed")
            if scale == 1:
                return im.convert("L")
            values = np.asarray(im, dtype=np.float64) / scale
    except OSError as e:
        raise DataError(path, f"unreadable alpha map: {e}") from None
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(path, "image is missing") from None
    except OSError as e:
        raise DataError(path, f"unreadable image: {e}") from None


def same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether ``other`` (width, height) is ``size`` scaled by one factor, to within a pixel (a width or height
    rounded when the images were made smaller)."""
    return abs(size[1] * other[0] / size[0] - other[1]) <= 1.0


def scaled_calibration(path: Path, image_size: tuple[int, int], intrinsics_size: tuple[int, int]) -> Calibration:
    """NeRSemble's calibration with the intrinsics scaled from `intrinsics_size` to `image_size`, which must have
    its aspect ratio: other sizes (the width and height swapped, cropped images) would give every camera
    non-square pixels without a word."""
    if not same_aspect(intrinsics_size, image_size):
        raise DataError(path, f"the images are {image_size[0]}x{image_size[1]}, not {intrinsics_size[0]}x"
                              f"{intrinsics_size[1]} (--convert.intrinsics-size, the size the intrinsics are "
                              "given for) scaled by one factor: cropped images, or width and height swapped?")
    full = Calibration.load(path, image_size=intrinsics_size)
    return Calibration({s: Camera(c.serial, c.K, c.world_to_cam, *intrinsics_size).resized(*image_size)
                        for s, c in full.cameras.items()})


def _load_tracking(path: Path, meta: TrackingMeta, shared_faces: np.ndarray | None) -> MeshFrame:
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(path, "tracking file is missing for a kept timestep") from None
    except Exception as e:
        raise DataError(path, f"unreadable tracking file: {e}") from None
    faces = data.get("faces", shared_faces)
    need = ["vertices", "expression"] + (["canonical"] if meta.mesh_kind == "nphm" else ["template_vertices"])
    missing = [k for k in need if k not in data] + (["faces"] if faces is None else [])
    if missing:
        raise DataError(path, f"tracking file lacks {', '.join(missing)} (mesh_kind {meta.mesh_kind!r})")
    if meta.mesh_kind == "nphm":
        canonical, expression = data["canonical"], data["expression"].reshape(-1)
    else:
        canonical = data["template_vertices"]
        expression = np.concatenate([data["expression"].reshape(-1)] +
                                    [data[k].reshape(-1) for k in ("jaw_pose", "eyes_pose") if k in data])
    frame = MeshFrame(np.asarray(data["vertices"], np.float32), np.asarray(faces), np.asarray(canonical, np.float32),
                      np.asarray(expression, np.float32))
    frame.validate(path, meta)
    return frame


@dataclass
class _Frame:
    sequence: str
    timestep: int
    images: dict[str, Path]
    alphas: dict[str, Path]
    tracking: Path


def plan_person(config: ConvertConfig, pid: str) -> tuple[TrackingMeta, Calibration, list[_Frame]]:
    """Reads and checks everything of one participant (nothing is written)."""
    src = Path(config.nersemble) / pid
    trk = Path(config.tracking) / pid
    if not src.is_dir():
        raise DataError(src, f"participant {pid} is not in the NeRSemble download")
    meta = TrackingMeta.load(trk / "meta.json")
    wanted = _names(config.sequences)
    seqs = sorted(p.name for p in trk.iterdir() if p.is_dir() and not p.name.startswith(".")) if wanted is None \
        else wanted
    frames: list[_Frame] = []
    alpha_sizes: dict[Path, tuple[int, int]] = {}
    serials: list[str] | None = None
    for seq in seqs:
        tdir = src / "sequences" / seq / "timesteps"
        if not tdir.is_dir():
            raise DataError(tdir, f"sequence {seq} has tracking but is not in the download")
        steps = sorted(t for t in (parse_frame_name(p.name) for p in tdir.iterdir()) if t is not None)
        for t in (t for t in steps if t % config.frame_stride == 0):
            fdir = tdir / f"frame_{t:05d}"
            images = {p.stem.removeprefix("cam_"): p for p in sorted((fdir / config.image_folder).glob("cam_*"))
                      if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
            if not images:
                raise DataError(fdir / config.image_folder, "no cam_<serial>.jpg|png images")
            if serials is None:
                serials = sorted(images)
            elif sorted(images) != serials:
                raise DataError(fdir / config.image_folder, f"cameras {sorted(images)} differ from the first "
                                                            f"timestep's {serials}")
            alphas = {s: fdir / "alpha_map" / f"cam_{s}.png" for s in images}
            for s, a in alphas.items():
                if not a.is_file():
                    raise DataError(a, f"alpha map of camera {s} is missing")
                # its header must read and be a grey-level map; it is resized to the image size
                alpha_sizes[a] = _alpha_header(a)
            frames.append(_Frame(seq, t, images, alphas, trk / seq / f"frame_{t:05d}.npz"))
    if not frames:
        raise DataError(trk, f"no timestep (every {config.frame_stride}th) with tracking in sequences {seqs}")
    size = _image_size(next(iter(frames[0].images.values())))
    for f in frames:  # every image's header, before anything is written (decoding them all would double the cost)
        for path in f.images.values():
            if _image_size(path) != size:
                raise DataError(path, f"image size {_image_size(path)} differs from the first image's {size}")
    for path, alpha_size in alpha_sizes.items():
        if not same_aspect(size, alpha_size):
            raise DataError(path, f"alpha map size {alpha_size} is not the images' {size} scaled by one factor")
    calibration = scaled_calibration(src / "calibration" / "camera_params.json", size, config.intrinsics_size)
    missing = [s for s in serials if s not in calibration.cameras]
    if missing:
        raise DataError(src / "calibration" / "camera_params.json", f"no calibration for cameras {missing}")
    calibration = Calibration({s: calibration.cameras[s] for s in serials})
    return meta, calibration, frames


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def convert_person(config: ConvertConfig, pid: str, progress: bool = True) -> str:
    """Converts one participant; returns 'converted' or 'skipped' (already complete)."""
    from tqdm import tqdm

    capture = PersonCapture(Path(config.out), pid)
    meta, calibration, frames = plan_person(config, pid)
    inputs = _inputs_digest(config, pid, frames)
    spec = json.loads(json.dumps({"config": asdict(config), "person": pid, "inputs": inputs}, default=str))
    marker = capture.dir / DONE_MARKER
    if read_marker(marker) == spec:
        return "skipped"
    faces = _shared_faces(config, pid)  # one topology for every frame: read once
    meshes = [_load_tracking(f.tracking, meta, faces) for f in frames]  # all checked before writing
    # Written into a fresh folder that replaces the person's whole (the marker last, inside it): a failure part way
    # leaves the old output, never half of the new, and nothing of other settings (timesteps, sequences) stays.
    with atomic_directory(capture.dir) as tmp:
        out = PersonCapture(tmp.parent, tmp.name)
        calibration.save(out.calibration_path)
        meta.save(out.tracking_meta_path)
        for f, mesh in tqdm(list(zip(frames, meshes)), desc=f"convert {pid}", unit="frame", disable=not progress):
            for serial, path in f.images.items():
                atomic_write_bytes(out.image_path(f.sequence, f.timestep, serial), _png(_decoded(path, "RGB")))
                a = _alpha(f.alphas[serial])
                image_size = (calibration.cameras[serial].width, calibration.cameras[serial].height)
                if a.size != image_size:  # alpha maps may come at another resolution
                    a = a.resize(image_size, Image.BILINEAR)
                atomic_write_bytes(out.alpha_path(f.sequence, f.timestep, serial), _png(a))
            mesh.save(out.mesh_path(f.sequence, f.timestep))
        atomic_write_json(tmp / DONE_MARKER, spec)
    return "converted"


def _inputs_digest(config: ConvertConfig, pid: str, frames: list[_Frame]) -> str:
    """sha256 over the name, size and mtime of every file the conversion reads: a re-run tracker or a replaced
    download converts again instead of keeping the old output as up to date."""
    src, trk = Path(config.nersemble) / pid, Path(config.tracking) / pid
    files = [src / "calibration" / "camera_params.json", trk / "meta.json", trk / "faces.npy"]
    files += [p for f in frames for p in (*f.images.values(), *f.alphas.values(), f.tracking)]
    h = hashlib.sha256()
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:  # faces.npy is optional
            h.update(f"{path}\0absent\n".encode())
            continue
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _shared_faces(config: ConvertConfig, pid: str) -> np.ndarray | None:
    """``<tracking>/<id>/faces.npy`` (the topology every frame shares) when there is one."""
    path = Path(config.tracking) / pid / "faces.npy"
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(path, f"unreadable faces array: {e}") from None


def _decoded(path: Path, mode: str) -> Image.Image:
    """The whole image at `path` in `mode`; a file that does not decode (truncated, corrupt) names itself."""
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except OSError as e:
        raise DataError(path, f"unreadable image: {e}") from None
