"""Validate a person's capture and write it into one zarr store (see `shards.store`).

The ingest streams: each mesh is read, checked and written into the store under a temporary
name before the next is read (memory holds one mesh and a chunk per array, whatever the number
of frames), and the images are decoded and checked meanwhile. The store is renamed into place
only once every mesh and image passed, so a broken capture fails with a `DataError` naming the
file and the problem and leaves no store behind (and an older one as it was).
A fingerprint of the inputs (paths, sizes, mtimes) and of the split settings makes
re-runs idempotent: an up-to-date store is left untouched.

Each file the ingest reads is hashed as it is read (an image or mesh is read once: hashed, then decoded from
memory), and the store records its content identity (:data:`CONTENT`, :class:`ContentHash`): what its data is,
whatever the capture root and the files' mtimes. The stat fingerprint decides whether the ingest runs; the content
identity is what the stages after it key on (the shard spec, the evaluation's data digest), so a capture that is
touched, copied without its mtimes or moved costs a re-ingest and nothing more.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, UnidentifiedImageError

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
    """Threads that decode images while validating (PNG decoding releases the GIL) and that stat the capture's
    files for its fingerprint."""

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


#: The store attribute holding its content identity (:class:`ContentHash`). Stores written before it existed have
#: none: the stages after the ingest then key on the stat fingerprint as they did (`shards.writer._spec_digest`,
#: `cluster.eval_driver.uptodate.data_digest`), so an upgrade rebuilds, retrains and renders nothing again.
CONTENT = "content_sha256"


class ContentHash:
    """A store's content identity, fed as the ingest reads the person's files: every file the ingest reads as the
    line ``<path relative to the person's capture folder>\\0<sha256 of its bytes>\\n``, in two streams in the order
    the ingest reads them whatever its threads: the tracking meta, the calibration and each frame's mesh (frames in
    order), and each frame's images (cameras in order, an image before its alpha map). Not the capture root, the
    files' mtimes or files the ingest does not read: a capture touched, copied without mtimes or moved has the
    identity it had. Two running digests, so memory holds no list of the ~200k files of a real person."""

    def __init__(self) -> None:
        self.inputs, self.images = hashlib.sha256(), hashlib.sha256()

    def add(self, capture: PersonCapture, path: Path, digest: str, image: bool = False) -> None:
        (self.images if image else self.inputs).update(f"{path.relative_to(capture.dir).as_posix()}\0{digest}\n"
                                                       .encode())

    def hexdigest(self, config: IngestConfig) -> str:
        """sha256 over the store format, the checks it passed, the split settings and the two streams' digests."""
        split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
        h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split},
                                      sort_keys=True).encode())
        h.update(f"{self.inputs.hexdigest()}\n{self.images.hexdigest()}\n".encode())
        return h.hexdigest()


