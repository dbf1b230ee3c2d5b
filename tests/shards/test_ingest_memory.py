"""The ingest streams: memory bounded by one mesh whatever the number of frames, the same store as the ingest that
held every mesh at once wrote, and a capture fingerprint whose files are statted on io_threads threads with the
digest a serial walk computes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

import shards.ingest as ingest
from common.fingerprint import walk_tree
from common.io import DataError
from shards.contract import MeshFrame, PersonCapture, TrackingMeta
from shards.ingest import VALIDATION_VERSION, IngestConfig, ingest_person
from shards.store import ARRAYS, FORMAT_VERSION, STORED_CANONICAL_DIMS, PersonStore

CFG = IngestConfig(held_out_sequences=1, io_threads=2)


def _person(tiny_captures: Path, root: Path, person: str = "000") -> PersonCapture:
    """A private copy of one person of the tiny capture."""
    shutil.copytree(tiny_captures / person, root / person)
    return PersonCapture(root, person)


def _random_mesh(rng: np.random.Generator, vertices: int, faces: int, meta: TrackingMeta,
                 canonical_dtype=np.float32) -> MeshFrame:
    return MeshFrame(vertices=rng.normal(size=(vertices, 3)).astype(np.float32),
                     faces=rng.integers(0, vertices, size=(faces, 3)).astype(np.int32),
                     canonical=rng.normal(size=(vertices, meta.canonical_dim)).astype(canonical_dtype),
                     expression=rng.normal(size=meta.expression_dim).astype(np.float32))


def _with_frames(cap: PersonCapture, frames: int, vertices: int, faces: int) -> None:
    """Every sequence of `cap` gets `frames` frames (images linked to its first frame's), each with a mesh of
    `vertices` vertices and `faces` faces (one random mesh per sequence, linked to every frame)."""
    meta = TrackingMeta.load(cap.tracking_meta_path)
    rng = np.random.default_rng(0)
    for seq in cap.sequences():
        steps = cap.timesteps(seq)
        first = cap.timesteps_dir(seq) / f"frame_{steps[0]:05d}"
        for t in steps[1:]:
            shutil.rmtree(cap.timesteps_dir(seq) / f"frame_{t:05d}")
            cap.mesh_path(seq, t).unlink()
        mesh_file = cap.mesh_path(seq, steps[0])
        _random_mesh(rng, vertices, faces, meta).save(mesh_file)
        for t in range(steps[0] + 1, steps[0] + frames):
            shutil.copytree(first, cap.timesteps_dir(seq) / f"frame_{t:05d}", copy_function=os.link)
            os.link(mesh_file, cap.mesh_path(seq, t))


def _mesh_bytes(vertices: int, faces: int, meta: TrackingMeta) -> int:
    return vertices * 4 * (3 + meta.canonical_dim) + faces * 3 * 4 + meta.expression_dim * 4


def _peak_ingest(root: Path, person: str, out: Path) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        ingest_person(root, person, out, CFG, force=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_peak_memory_of_the_ingest_is_a_few_meshes_whatever_the_number_of_frames(tiny_captures, tmp_path):
    """A real person is ~6000 meshes of ~100k vertices: the ingest held them all, twice or three times over
    (tens of GB per worker). Now one mesh at a time and a chunk per array: the peak does not grow with the frames."""
    vertices, faces = 40_000, 80_000
    peaks = {}
    for frames in (2, 12):
        cap = _person(tiny_captures, tmp_path / f"captures{frames}")
        _with_frames(cap, frames, vertices, faces)
        peaks[frames] = _peak_ingest(cap.root, "000", tmp_path / f"zarr{frames}")
        assert PersonStore(tmp_path / f"zarr{frames}" / "000.zarr").num_frames == 3 * frames
    mesh = _mesh_bytes(vertices, faces, TrackingMeta.load(cap.tracking_meta_path))
    # 36 meshes held at once would be 36+ meshes; the chunk buffers are about one such mesh
    assert peaks[12] < 6 * mesh, f"peak {peaks[12] / 2**20:.1f} MiB for meshes of {mesh / 2**20:.1f} MiB: {peaks}"
    assert peaks[12] < 1.25 * peaks[2], f"the peak grows with the number of frames: {peaks}"


# --- the store the ingest wrote when it held every mesh at once (the code before streaming, verbatim) ---------------

def _old_write_store(path: Path, attrs: dict, calib, frames, meshes: list[MeshFrame], held_out: set[int]) -> None:
    g = zarr.open_group(str(path), mode="w")
    zstd = [zarr.codecs.ZstdCodec(level=3, checksum=True)]

    def put(name: str, data: np.ndarray, rows: int = 65536) -> None:
        chunks = (min(max(len(data), 1), rows),) + data.shape[1:]
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
    g.attrs.update(attrs)


def _old_store(cap: PersonCapture, config: IngestConfig, out: Path, fingerprint: str, content: str,
               table: dict) -> Path:
    """The store the ingest before streaming wrote for `cap` (it had passed the checks), with the content identity
    and the table attribute stores record since (`tests/shards/test_capture_identity.py` checks the identity's
    value, `tests/shards/test_ingest_keep_store.py` the table)."""
    meta, sequences, calib = ingest._check_layout(cap, config)
    frames = [(si, t) for si, seq in enumerate(sequences) for t in cap.timesteps(seq)]
    meshes = [MeshFrame.load(cap.mesh_path(sequences[si], t)) for si, t in frames]
    held_out = set(range(len(sequences) - config.held_out_sequences, len(sequences)))
    train_meshes = [m for (seq, _), m in zip(frames, meshes) if seq not in held_out]
    spatial = np.concatenate([m.canonical[:, :3] for m in train_meshes])
    ambient = np.concatenate([m.canonical[:, 3:5] if m.canonical.shape[1] > 3 else np.zeros((len(m.canonical), 2))
                              for m in train_meshes])
    first = next(iter(calib.cameras.values()))
    attrs = {
        "person": cap.person, "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
        "source_root": str(cap.root), "expression_dim": meta.expression_dim, "canonical_dim": meta.canonical_dim,
        "mesh_kind": meta.mesh_kind, "image_size": [first.width, first.height], "serials": calib.serials,
        "sequences": sequences, "held_out_sequences": [sequences[i] for i in sorted(held_out)],
        "held_out_camera": config.held_out_camera,
        "canonical_bounds": [spatial.min(0).tolist(), spatial.max(0).tolist()],
        "ambient_bounds": [ambient.min(0).tolist(), ambient.max(0).tolist()],
        ingest.CONTENT: content,
        ingest.TABLE: table,
    }
    path = out / f"{cap.person}.zarr"
    _old_write_store(path, attrs, calib, frames, meshes, held_out)
    return path


def _assert_same_store(new: Path, old: Path, same_chunks: bool) -> None:
    a, b = zarr.open_group(str(new), mode="r"), zarr.open_group(str(old), mode="r")
    assert json.dumps(dict(a.attrs), sort_keys=True) == json.dumps(dict(b.attrs), sort_keys=True)
    assert sorted(name for name, _ in a.arrays()) == sorted(name for name, _ in b.arrays())
    for name in ARRAYS:
        x, y = a[name], b[name]
        assert (x.dtype, x.shape, x.fill_value) == (y.dtype, y.shape, y.fill_value), name
        if same_chunks:
            assert x.chunks == y.chunks, name
        assert x.nchunks_initialized == x.nchunks, name  # every chunk written
        np.testing.assert_array_equal(x[:], y[:], err_msg=name)


def _variety(cap: PersonCapture, flame: bool) -> None:
    """Meshes of different sizes per frame, one with float64 canonical coordinates; FLAME-style (3 canonical dims)
    when `flame`."""
    if flame:
        meta = json.loads(cap.tracking_meta_path.read_text())
        meta["mesh_kind"] = "flame"
        meta["canonical_dim"] = 3
        cap.tracking_meta_path.write_text(json.dumps(meta))
    meta = TrackingMeta.load(cap.tracking_meta_path)
    rng = np.random.default_rng(1)
    for i, (seq, t) in enumerate((seq, t) for seq in cap.sequences() for t in cap.mesh_timesteps(seq)):
        v = int(rng.integers(50, 400))
        mesh = _random_mesh(rng, v, 2 * v, meta, np.float64 if i == 1 else np.float32)
        np.savez(cap.mesh_path(seq, t), vertices=mesh.vertices, faces=mesh.faces, canonical=mesh.canonical,
                 expression=mesh.expression)


@pytest.mark.parametrize("flame", [False, True], ids=["nphm", "flame"])
@pytest.mark.parametrize("chunk_rows", [65536, 97], ids=["one-chunk", "many-chunks"])
def test_the_streamed_store_equals_the_one_written_at_once(flame, chunk_rows, tiny_captures, tmp_path, monkeypatch):
    """Array by array (values, dtypes, shapes; chunks too where the arrays fit one chunk) and attr by attr, the
    store is the one the ingest wrote when it held every mesh at once: stores need no rebuild and readers see
    nothing new. With small chunks the arrays span many chunks, grow and are cut to their length at the end."""
    cap = _person(tiny_captures, tmp_path / "captures")
    _variety(cap, flame)
    monkeypatch.setattr(ingest, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(ingest, "_GROW_CHUNKS", 2)
    new = ingest_person(cap.root, "000", tmp_path / "new", CFG).path
    attrs = PersonStore(new).attrs
    old = _old_store(cap, CFG, tmp_path / "old", attrs["fingerprint"], attrs[ingest.CONTENT], attrs[ingest.TABLE])
    _assert_same_store(new, old, same_chunks=chunk_rows == 65536)
    if chunk_rows < 65536:
        assert zarr.open_group(str(new), mode="r")["meshes/faces"].nchunks > 2 * ingest._GROW_CHUNKS
    store = PersonStore(new)  # the reader's checks pass
    assert store.mesh(store.num_frames - 1).canonical.shape[1] == STORED_CANONICAL_DIMS


def test_a_corrupt_mesh_at_the_end_of_the_last_sequence_leaves_no_store_and_names_the_file(tiny_captures, tmp_path):
    """The store is written while the capture is read: a broken last mesh still leaves no store (nor a temporary
    folder), and a previous store as it was."""
    cap = _person(tiny_captures, tmp_path / "captures")
    out = tmp_path / "zarr"
    previous = ingest_person(cap.root, "000", out, CFG).path
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    seq = cap.sequences()[-1]
    culprit = cap.mesh_path(seq, cap.mesh_timesteps(seq)[-1])
    culprit.write_bytes(b"not a zip file")
    with pytest.raises(DataError) as err:
        ingest_person(cap.root, "000", out, CFG)
    assert err.value.path == culprit and "unreadable mesh file" in str(err.value)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert PersonStore(previous).num_frames == len(cap.sequences()) * len(cap.mesh_timesteps(seq))
    shutil.rmtree(out)
    with pytest.raises(DataError) as err:
        ingest_person(cap.root, "000", out, CFG)
    assert err.value.path == culprit
    assert not out.exists() or list(out.iterdir()) == []


def test_a_broken_mesh_is_reported_before_a_broken_image_of_an_earlier_frame(tiny_captures, tmp_path):
    """As when every mesh was read before any image was checked: a mesh's problem anywhere comes first."""
    cap = _person(tiny_captures, tmp_path / "captures")
    seqs = cap.sequences()
    t0 = cap.timesteps(seqs[0])[0]
    image = cap.image_path(seqs[0], t0, cap.image_serials(seqs[0], t0)[0])
    image.write_bytes(b"garbage")
    mesh = cap.mesh_path(seqs[-1], cap.mesh_timesteps(seqs[-1])[-1])
    mesh.write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        ingest_person(cap.root, "000", tmp_path / "zarr", CFG)
    assert err.value.path == mesh
    mesh.unlink()
    shutil.copy(cap.mesh_path(seqs[0], cap.mesh_timesteps(seqs[0])[0]), mesh)
    with pytest.raises(DataError) as err:
        ingest_person(cap.root, "000", tmp_path / "zarr", CFG)
    assert err.value.path == image


# --- the fingerprint -------------------------------------------------------------------------------------------------

def _old_fingerprint(capture: PersonCapture, config: IngestConfig) -> str:
    """`shards.ingest._fingerprint` before its stats went to a thread pool (verbatim)."""
    split = {"held_out_sequences": config.held_out_sequences, "held_out_camera": config.held_out_camera}
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split,
                         "root": str(capture.root)}, sort_keys=True).encode())
    for sub in ("calibration", "tracking", "sequences"):
        base = capture.dir / sub
        for dirpath, dirnames, filenames in walk_tree(base):
            dirnames.sort()
            h.update(f"{Path(dirpath).relative_to(capture.dir)}/\n".encode())
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(capture.dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _busy_tree(cap: PersonCapture, tmp_path: Path) -> None:
    """More files in one folder than a stat batch, an empty folder, nested folders and a linked sequence folder."""
    seq = cap.sequences()[0]
    for i in range(3 * getattr(ingest, "_STAT_BATCH", 64) + 5):
        (cap.mesh_dir(seq) / f".extra_{i:04d}").write_bytes(b"x" * i)
    (cap.dir / "sequences" / "zz_empty").mkdir()
    (cap.dir / "calibration" / "a" / "b").mkdir(parents=True)
    (cap.dir / "calibration" / "a" / "b" / "note.txt").write_text("hi")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(cap.dir / "sequences" / seq, elsewhere)
    (cap.dir / "sequences" / seq).symlink_to(elsewhere, target_is_directory=True)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_fingerprint_is_the_digest_of_the_serial_walk(threads, tiny_captures, tmp_path):
    """Stores already written stay up to date: the same tree gives the digest the serial code gave."""
    cap = _person(tiny_captures, tmp_path / "captures")
    _busy_tree(cap, tmp_path)
    config = IngestConfig(held_out_sequences=1, io_threads=threads)
    assert ingest._fingerprint(cap, config) == _old_fingerprint(cap, config)


def test_the_fingerprint_stats_the_files_on_io_threads_threads(tiny_captures, tmp_path, monkeypatch):
    """~200k files per real person, statted one after the other on a network file system: minutes per person per
    launch. They are statted on io_threads threads."""
    cap = _person(tiny_captures, tmp_path / "captures")
    stat, used, lock = os.stat, set(), threading.Lock()

    def slow_stat(path, *args, **kwargs):
        if str(path).startswith(str(cap.dir)):
            with lock:
                used.add(threading.get_ident())
            time.sleep(0.005)  # a network file system's round trip
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", slow_stat)
    ingest._fingerprint(cap, IngestConfig(held_out_sequences=1, io_threads=3))
    monkeypatch.undo()
    assert len(used) == 3 and threading.get_ident() not in used
