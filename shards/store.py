"""The per-person zarr store written by the ingest and read by the shard writer.

Layout of `<person>.zarr` (format version 4: every chunk written, zstd frame checksums; the ranges
from the training frames only since 4)::

    attrs: person, format_version, fingerprint, source_root, expression_dim,
           canonical_dim, mesh_kind, image_size [W, H], serials, sequences,
           held_out_sequences, held_out_camera, canonical_bounds [[min x,y,z], [max x,y,z]],
           ambient_bounds [[min a0, a1], [max a0, a1]] (both over the training frames),
           content_sha256 (the content identity), inputs_table (describes the file below)
    inputs-<16 hex>.jsonl.gz  gzip JSON lines [stream, path, size, mtime_ns, sha256]: every file the ingest
                              read (`shards.ingest.TABLE`), checked against the sha256 inputs_table records
    cameras/world_2_cam   (C, 4, 4) float64   OpenCV world -> camera
    cameras/intrinsics    (C, 3, 3) float64
    frames/sequence       (T,) int32          index into attrs.sequences
    frames/timestep       (T,) int32          NeRSemble timestep number
    frames/held_out       (T,) bool           frame belongs to a held-out sequence
    frames/expression     (T, D) float32
    meshes/vertex_offset  (T + 1,) int64      ragged index: frame i owns rows [o[i], o[i+1])
    meshes/face_offset    (T + 1,) int64
    meshes/vertices       (sum V, 3) float32  world space
    meshes/canonical      (sum V, 5) float32  3 spatial + 2 ambient (zeros for FLAME-style meshes)
    meshes/faces          (sum F, 3) int32    indices local to the frame's vertices

Meshes are ragged because NPHM tracking extracts a new mesh (new topology) per frame.
Images stay in the capture root (`source_root`); the store only indexes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from common.io import DataError

from .contract import Calibration, Camera, MeshFrame, PersonCapture

FORMAT_VERSION = 4
#: Every array of a store: each is written with all its chunks (none left to the fill value) and zstd frame
#: checksums, so a missing chunk file or a changed byte is found when the store is opened or read.
ARRAYS = ("cameras/world_2_cam", "cameras/intrinsics", "frames/sequence", "frames/timestep", "frames/held_out",
          "frames/expression", "meshes/vertex_offset", "meshes/face_offset", "meshes/vertices", "meshes/canonical",
          "meshes/faces")
#: Canonical channels stored for every mesh kind (FLAME-style meshes get zero ambient dims).
STORED_CANONICAL_DIMS = 5

#: Sample splits: training views, held-out sequences (all cameras), held-out frontal camera.
SPLITS = ("train", "test_seq", "test_cam")


def sample_split(frame_held_out: bool, camera_held_out: bool) -> str:
    """The split of one (frame, camera) sample."""
    if frame_held_out:
        return "test_seq"
    if camera_held_out:
        return "test_cam"
    return "train"


@dataclass(frozen=True)
class Sample:
    """One (frame, camera) pair of a person."""

    frame: int  # row in frames/*
    camera: int  # index into serials
    sequence: str
    timestep: int
    serial: str
    split: str

    @property
    def key(self) -> str:
        return f"{self.sequence}/frame_{self.timestep:05d}/cam_{self.serial}"


class PersonStore:
    """Read access to one person's zarr store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as e:
            raise DataError(self.path, f"not a readable zarr store: {e}") from None
        version = self.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(self.path, f"store format version {version!r}, expected {FORMAT_VERSION}; "
                                       "re-run the ingest")
        for name in ARRAYS:  # zarr reads a missing chunk as its fill value: a lost file must not read as zeros
            try:
                arr = self.group[name]
                missing = arr.nchunks - arr.nchunks_initialized
            except Exception as e:
                raise DataError(self.path, f"array {name} is unreadable: {e}; re-run the ingest") from None
            if missing:
                raise DataError(self.path, f"array {name} lacks {missing} of its {arr.nchunks} chunk files "
                                           "(an incomplete copy?); re-run the ingest")

    def _read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of one array; a chunk whose bytes changed (zstd checksum) names the store and the array."""
        try:
            return self.group[name][rows]
        except Exception as e:
            raise DataError(self.path, f"array {name} is corrupt: {e}; rebuild the store with jobs/ingest.py "
                                       "--force") from None

    @cached_property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def person(self) -> str:
        return self.attrs["person"]

    @property
    def serials(self) -> list[str]:
        return list(self.attrs["serials"])

    @property
    def sequences(self) -> list[str]:
        return list(self.attrs["sequences"])

    @property
    def expression_dim(self) -> int:
        return int(self.attrs["expression_dim"])

    @property
    def capture(self) -> PersonCapture:
        return PersonCapture(Path(self.attrs["source_root"]), self.person)

    @cached_property
    def cameras(self) -> list[Camera]:
        w2c = self._read("cameras/world_2_cam")
        K = self._read("cameras/intrinsics")
        w, h = self.attrs["image_size"]
        return [Camera(s, K[i], w2c[i], w, h) for i, s in enumerate(self.serials)]

    @cached_property
    def frames(self) -> dict[str, np.ndarray]:
        return {k: self._read(f"frames/{k}") for k in ("sequence", "timestep", "held_out", "expression")}

    @cached_property
    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read("meshes/vertex_offset"), self._read("meshes/face_offset")

    @property
    def num_frames(self) -> int:
        return len(self.frames["timestep"])

    def mesh(self, frame: int) -> MeshFrame:
        """The fitted mesh of frame row `frame` (canonical coords always 5 wide)."""
        vo, fo = self._offsets
        v0, v1, f0, f1 = int(vo[frame]), int(vo[frame + 1]), int(fo[frame]), int(fo[frame + 1])
        return MeshFrame(
            vertices=self._read("meshes/vertices", slice(v0, v1)),
            faces=self._read("meshes/faces", slice(f0, f1)),
            canonical=self._read("meshes/canonical", slice(v0, v1)),
            expression=self.frames["expression"][frame],
        )

    def samples(self, split: str | None = None) -> list[Sample]:
        """All (frame, camera) samples in a deterministic order, optionally of one split."""
        held_cam = self.attrs["held_out_camera"]
        out = []
        f = self.frames
        for i in range(self.num_frames):
            seq = self.sequences[int(f["sequence"][i])]
            for c, serial in enumerate(self.serials):
                split_of = sample_split(bool(f["held_out"][i]), serial == held_cam)
                s = Sample(i, c, seq, int(f["timestep"][i]), serial, split_of)
                if split is None or s.split == split:
                    out.append(s)
        return out

    def image_paths(self, sample: Sample) -> tuple[Path, Path]:
        cap = self.capture
        return cap.image_path(sample.sequence, sample.timestep, sample.serial), \
            cap.alpha_path(sample.sequence, sample.timestep, sample.serial)

    def calibration(self) -> Calibration:
        return Calibration({c.serial: c for c in self.cameras})