def _read_hashed(path: Path) -> tuple[bytes, str]:
    """A file's bytes and their sha256 (hashlib releases the GIL: the image threads hash in parallel)."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


#: Files one thread of the fingerprint stats in one go (a frame folder's images, a sequence's meshes in parts).
_STAT_BATCH = 64


def _fingerprint(capture: PersonCapture, config: IngestConfig) -> str:
    """Digest of everything the store depends on: the store format, the checks it passed, the split settings (not
    ``io_threads``, which changes how fast, not what), the (resolved) capture root the store's image
    paths point into, and the name, size and mtime of every file and the name of every folder of the
    person's capture (an empty or mis-named folder added later makes the store stale, so the re-run
    validates it).

    The folders are walked in order on this thread and their files statted on ``io_threads`` threads (a real
    person has ~200k files: on a network file system one stat after the other takes minutes), a bounded number
    of batches ahead; the digest is fed in walk order, so it is the one a serial walk computes."""
    split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split,
                         "root": str(capture.root)}, sort_keys=True).encode())

    def batches():
        """(the line of a folder or "", files to stat after it) in walk order."""
        for sub in ("calibration", "tracking", "sequences"):
            for dirpath, dirnames, filenames in walk_tree(capture.dir / sub):  # linked folders too: their files
                dirnames.sort()  # are the capture's; sorted in place: the walk goes down in this order
                names = sorted(filenames)
                line = f"{Path(dirpath).relative_to(capture.dir)}/\n"
                for i in range(0, max(len(names), 1), _STAT_BATCH):
                    yield (line if i == 0 else ""), [Path(dirpath) / name for name in names[i:i + _STAT_BATCH]]

    def stat_lines(line: str, paths: list[Path]) -> bytes:
        for p in paths:
            st = os.stat(p)
            line += f"{p.relative_to(capture.dir)}\0{st.st_size}\0{st.st_mtime_ns}\n"
        # a name that is not UTF-8 (another system's encoding) as its bytes: the ingest then names it (valid names
        # encode as before, so stores written before stay up to date)
        return line.encode(errors="surrogateescape")

    with ThreadPoolExecutor(config.io_threads) as pool:
        ahead: deque[Future] = deque()  # batches submitted, in walk order
        walk = batches()
        while True:
            try:
                batch = next(walk, None)
            except OSError:  # an unreadable folder: the error of a file before it comes first, as in a serial walk
                while ahead:
                    ahead.popleft().result()
                raise
            if batch is None:
                break
            ahead.append(pool.submit(stat_lines, *batch))
            if len(ahead) > 4 * config.io_threads:
                h.update(ahead.popleft().result())
        while ahead:
            h.update(ahead.popleft().result())
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


def _check_image(path: Path, alpha_path: Path, expected_size: tuple[int, int]) -> tuple[str, str]:
    """Decode an image and its alpha map fully; raise DataError on any problem (also an alpha map's values, see
    `alpha_value_problem`: read from the pixels decoded here, no second decode). Each file is read once and
    decoded from memory; returns the sha256 of the image's and of the alpha map's bytes."""
    digests = []
    for p, what in ((path, "image"), (alpha_path, "alpha map")):
        if not p.is_file():
            raise DataError(p, f"{what} is missing" if not p.exists() else
                               f"{what} is not a regular file (a folder, a pipe or a device)")
        try:
            data, digest = _read_hashed(p)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size, mode = im.size, im.mode
                # a 1-bit map's extrema are 0/255, an 8-bit one's its values
                largest = im.getextrema()[1] if what == "alpha map" and mode in IMAGE_MODES[what] else None
        except UnidentifiedImageError:  # PIL names the file it opened: here a buffer
            raise DataError(p, f"unreadable {what}: cannot identify image file {str(p)!r}") from None
        except Exception as e:
            raise DataError(p, f"unreadable {what}: {e}") from None
        del data
        digests.append(digest)
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
    return digests[0], digests[1]


def _load_mesh(path: Path) -> tuple[MeshFrame, str]:
    """`MeshFrame.load` of the file read once: the mesh and the sha256 of the file's bytes."""
    try:
        data, digest = _read_hashed(path)
    except FileNotFoundError:
        raise DataError(path, "mesh file is missing") from None
    except OSError as e:
        raise DataError(path, f"unreadable mesh file: {e}") from None
    return MeshFrame.load(path, data), digest


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


def _json_hashed(capture: PersonCapture, path: Path, content: ContentHash | None) -> bytes | None:
    """The bytes of one of the capture's JSON files (None when it does not read: its loader says why), hashed into
    ``content``. Its loader in `shards.contract` reads it again (a few KB)."""
    try:
        data, digest = _read_hashed(path)
    except OSError:
        return None
    if content is not None:
        content.add(capture, path, digest)
    return data


def _check_layout(capture: PersonCapture, config: IngestConfig,
                  content: ContentHash | None = None) -> tuple[TrackingMeta, list[str], Calibration]:
    """The checks before any frame: the tracking meta, the sequences and the calibration (with the held-out ones);
    the two JSON files are hashed into ``content``."""
    _json_hashed(capture, capture.tracking_meta_path, content)
    meta = TrackingMeta.load(capture.tracking_meta_path)
    sequences = capture.sequences()
    if not sequences:
        raise DataError(capture.dir / "sequences", "no sequences")
    if config.held_out_sequences >= len(sequences):
        raise DataError(capture.dir / "sequences", f"{len(sequences)} sequences cannot hold out "
                                                   f"{config.held_out_sequences} and still leave training data")
    try:
        raw = json.loads(_json_hashed(capture, capture.calibration_path, content))
    except (TypeError, ValueError):
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
    return meta, sequences, calib


#: Rows of one chunk of the store's arrays; an array with fewer rows is one chunk of all of them.
CHUNK_ROWS = 65536
#: Chunks an array of the store grows by while it is written (each growth rewrites its metadata).
_GROW_CHUNKS = 64
_ZSTD = dict(level=3, checksum=True)  # a changed byte fails the read, not decodes to other data


