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
identity is what the stages after it key on (the shard spec, the evaluation's data digest).

The store also records every file the ingest read with its size, mtime and sha256 (:data:`TABLE`, a checksummed
file inside the store), so a capture that is touched, copied without its mtimes or moved is not ingested again:
its files are hashed (those whose size and mtime are unchanged not even read, no image decoded), and when they
give the store's content identity the store is kept, with its fingerprint and capture root updated
(:func:`_keep_store`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat as stat_mode
import zlib
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, UnidentifiedImageError

from common.fingerprint import walk_tree
from common.io import DataError, atomic_directory, atomic_write_bytes

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
    kept: bool = False
    """True when the capture's stat fingerprint changed but its files' content did not (a touch, a copy without
    mtimes, a move): "content unchanged, store kept", its fingerprint and capture root updated (``skipped`` False:
    the store's metadata was written)."""


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

    def __init__(self, record: bool = False) -> None:
        self.inputs, self.images = hashlib.sha256(), hashlib.sha256()
        self.table: _TableWriter | None = None
        #: ``record``: the lines fed before a table is attached (`attach`), kept for it (the two JSON files)
        self.pending: list | None = [] if record else None

    def add(self, capture: PersonCapture, path: Path, digest: str, image: bool = False,
            stat: tuple[int, int] | None = None) -> None:
        """``stat``: the file's (size, mtime_ns) when it was read, recorded in ``table`` when there is one."""
        self.add_relative(path.relative_to(capture.dir).as_posix(), digest, image, stat)

    def add_relative(self, rel: str, digest: str, image: bool = False, stat: tuple[int, int] | None = None) -> None:
        (self.images if image else self.inputs).update(f"{rel}\0{digest}\n".encode())
        if self.table is not None:
            self.table.add(rel, digest, image, stat)
        elif self.pending is not None:
            self.pending.append((rel, digest, image, stat))

    def attach(self, table: _TableWriter) -> None:
        """Record every line from now on, and those fed before, in ``table``."""
        self.table = table
        for line in self.pending or ():
            table.add(*line)
        self.pending = None

    def hexdigest(self, config: IngestConfig) -> str:
        """sha256 over the store format, the checks it passed, the split settings and the two streams' digests."""
        split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
        h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split},
                                      sort_keys=True).encode())
        h.update(f"{self.inputs.hexdigest()}\n{self.images.hexdigest()}\n".encode())
        return h.hexdigest()


def _read_hashed(path: Path) -> tuple[bytes, str, tuple[int, int]]:
    """A file's bytes, their sha256 (hashlib releases the GIL: the image threads hash in parallel) and the file's
    (size, mtime_ns) as it was opened, before its bytes were read (a write during the read changes its mtime after
    the one recorded, so the next run reads it again)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    return data, hashlib.sha256(data).hexdigest(), (st.st_size, st.st_mtime_ns)


#: The store attribute describing its table of the files the ingest read (:class:`_TableWriter`): ``{"file": its
#: name inside the store folder, "sha256": of its bytes, "entries": its number of lines, "layout": the digest of
#: the names of the capture's folders and files when it was ingested (:func:`_walk`)}``. Stores written before it
#: existed have none: a change of their capture's stat fingerprint re-ingests them, as it did.
TABLE = "inputs_table"
#: Version of the table's format (part of its attribute).
TABLE_VERSION = 1
_TABLE_NAME = re.compile(r"inputs-[0-9a-f]{16}\.jsonl\.gz")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _TableWriter:
    """The table of the files the ingest read, written as they are read (memory holds none of the ~200k lines of a
    real person): gzip-compressed JSON lines ``[stream, path relative to the person's folder, size, mtime_ns,
    sha256]`` (stream 0: the tracking meta, the calibration and the meshes; 1: the images and alpha maps), each
    stream's lines in the order :class:`ContentHash` was fed, so the identity is recomputed from the table alone.
    Written to a temporary name in ``folder`` and hashed as it is written; :meth:`finish` names it by its sha256
    and returns its attribute."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.tmp = self.folder / f".inputs-{os.getpid()}-{id(self):x}.tmp"
        self.raw = open(self.tmp, "wb")
        self.sha256 = hashlib.sha256()
        self.file = gzip.GzipFile(filename="", mode="wb", fileobj=self, mtime=0)  # its bytes: of its lines only
        self.entries = 0

    def write(self, data: bytes) -> int:
        """The gzip stream's bytes (this object is its file): hashed and written."""
        self.sha256.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def add(self, rel: str, digest: str, image: bool, stat: tuple[int, int] | None) -> None:
        if stat is None:
            raise ValueError(f"{rel}: no (size, mtime) to record in the table")
        self.file.write(json.dumps([int(image), rel, stat[0], stat[1], digest], ensure_ascii=False,
                                   separators=(",", ":")).encode(errors="surrogateescape") + b"\n")
        self.entries += 1

    def discard(self) -> None:
        self.file.close()
        self.raw.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self, layout: str) -> dict:
        self.file.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        digest = self.sha256.hexdigest()
        name = f"inputs-{digest[:16]}.jsonl.gz"
        os.replace(self.tmp, self.folder / name)
        return {"version": TABLE_VERSION, "file": name, "sha256": digest, "entries": self.entries, "layout": layout}


