"""Validate a person's capture and write it into one zarr store (see `shards.store`).

The ingest reads every mesh and checks every image before it writes anything, so a
broken capture fails with a `DataError` naming the file and the problem and leaves
no store behind. The store is built under a temporary name and renamed into place.
A fingerprint of the inputs (paths, sizes, mtimes) and of the split settings makes
re-runs idempotent: an up-to-date store is left untouched.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from common.fingerprint import walk_tree
from common.io import DataError, atomic_directory

from .contract import Calibration, MeshFrame, PersonCapture, TrackingMeta
from .store import FORMAT_VERSION, STORED_CANONICAL_DIMS, PersonStore

#: Bumped whenever the ingest starts refusing captures it used to accept (part of the fingerprint, so a store
#: ingested before is validated again on the next run instead of being taken as up to date).
#: 1: alpha maps with no foreground or with values 0/1 are refused.
VALIDATION_VERSION = 1


@dataclass
class IngestConfig:
    """How captures are split and checked."""

    held_out_sequences: int = 2
    """Number of sequences held out for evaluation: the last ones in sorted order (the paper holds out 2); at
    least 1: they are the test_seq split that the base's VAE and the self-reenactment evaluation are scored on."""
    held_out_camera: str = "222200037"
    """Serial of the camera held out for novel-view evaluation (NeRSemble's frontal camera)."""
    io_threads: int = 4
    """Threads that decode images while validating (PNG decoding releases the GIL)."""

    def __post_init__(self) -> None:
        if self.held_out_sequences < 1:  # 0 left the test_seq split empty: pretrain_base and the evaluation failed
            raise ValueError(f"held_out_sequences must be >= 1 (the held-out sequences are the test_seq split the "
                             f"base and the evaluation score on), got {self.held_out_sequences}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")


@dataclass
class IngestResult:
    person: str
    path: Path
    frames: int
    images: int
    skipped: bool  # True when an up-to-date store already existed