class _Column:
    """One array of the store, written as its rows arrive: they are copied into a buffer of one chunk that is written
    when full (rows that fill whole chunks on their own are written straight away), so memory holds at most one chunk
    besides the rows appended, whatever the array's length. An array that never fills a chunk is written at `close`
    as one chunk of all its rows (the chunking it had when the ingest wrote every array at once). Every chunk is
    written, also one that holds only the fill value, so a missing chunk file is an incomplete store."""

    def __init__(self, group: zarr.Group, name: str, dtype, row_shape: tuple[int, ...] = ()):
        self.group, self.name, self.dtype, self.row_shape = group, name, np.dtype(dtype), tuple(row_shape)
        self.buffer = np.empty((0,) + self.row_shape, self.dtype)
        self.buffered = 0  # rows in the buffer
        self.written = 0  # rows in the array: whole chunks until `close`
        self.array = None

    def _create(self, data: np.ndarray | None, rows: int):
        kwargs = dict(data=data) if data is not None else dict(shape=(0,) + self.row_shape, dtype=self.dtype)
        return self.group.create_array(self.name, chunks=(rows,) + self.row_shape,
                                       compressors=[zarr.codecs.ZstdCodec(**_ZSTD)],
                                       config={"write_empty_chunks": True}, **kwargs)

    def append(self, rows) -> None:
        rows = np.asarray(rows).astype(self.dtype, copy=False)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.name}: rows of shape {rows.shape[1:]} appended to rows of {self.row_shape}")
        while len(rows):
            if self.buffered == 0 and len(rows) >= CHUNK_ROWS:  # whole chunks: no copy
                whole = len(rows) // CHUNK_ROWS * CHUNK_ROWS
                self._write(rows[:whole])
                rows = rows[whole:]
                continue
            take = min(len(rows), CHUNK_ROWS - self.buffered)
            end = self.buffered + take
            if end > len(self.buffer):  # grown as needed: a short array holds no chunk of empty rows
                grown = np.empty((min(CHUNK_ROWS, max(2 * len(self.buffer), end)),) + self.row_shape, self.dtype)
                grown[: self.buffered] = self.buffer[: self.buffered]
                self.buffer = grown
            self.buffer[self.buffered:end] = rows[:take]
            self.buffered, rows = end, rows[take:]
            if self.buffered == CHUNK_ROWS:
                self._write(self.buffer)
                self.buffered = 0

    def _write(self, block: np.ndarray) -> None:
        if self.array is None:
            self.array = self._create(None, CHUNK_ROWS)
        end = self.written + len(block)
        if end > self.array.shape[0]:
            step = _GROW_CHUNKS * CHUNK_ROWS
            self.array.resize((-(-end // step) * step,) + self.row_shape)
        self.array[self.written:end] = block
        self.written = end

    def close(self) -> None:
        rest = self.buffer[: self.buffered]
        if self.array is None:  # all rows fit one chunk
            self.array = self._create(rest, min(max(len(rest), 1), CHUNK_ROWS))
        else:
            if len(rest):
                self._write(rest)
            self.array.resize((self.written,) + self.row_shape)
        self.buffer, self.buffered = np.empty((0,) + self.row_shape, self.dtype), 0


@dataclass
class _Bounds:
    """Running min and max of the training frames' canonical coordinates (those of `np.concatenate`-ing them all)."""

    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        low, high = values.min(0), values.max(0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)

    def tolist(self) -> list[list[float]]:
        return [self.low.tolist(), self.high.tolist()]


def _write_frames(capture: PersonCapture, config: IngestConfig, meta: TrackingMeta, sequences: list[str],
                  calib: Calibration, held_out: set[int], g: zarr.Group,
                  content: ContentHash | None = None) -> tuple[int, int, _Bounds, _Bounds]:
    """Check every frame of the capture and write its mesh into the store `g` as it is read, one mesh in memory at a
    time; its images are decoded and checked on ``io_threads`` threads meanwhile, a bounded number of them ahead.
    The first problem in frame order raises a DataError naming the file: a problem of a frame's folders or mesh
    anywhere comes before one of an image (as when the images were checked after all meshes). Returns the number
    of frames, the number of images and the bounds of the training frames' spatial and ambient coordinates; every
    mesh, image and alpha map is hashed into ``content`` as it is read."""
    content = ContentHash() if content is None else content
    serials = calib.serials
    cols = {name: _Column(g, name, dtype, shape) for name, dtype, shape in (
        ("frames/sequence", np.int32, ()), ("frames/timestep", np.int32, ()), ("frames/held_out", bool, ()),
        ("frames/expression", np.float32, (meta.expression_dim,)), ("meshes/vertex_offset", np.int64, ()),
        ("meshes/face_offset", np.int64, ()), ("meshes/vertices", np.float32, (3,)),
        ("meshes/canonical", np.float32, (STORED_CANONICAL_DIMS,)), ("meshes/faces", np.int32, (3,)))}
    cols["meshes/vertex_offset"].append([0])
    cols["meshes/face_offset"].append([0])
    spatial, ambient = _Bounds(), _Bounds()
    n_frames = n_vertices = n_faces = n_images = 0
    image_error: DataError | None = None  # the first in frame order; raised once every mesh passed
    ahead: deque[tuple[Future, tuple[Path, Path]]] = deque()  # image checks submitted, in frame order

    def take_image_check() -> None:
        nonlocal image_error
        future, paths = ahead.popleft()
        try:
            digests = future.result()
        except DataError as e:
            image_error = image_error or e
            return
        for path, digest in zip(paths, digests):  # in submission order: the order does not depend on the threads
            content.add(capture, path, digest, image=True)

    pool = ThreadPoolExecutor(config.io_threads)
    try:
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
                mesh, digest = _load_mesh(mesh_path)
                mesh.validate(mesh_path, meta)
                content.add(capture, mesh_path, digest)
                for s in serials:
                    n_images += 1
                    if image_error is None:  # after the first broken image the others need no decoding
                        cam = calib.cameras[s]
                        paths = (capture.image_path(seq, t, s), capture.alpha_path(seq, t, s))
                        ahead.append((pool.submit(_check_image, *paths, (cam.width, cam.height)), paths))
                    while len(ahead) > 4 * config.io_threads:
                        take_image_check()
                n_frames += 1
                n_vertices += len(mesh.vertices)
                n_faces += len(mesh.faces)
                cols["frames/sequence"].append([si])
                cols["frames/timestep"].append([t])
                cols["frames/held_out"].append([si in held_out])
                cols["frames/expression"].append(mesh.expression[None])
                cols["meshes/vertex_offset"].append([n_vertices])
                cols["meshes/face_offset"].append([n_faces])
                cols["meshes/vertices"].append(mesh.vertices)
                canonical = np.zeros((len(mesh.canonical), STORED_CANONICAL_DIMS), dtype=np.float32)
                canonical[:, : mesh.canonical.shape[1]] = mesh.canonical  # FLAME-style meshes: zero ambient dims
                cols["meshes/canonical"].append(canonical)
                cols["meshes/faces"].append(mesh.faces)
                if si not in held_out:
                    # The conditioning's ranges come from the training frames only: the held-out sequences are
                    # test data, and a driver's frames outside the ranges are clipped, whatever was held out.
                    spatial.add(mesh.canonical[:, :3])
                    # FLAME-style meshes have no ambient dims: the store holds zeros for them, and these are their
                    # bounds (float64, as the zeros the ranges were once taken over)
                    ambient.add(mesh.canonical[:, 3:5] if mesh.canonical.shape[1] > 3 else np.zeros((1, 2)))
                del mesh, canonical
        while ahead:
            take_image_check()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if image_error is not None:
        raise image_error
    for col in cols.values():
        col.close()
    return n_frames, n_images, spatial, ambient


#: Why `ingest_person` writes a store (:func:`ingest_decision`), besides an unreadable store.
NO_STORE = "no store yet"
FORCED = "--force"
CAPTURE_CHANGED = ("the capture changed since it was ingested: a file or folder under it has another name, size or "
                   "mtime, or the capture root moved")


@dataclass
class IngestDecision:
    """What :func:`ingest_person` does with a person, decided without writing anything
    (:func:`ingest_decision`; ``launch_all --dry-run`` prints it)."""

    capture: PersonCapture
    store: Path
    fingerprint: str
    reason: str | None
    """Why the store is (re)written; None: it is up to date (``current``)."""
    current: IngestResult | None = None


def ingest_decision(capture_root: Path, person: str, out_dir: Path, config: IngestConfig | None = None,
                    force: bool = False) -> IngestDecision:
    """Whether ``<out_dir>/<person>.zarr`` is up to date with the capture and ``config`` (its fingerprint, see
    :func:`_fingerprint`: the capture's files are statted, nothing is written). Raises DataError when the person's
    folder does not exist."""
    config = config or IngestConfig()
    capture = PersonCapture(Path(capture_root).resolve(), person)
    if not capture.dir.is_dir():
        raise DataError(capture.dir, "person folder does not exist")
    final = Path(out_dir) / f"{person}.zarr"
    fingerprint = _fingerprint(capture, config)
    if not final.exists():
        return IngestDecision(capture, final, fingerprint, NO_STORE)
    if force:
        return IngestDecision(capture, final, fingerprint, FORCED)
    try:
        existing = PersonStore(final)
        if existing.attrs.get("fingerprint") != fingerprint:
            return IngestDecision(capture, final, fingerprint, _changed(existing, config))
        frames = existing.num_frames
        current = IngestResult(person, final, frames, frames * len(existing.serials), True)
    except DataError as e:  # a broken store: rebuilt
        return IngestDecision(capture, final, fingerprint, f"the store is unreadable: {e}")
    return IngestDecision(capture, final, fingerprint, None, current)


def split_change(attrs: Mapping, config: IngestConfig) -> str | None:
    """How the split settings a store records (its attributes ``attrs``) differ from ``config``'s, or None when they
    are the same: what the ingest says when it writes the store again, and what tells ``launch_all --dry-run`` that
    every shard's spec changes (the split settings are part of the content identity the specs are made of). A
    ``held_out_sequences`` that is not a list of sequences (a store not written by this ingest) is a change: what
    it held out is unknown."""
    camera, held_out = attrs.get("held_out_camera"), attrs.get("held_out_sequences")
    if camera != config.held_out_camera:
        return f"--ingest.held-out-camera changed ({camera} -> {config.held_out_camera})"
    if not isinstance(held_out, list):
        return (f"--ingest.held-out-sequences changed (the store records {str(held_out)[:60]!r}, not a list of "
                f"sequences -> {config.held_out_sequences})")
    if len(held_out) != config.held_out_sequences:
        return f"--ingest.held-out-sequences changed ({len(held_out)} -> {config.held_out_sequences})"
    return None


def _changed(store: PersonStore, config: IngestConfig) -> str:
    """Why a store's fingerprint differs: the split settings it records (`split_change`), else its capture."""
    return split_change(store.attrs, config) or CAPTURE_CHANGED


def ingest_person(capture_root: Path, person: str, out_dir: Path, config: IngestConfig | None = None,
                  force: bool = False) -> IngestResult:
    """Validate `person` under `capture_root` and write `<out_dir>/<person>.zarr`.

    The store is written under a temporary name as the capture is read (one mesh in memory at a time) and renamed
    into place only once every mesh and image passed: a capture that fails leaves no store (and an older one as it
    was)."""
    config = config or IngestConfig()
    decision = ingest_decision(capture_root, person, out_dir, config, force)
    if decision.reason is None:
        return decision.current
    capture, final, fingerprint = decision.capture, decision.store, decision.fingerprint
    content = ContentHash()  # of every file read, as it is read
    meta, sequences, calib = _check_layout(capture, config, content)
    held_out = set(range(len(sequences) - config.held_out_sequences, len(sequences)))
    with atomic_directory(final) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        n_frames, n_images, spatial, ambient = _write_frames(capture, config, meta, sequences, calib, held_out, g,
                                                             content)
        sizes = {(c.width, c.height) for c in calib.cameras.values()}
        if len(sizes) != 1:
            raise DataError(capture.calibration_path, f"cameras have different image sizes {sorted(sizes)}; "
                                                      "resize the capture to one size first")
        cams = list(calib.cameras.values())
        for name, data in (("cameras/world_2_cam", np.stack([c.world_to_cam for c in cams])),
                           ("cameras/intrinsics", np.stack([c.K for c in cams]))):
            column = _Column(g, name, data.dtype, data.shape[1:])
            column.append(data)
            column.close()
        first = cams[0]
        g.attrs.update({  # written last: a store with attrs is complete
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
            "canonical_bounds": spatial.tolist(),
            "ambient_bounds": ambient.tolist(),
            CONTENT: content.hexdigest(config),
        })
    return IngestResult(person, final, n_frames, n_images, False)