def _table_problem(attr) -> str | None:
    """What is wrong with a store's table attribute (None: it is well-formed)."""
    if not isinstance(attr, dict):
        return "the store records no table of the files it read (written before stores recorded one)"
    if attr.get("version") != TABLE_VERSION:
        return f"its table is of version {attr.get('version')!r}, not {TABLE_VERSION}"
    if not isinstance(attr.get("file"), str) or not _TABLE_NAME.fullmatch(attr["file"]) \
            or not isinstance(attr.get("sha256"), str) or not _SHA256.fullmatch(attr["sha256"]) \
            or not isinstance(attr.get("entries"), int) or not isinstance(attr.get("layout"), str):
        return "its table attribute is malformed"
    return None


def _read_table(store: Path, attr: dict):
    """The table's entries ``(image, rel, size, mtime_ns, sha256)`` in order, after its bytes were checked against
    the sha256 its attribute records (a damaged or missing table raises ValueError or OSError: it is not trusted)."""
    data = (store / attr["file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != attr["sha256"]:
        raise ValueError(f"{store / attr['file']}: its sha256 is not the one the store records (damaged)")
    try:
        lines = gzip.decompress(data).split(b"\n")
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{store / attr['file']}: does not decompress: {e}") from None
    del data
    if lines[-1] != b"" or len(lines) - 1 != attr["entries"]:
        raise ValueError(f"{store / attr['file']}: {len(lines) - 1} lines, the store records {attr['entries']}")
    for line in lines[:-1]:
        entry = json.loads(line.decode(errors="surrogateescape"))
        if not (isinstance(entry, list) and len(entry) == 5 and entry[0] in (0, 1) and isinstance(entry[1], str)
                and all(type(v) is int for v in entry[2:4]) and isinstance(entry[4], str)
                and _SHA256.fullmatch(entry[4])):
            raise ValueError(f"{store / attr['file']}: malformed entry {line[:200]!r}")
        rel = Path(entry[1])
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"{store / attr['file']}: path {entry[1]!r} is not inside the person's folder")
        yield bool(entry[0]), entry[1], entry[2], entry[3], entry[4]


#: Files one thread of the fingerprint stats in one go (a frame folder's images, a sequence's meshes in parts).
_STAT_BATCH = 64


def _fingerprint(capture: PersonCapture, config: IngestConfig) -> str:
    """The stat fingerprint of :func:`_walk`."""
    return _walk(capture, config)[0]


def _walk(capture: PersonCapture, config: IngestConfig) -> tuple[str, str]:
    """The stat fingerprint and the layout digest of the person's capture.

    The stat fingerprint is the digest of everything the store depends on: the store format, the checks it
    passed, the split settings (not ``io_threads``, which changes how fast, not what), the (resolved) capture root
    the store's image paths point into, and the name, size and mtime of every file and the name of every folder of the
    person's capture (an empty or mis-named folder added later makes the store stale, so the re-run
    validates it).

    The folders are walked in order on this thread and their files statted on ``io_threads`` threads (a real
    person has ~200k files: on a network file system one stat after the other takes minutes), a bounded number
    of batches ahead; the digest is fed in walk order, so it is the one a serial walk computes.

    The layout digest is that of the names alone (every folder's and file's path relative to the person's folder,
    in walk order, no root, sizes or mtimes): equal, the ingest lists the same sequences, frames and cameras, reads
    the same files and finds the same extra ones (:func:`_keep_store`)."""
    split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
    h, layout = hashlib.sha256(), hashlib.sha256()
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

    def stat_lines(line: str, paths: list[Path]) -> tuple[bytes, bytes]:
        names = line
        for p in paths:
            st = os.stat(p)
            line += f"{p.relative_to(capture.dir)}\0{st.st_size}\0{st.st_mtime_ns}\n"
            names += f"{p.relative_to(capture.dir)}\n"
        # a name that is not UTF-8 (another system's encoding) as its bytes: the ingest then names it (valid names
        # encode as before, so stores written before stay up to date)
        return line.encode(errors="surrogateescape"), names.encode(errors="surrogateescape")

    def feed(lines: tuple[bytes, bytes]) -> None:
        h.update(lines[0])
        layout.update(lines[1])

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
                feed(ahead.popleft().result())
        while ahead:
            feed(ahead.popleft().result())
    return h.hexdigest(), layout.hexdigest()


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


def _check_image(path: Path, alpha_path: Path, expected_size: tuple[int, int]) -> tuple[tuple, tuple]:
    """Decode an image and its alpha map fully; raise DataError on any problem (also an alpha map's values, see
    `alpha_value_problem`: read from the pixels decoded here, no second decode). Each file is read once and
    decoded from memory; returns the sha256 of the image's and of the alpha map's bytes, each with the file's
    (size, mtime_ns) (see `_read_hashed`)."""
    digests = []
    for p, what in ((path, "image"), (alpha_path, "alpha map")):
        if not p.is_file():
            raise DataError(p, f"{what} is missing" if not p.exists() else
                               f"{what} is not a regular file (a folder, a pipe or a device)")
        try:
            data, digest, st = _read_hashed(p)
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
        digests.append((digest, st))
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


def _load_mesh(path: Path) -> tuple[MeshFrame, str, tuple[int, int]]:
    """`MeshFrame.load` of the file read once: the mesh, the sha256 of the file's bytes and its (size, mtime_ns)."""
    try:
        data, digest, st = _read_hashed(path)
    except FileNotFoundError:
        raise DataError(path, "mesh file is missing") from None
    except OSError as e:
        raise DataError(path, f"unreadable mesh file: {e}") from None
    return MeshFrame.load(path, data), digest, st


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
        data, digest, st = _read_hashed(path)
    except OSError:
        return None
    if content is not None:
        content.add(capture, path, digest, stat=st)
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
        for path, (digest, st) in zip(paths, digests):  # in submission order: not dependent on the threads
            content.add(capture, path, digest, image=True, stat=st)

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
                mesh, digest, st = _load_mesh(mesh_path)
                mesh.validate(mesh_path, meta)
                content.add(capture, mesh_path, digest, stat=st)
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


#: Held in a folder of zarr stores: exclusively by an ingest into it (`jobs/ingest.py`, the main job's data stage)
#: for its whole run, shared by each `shards.writer.write_shards` that reads stores of it. `PersonStore` reads its
#: chunks by path while the ingest replaces a store folder (`common.io.replace_directory`), so a shard made then
#: could mix the two stores' data, or fail; two ingests at once wrote the same stores and one failed moving the
#: other's aside.
STORES_LOCK_FILE = ".ingest.lock"
#: What holds `STORES_LOCK_FILE` exclusively, as a refused run's message names it.
INGEST_WHAT = "an ingest (jobs/ingest.py, or the main job's data stage)"

#: Why `ingest_person` writes a store (:func:`ingest_decision`), besides an unreadable store.
NO_STORE = "no store yet"
FORCED = "--force"
CAPTURE_CHANGED = ("the capture changed since it was ingested: a file or folder under it has another name, size or "
                   "mtime, or the capture root moved")
#: What :func:`ingest_person` does with a store whose capture changed only in its files' sizes and mtimes or its
#: root (:attr:`IngestDecision.hashed`).
HASHED = ("its files are hashed (those of unchanged size and mtime not even read, no image decoded): the store is "
          "kept if their content is unchanged, else re-ingested")


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
    layout: str = ""
    """The digest of the names of the capture's folders and files (:func:`_walk`)."""
    hashed: bool = False
    """The capture changed (``reason`` CAPTURE_CHANGED) but its folders and files have the names they had when the
    store, which records a content identity and a table of the files it read, was ingested: :func:`ingest_person`
    hashes the files and keeps the store if their content is unchanged (:data:`HASHED`), else ingests it again."""


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
    fingerprint, layout = _walk(capture, config)
    if not final.exists():
        return IngestDecision(capture, final, fingerprint, NO_STORE, layout=layout)
    if force:
        return IngestDecision(capture, final, fingerprint, FORCED, layout=layout)
    try:
        existing = PersonStore(final)
        attrs = existing.attrs
        if attrs.get("fingerprint") != fingerprint:
            reason = _changed(existing, config)
            table = attrs.get(TABLE)
            hashed = reason == CAPTURE_CHANGED and isinstance(attrs.get(CONTENT), str) \
                and _table_problem(table) is None and table["layout"] == layout and (final / table["file"]).is_file()
            return IngestDecision(capture, final, fingerprint, reason, layout=layout, hashed=hashed)
        frames = existing.num_frames
        current = IngestResult(person, final, frames, frames * len(existing.serials), True)
    except DataError as e:  # a broken store: rebuilt
        return IngestDecision(capture, final, fingerprint, f"the store is unreadable: {e}", layout=layout)
    return IngestDecision(capture, final, fingerprint, None, current, layout=layout)


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


def _rehash(capture: PersonCapture, entries, config: IngestConfig):
    """The table's ``entries`` as they are now, in order: ``(image, rel, sha256, (size, mtime_ns))``, the recorded
    sha256 of a file whose size and mtime are those recorded, the others read and hashed (not decoded). Statted and
    hashed on ``io_threads`` threads, a bounded number of batches ahead. A file that is missing or not a regular
    file raises (OSError, ValueError)."""
    def check(batch: list) -> list:
        out = []
        for image, rel, size, mtime, digest in batch:
            path = capture.dir / rel
            st = os.stat(path)
            if not stat_mode.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: not a regular file")
            now = (st.st_size, st.st_mtime_ns)
            if now != (size, mtime):
                _, digest, now = _read_hashed(path)
            out.append((image, rel, digest, now))
        return out

    with ThreadPoolExecutor(config.io_threads) as pool:
        ahead: deque[Future] = deque()
        batch = []
        for entry in entries:
            batch.append(entry)
            if len(batch) == _STAT_BATCH:
                ahead.append(pool.submit(check, batch))
                batch = []
            while len(ahead) > 4 * config.io_threads:
                yield from ahead.popleft().result()
        if batch:
            ahead.append(pool.submit(check, batch))
        while ahead:
            yield from ahead.popleft().result()


def _keep_store(decision: IngestDecision, config: IngestConfig) -> IngestResult | None:
    """Keep the store of a capture that changed only in its files' sizes and mtimes or its root (``decision.hashed``:
    the names of its folders and files are those recorded): the files its table lists are statted in the order the
    ingest read them, the sha256 recorded is taken for each whose (size, mtime_ns) is the one recorded, the others are
    read and hashed (none decoded), and when the content identity they give is the store's the store is kept: a new
    table (the files' new sizes and mtimes) is written, then the store's ``zarr.json`` with the new fingerprint,
    capture root (``source_root``: the store's images are read from there) and table, each under a temporary name
    renamed into place (a crash in between leaves the store with its old fingerprint and old table: stale, and valid).
    Returns None, and the ingest runs as it did, when the identity differs (a changed byte), a listed file is missing
    or unreadable, or the table is missing or damaged (its sha256 is recorded in the store: it is not trusted).

    A file whose size and mtime are those recorded is not read: a change that keeps both (a byte changed and the
    mtime set back) is not seen, the trust the stat fingerprint gives too (with no other change the store is up to
    date as it is); ``--force`` reads and decodes everything again. The layout equal, the checks before any frame
    pass as they did (the JSON files' bytes and the folders' names are the same) and the image checks too (the same
    bytes decode the same way; a new validation version changes both the fingerprint and the identity)."""
    capture, final = decision.capture, decision.store
    try:
        store = PersonStore(final)
        attrs = store.attrs
        if _table_problem(attrs.get(TABLE)) is not None or not isinstance(attrs.get(CONTENT), str):
            return None
        content = ContentHash()
        content.attach(_TableWriter(final))
        try:
            for image, rel, digest, st in _rehash(capture, _read_table(final, attrs[TABLE]), config):
                content.add_relative(rel, digest, image, st)
        except BaseException:
            content.table.discard()
            raise
        if content.hexdigest(config) != attrs[CONTENT]:
            content.table.discard()
            return None
        table = content.table.finish(decision.layout)
        meta = final / "zarr.json"
        doc = json.loads(meta.read_bytes())
        doc["attributes"].update({"fingerprint": decision.fingerprint, "source_root": str(capture.root),
                                  TABLE: table})
        atomic_write_bytes(meta, json.dumps(doc, indent=zarr.config.get("json_indent"), allow_nan=True).encode())
        frames, cameras = store.num_frames, len(store.serials)
    except (OSError, ValueError, DataError):  # the ingest then reads everything and names what is wrong
        return None
    for old in final.iterdir():  # the tables of before (one left by a crash too)
        if old.name != table["file"] and (_TABLE_NAME.fullmatch(old.name) or old.name.startswith(".inputs-")):
            old.unlink(missing_ok=True)
    return IngestResult(capture.person, final, frames, frames * cameras, False, kept=True)


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
    if decision.hashed:
        kept = _keep_store(decision, config)
        if kept is not None:
            return kept
    capture, final, fingerprint = decision.capture, decision.store, decision.fingerprint
    content = ContentHash(record=True)  # of every file read, as it is read, and the table of them
    meta, sequences, calib = _check_layout(capture, config, content)
    held_out = set(range(len(sequences) - config.held_out_sequences, len(sequences)))
    with atomic_directory(final) as tmp:
        g = zarr.open_group(str(tmp), mode="w")
        content.attach(_TableWriter(tmp))  # in the store's folder
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
            TABLE: content.table.finish(decision.layout),
        })
    return IngestResult(person, final, n_frames, n_images, False)