def _fingerprint(capture: PersonCapture, config: IngestConfig) -> str:
    """Digest of everything the store depends on: the store format, the checks it passed, the split settings (not
    ``io_threads``, which changes how fast, not what), the (resolved) capture root the store's image
    paths point into, and the name, size and mtime of every file and the name of every folder of the
    person's capture (an empty or mis-named folder added later makes the store stale, so the re-run
    validates it)."""
    split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split,
                         "root": str(capture.root)}, sort_keys=True).encode())
    for sub in ("calibration", "tracking", "sequences"):
        base = capture.dir / sub
        for dirpath, dirnames, filenames in walk_tree(base):  # linked folders too: their files are the capture's
            dirnames.sort()
            h.update(f"{Path(dirpath).relative_to(capture.dir)}/\n".encode())
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(capture.dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


#: PIL modes the contract accepts: RGB images, 8-bit (or 1-bit) alpha maps.
IMAGE_MODES = {"image": ("RGB",), "alpha map": ("L", "1")}


def alpha_value_problem(largest: int) -> str | None:
    """What is wrong with an alpha map (8-bit, 0..255 once a 1-bit map is converted) whose largest value is
    ``largest``, or None: one with no foreground pixel at all (a failed matte, or a frame the person is not in)
    would be trained on as an image of nothing, and a binary mask saved as 0/1 instead of 0/255 mattes the whole
    target onto the background (1/255 is all but transparent). A faint 0..255 matte whose largest value is 1
    cannot be told apart from a 0/1 mask, so it is refused too (like `avatars.evaluation.metrics` does)."""
    if largest == 0:
        return "alpha map is all zero: no pixel is foreground (a failed matte, or the person is not in the image)"
    if largest == 1:
        return ("alpha map is 8-bit with values 0/1: 8-bit alpha maps are 0..255 (255 = foreground); "
                "save a binary mask multiplied by 255, or as a 1-bit image")
    return None


def _check_image(path: Path, alpha_path: Path, expected_size: tuple[int, int]) -> None:
    """Decode an image and its alpha map fully; raise DataError on any problem (also an alpha map's values, see
    `alpha_value_problem`: read from the pixels decoded here, no second decode)."""
    for p, what in ((path, "image"), (alpha_path, "alpha map")):
        if not p.is_file():
            raise DataError(p, f"{what} is missing")
        try:
            with Image.open(p) as im:
                im.load()
                size, mode = im.size, im.mode
                # a 1-bit map's extrema are 0/255, an 8-bit one's its values
                largest = im.getextrema()[1] if what == "alpha map" and mode in IMAGE_MODES[what] else None
        except Exception as e:
            raise DataError(p, f"unreadable {what}: {e}") from None
        if mode not in IMAGE_MODES[what]:
            kind = "grayscale " if what == "image" and mode in ("L", "LA", "1", "I", "I;16", "F") else ""
            raise DataError(p, f"{kind}{what} has PIL mode {mode}; the contract needs mode "
                               f"{' or '.join(IMAGE_MODES[what])}")
        if size != expected_size:
            raise DataError(p, f"{what} size {size[0]}x{size[1]} does not match the camera's "
                               f"{expected_size[0]}x{expected_size[1]} (calibration or first image)")
        problem = alpha_value_problem(largest) if largest is not None else None
        if problem:
            raise DataError(p, problem)


def _first_image_size(capture: PersonCapture, seq: str, t: int, serial: str) -> tuple[int, int]:
    """Size of one image: the reference when the calibration does not state image sizes (NeRSemble)."""
    p = capture.image_path(seq, t, serial)
    try:
        with Image.open(p) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(p, "image is missing") from None
    except Exception as e:
        raise DataError(p, f"unreadable image: {e}") from None


def validate_person(capture: PersonCapture, config: IngestConfig):
    """Check the whole capture; returns (calibration, meta, sequences, frames, meshes)."""
    meta = TrackingMeta.load(capture.tracking_meta_path)
    sequences = capture.sequences()
    if not sequences:
        raise DataError(capture.dir / "sequences", "no sequences")
    if config.held_out_sequences >= len(sequences):
        raise DataError(capture.dir / "sequences", f"{len(sequences)} sequences cannot hold out "
                                                   f"{config.held_out_sequences} and still leave training data")
    try:
        raw = json.loads(capture.calibration_path.read_text())
    except (OSError, ValueError):
        raw = {}  # Calibration.load below reports the problem with the file named
    size_hint = None
    if isinstance(raw, dict) and "image_size" not in raw and isinstance(raw.get("world_2_cam"), dict) \
            and raw["world_2_cam"]:
        first_serial = sorted(raw["world_2_cam"])[0]
        t0 = capture.timesteps(sequences[0])
        if not t0:
            raise DataError(capture.timesteps_dir(sequences[0]), "no frames")
        size_hint = _first_image_size(capture, sequences[0], t0[0], first_serial)
    calib = Calibration.load(capture.calibration_path, image_size=size_hint)
    serials = calib.serials
    if config.held_out_camera not in calib.cameras:
        raise DataError(capture.calibration_path, f"held-out camera {config.held_out_camera} is not in the calibration "
                                                  f"(cameras: {', '.join(serials)})")
    if serials == [config.held_out_camera]:  # every sample would be test_cam, none train
        raise DataError(capture.calibration_path, f"the only camera is the held-out camera {config.held_out_camera} "
                                                  "(--ingest.held-out-camera): no camera is left to train on")
    frames: list[tuple[int, int]] = []  # (sequence index, timestep)
    meshes: list[MeshFrame] = []
    image_jobs = []
    for si, seq in enumerate(sequences):
        steps = capture.timesteps(seq)
        if not steps:
            raise DataError(capture.timesteps_dir(seq), "sequence has no frames")
        mesh_steps = capture.mesh_timesteps(seq)
        if mesh_steps != steps:
            no_mesh = sorted(set(steps) - set(mesh_steps))
            no_img = sorted(set(mesh_steps) - set(steps))
            raise DataError(capture.mesh_dir(seq),
                            f"mismatched frame counts: {len(mesh_steps)} meshes for {len(steps)} image frames "
                            f"(frames without mesh: {no_mesh[:5]}, meshes without frames: {no_img[:5]})")
        for t in steps:
            present = capture.image_serials(seq, t)
            missing = sorted(set(serials) - set(present))
            extra = sorted(set(present) - set(serials))
            img_dir = capture.image_path(seq, t, "x").parent
            if missing:
                raise DataError(img_dir, f"missing cameras: {', '.join(missing)}")
            if extra:
                raise DataError(img_dir, f"extra cameras not in the calibration: {', '.join(extra)}")
            mesh_path = capture.mesh_path(seq, t)
            mesh = MeshFrame.load(mesh_path)
            mesh.validate(mesh_path, meta)
            meshes.append(mesh)
            frames.append((si, t))
            for s in serials:
                cam = calib.cameras[s]
                size = (cam.width, cam.height)
                image_jobs.append((capture.image_path(seq, t, s), capture.alpha_path(seq, t, s), size))
    with ThreadPoolExecutor(config.io_threads) as pool:
        # list() re-raises the first DataError in submission order.
        list(pool.map(lambda job: _check_image(*job), image_jobs))
    return calib, meta, sequences, frames, meshes, len(image_jobs)


def _write_store(
    path: Path, attrs: dict, calib: Calibration, frames, meshes: list[MeshFrame], held_out: set[int]
) -> None:
    g = zarr.open_group(str(path), mode="w")
    zstd = [zarr.codecs.ZstdCodec(level=3, checksum=True)]  # a changed byte fails the read, not decodes to other data

    def put(name: str, data: np.ndarray, rows: int = 65536) -> None:
        chunks = (min(max(len(data), 1), rows),) + data.shape[1:]
        # every chunk written, also one that holds only the fill value, so a missing file is an incomplete store
        g.create_array(name, data=data, chunks=chunks, compressors=zstd, config={"write_empty_chunks": True})

    cams = list(calib.cameras.values())
    put("cameras/world_2_cam", np.stack([c.world_to_cam for c in cams]))
    put("cameras/intrinsics", np.stack([c.K for c in cams]))
    put("frames/sequence", np.array([f[0] for f in frames], dtype=np.int32))
    put("frames/timestep", np.array([f[1] for f in frames], dtype=np.int32))
    put("frames/held_out", np.array([f[0] in held_out for f in frames], dtype=bool))
    put("frames/expression", np.stack([m.expression for m in meshes]).astype(np.float32))
    nv = np.array([0] + [len(m.vertices) for m in meshes], dtype=np.int64)
    nf = np.array([0] + [len(m.faces) for m in meshes], dtype=np.int64)
    put("meshes/vertex_offset", np.cumsum(nv))
    put("meshes/face_offset", np.cumsum(nf))
    put("meshes/vertices", np.concatenate([m.vertices for m in meshes]).astype(np.float32))
    canon = np.zeros((int(nv.sum()), STORED_CANONICAL_DIMS), dtype=np.float32)
    stacked = np.concatenate([m.canonical for m in meshes]).astype(np.float32)
    canon[:, : stacked.shape[1]] = stacked
    put("meshes/canonical", canon)
    put("meshes/faces", np.concatenate([m.faces for m in meshes]).astype(np.int32))
    g.attrs.update(attrs)  # written last: a store with attrs is complete


def ingest_person(capture_root: Path, person: str, out_dir: Path, config: IngestConfig | None = None,
                  force: bool = False) -> IngestResult:
    """Validate `person` under `capture_root` and write `<out_dir>/<person>.zarr`."""
    config = config or IngestConfig()
    capture = PersonCapture(Path(capture_root).resolve(), person)
    if not capture.dir.is_dir():
        raise DataError(capture.dir, "person folder does not exist")
    out_dir = Path(out_dir)
    final = out_dir / f"{person}.zarr"
    fingerprint = _fingerprint(capture, config)
    if final.exists() and not force:
        try:
            existing = PersonStore(final)
            if existing.attrs.get("fingerprint") == fingerprint:
                samples = existing.num_frames * len(existing.serials)
                return IngestResult(person, final, existing.num_frames, samples, True)
        except DataError:
            pass  # stale or broken store: rebuild it
    calib, meta, sequences, frames, meshes, n_images = validate_person(capture, config)
    held_out = set(range(len(sequences) - config.held_out_sequences, len(sequences)))
    # The conditioning's ranges come from the training frames only: the held-out sequences are test data, and
    # a driver's frames outside the ranges are clipped, whatever was held out.
    train_meshes = [m for (seq, _), m in zip(frames, meshes) if seq not in held_out]
    spatial = np.concatenate([m.canonical[:, :3] for m in train_meshes])
    # FLAME-style meshes have no ambient dims: the store holds zeros for them, and these are their bounds
    ambient = np.concatenate([m.canonical[:, 3:5] if m.canonical.shape[1] > 3 else np.zeros((len(m.canonical), 2))
                              for m in train_meshes])
    first = next(iter(calib.cameras.values()))
    attrs = {
        "person": person,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source_root": str(capture.root),
        "expression_dim": meta.expression_dim,
        "canonical_dim": meta.canonical_dim,
        "mesh_kind": meta.mesh_kind,
        "image_size": [first.width, first.height],
        "serials": calib.serials,
        "sequences": sequences,
        "held_out_sequences": [sequences[i] for i in sorted(held_out)],
        "held_out_camera": config.held_out_camera,
        "canonical_bounds": [spatial.min(0).tolist(), spatial.max(0).tolist()],
        "ambient_bounds": [ambient.min(0).tolist(), ambient.max(0).tolist()],
    }
    sizes = {(c.width, c.height) for c in calib.cameras.values()}
    if len(sizes) != 1:
        raise DataError(capture.calibration_path, f"cameras have different image sizes {sorted(sizes)}; "
                                                  "resize the capture to one size first")
    with atomic_directory(final) as tmp:
        _write_store(tmp, attrs, calib, frames, meshes, held_out)
    return IngestResult(person, final, len(frames), n_images, False)
