from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.io import DataError
from shards.contract import Calibration, MeshFrame, PersonCapture
from shards.ingest import IngestConfig, ingest_person
from shards.store import PersonStore
from shards.testing import TINY_SHARDS
from shards.writer import write_shards

CFG = IngestConfig(held_out_sequences=1, io_threads=2)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_round_trip(tiny_captures, tmp_path, tiny_cfg):
    res = ingest_person(tiny_captures, "001", tmp_path / "zarr", CFG)
    assert not res.skipped and res.frames == tiny_cfg.sequences * tiny_cfg.frames
    assert res.images == res.frames * tiny_cfg.cameras
    store = PersonStore(res.path)
    cap = PersonCapture(tiny_captures, "001")
    calib = Calibration.load(cap.calibration_path)
    assert store.serials == calib.serials and store.expression_dim == tiny_cfg.expression_dim
    for cam in store.cameras:
        np.testing.assert_allclose(cam.K, calib.cameras[cam.serial].K)
        np.testing.assert_allclose(cam.world_to_cam, calib.cameras[cam.serial].world_to_cam)
    seqs = cap.sequences()
    assert store.sequences == seqs and store.attrs["held_out_sequences"] == seqs[-1:]
    for i in range(store.num_frames):
        seq = seqs[store.frames["sequence"][i]]
        t = int(store.frames["timestep"][i])
        want = MeshFrame.load(cap.mesh_path(seq, t))
        got = store.mesh(i)
        np.testing.assert_array_equal(got.vertices, want.vertices)
        np.testing.assert_array_equal(got.faces, want.faces)
        np.testing.assert_array_equal(got.canonical, want.canonical)
        np.testing.assert_array_equal(got.expression, want.expression)
        assert bool(store.frames["held_out"][i]) == (seq == seqs[-1])


def test_splits(tiny_captures, tmp_path, tiny_cfg):
    store = PersonStore(ingest_person(tiny_captures, "000", tmp_path, CFG).path)
    samples = store.samples()
    assert len(samples) == tiny_cfg.sequences * tiny_cfg.frames * tiny_cfg.cameras
    held_seq = set(store.attrs["held_out_sequences"])
    for s in samples:
        if s.sequence in held_seq:
            assert s.split == "test_seq"
        elif s.serial == CFG.held_out_camera:
            assert s.split == "test_cam"
        else:
            assert s.split == "train"
    counts = {k: len(store.samples(k)) for k in ("train", "test_seq", "test_cam")}
    assert counts == {"train": 2 * 2 * 2, "test_seq": 1 * 2 * 3, "test_cam": 2 * 2 * 1}
    assert len({s.key for s in samples}) == len(samples)


def test_rerun_is_idempotent_and_change_rebuilds(capture_copy, tmp_path):
    out = tmp_path / "zarr"
    first = ingest_person(capture_copy, "000", out, CFG)
    stamp = (first.path / "zarr.json").stat().st_mtime_ns
    again = ingest_person(capture_copy, "000", out, CFG)
    assert again.skipped and (first.path / "zarr.json").stat().st_mtime_ns == stamp
    assert ingest_person(capture_copy, "000", out, replace(CFG, io_threads=1)).skipped  # how fast, not what
    # Touching an input (new mtime) makes the store stale.
    mesh = PersonCapture(capture_copy, "000").mesh_path(PersonCapture(capture_copy, "000").sequences()[0], 0)
    os.utime(mesh, ns=(mesh.stat().st_atime_ns, mesh.stat().st_mtime_ns + 10**9))
    rebuilt = ingest_person(capture_copy, "000", out, CFG)
    assert not rebuilt.skipped
    assert sorted(p.name for p in out.iterdir()) == ["000.zarr"]  # no temp or old stores left


def _cap(root: Path) -> PersonCapture:
    return PersonCapture(root, "000")


def _first(cap: PersonCapture) -> tuple[str, int, str]:
    seq = cap.sequences()[0]
    return seq, cap.timesteps(seq)[0], Calibration.load(cap.calibration_path).serials[0]


def _rewrite_mesh(cap: PersonCapture, **changes) -> Path:
    seq, t, _ = _first(cap)
    p = cap.mesh_path(seq, t)
    m = MeshFrame.load(p)
    for k, v in changes.items():
        setattr(m, k, v(getattr(m, k)))
    m.save(p)
    return p


def _nan_vertices(v):
    v = v.copy()
    v[3, 1] = np.nan
    return v


def _float64_beyond_float32(cap: PersonCapture) -> Path:
    """A mesh saved as float64 (as a tracker may) with one finite vertex coordinate float32 cannot hold."""
    p = cap.mesh_path(*_first(cap)[:2])
    m = MeshFrame.load(p)
    vertices = m.vertices.astype(np.float64)
    vertices[0, 0] = 1e39
    np.savez(p, vertices=vertices, faces=m.faces, canonical=m.canonical, expression=m.expression)
    return p


def _bad_faces(f):
    f = f.copy()
    f[0, 0] = 10**6
    return f


BREAKERS = {
    "missing camera": lambda cap: (cap.image_path(*_first(cap)).unlink(), cap.image_path(*_first(cap)).parent)[1],
    "extra camera": lambda cap: _extra_camera(cap),
    "nan vertices": lambda cap: _rewrite_mesh(cap, vertices=_nan_vertices),
    "vertices beyond float32": _float64_beyond_float32,
    "camera without intrinsics": lambda cap: _edit_json(cap.calibration_path, intrinsics=lambda d: dict(
        sorted(d.items())[1:])),
    "faces out of range": lambda cap: _rewrite_mesh(cap, faces=_bad_faces),
    "mismatched frame counts": lambda cap: _drop_mesh(cap),
    "wrong code dimension": lambda cap: _rewrite_mesh(cap, expression=lambda e: np.concatenate([e, [0.0]])),
    "unreadable image": lambda cap: _garbage(cap.image_path(*_first(cap))),
    "truncated image": lambda cap: _truncate(cap.image_path(*_first(cap))),
    "mismatched image size": lambda cap: _resize(cap.image_path(*_first(cap))),
    "mismatched alpha size": lambda cap: _resize(cap.alpha_path(*_first(cap))),
    "broken calibration": lambda cap: _garbage(cap.calibration_path),
    "calibration is a list": lambda cap: _write_json(cap.calibration_path, []),
    "world_2_cam is a list": lambda cap: _edit_json(cap.calibration_path, world_2_cam=lambda w: list(w.values())),
    "image_size is a string": lambda cap: _edit_json(cap.calibration_path, image_size=lambda s: "48x48"),
    "image_size entry is a string": lambda cap: _edit_json(cap.calibration_path,
                                                           image_size=lambda s: {k: "48x48" for k in s}),
    "zero world_2_cam": lambda cap: _edit_json(cap.calibration_path, world_2_cam=lambda w: {
        k: (np.zeros((4, 4)).tolist() if i == 0 else v) for i, (k, v) in enumerate(sorted(w.items()))}),
    "tracking meta is a list": lambda cap: _write_json(cap.tracking_meta_path, [10, "nphm"]),
    "expression_dim is a boolean": lambda cap: _edit_json(cap.tracking_meta_path, expression_dim=lambda d: True),
    "non-numeric frame folder": lambda cap: _mkdir(cap.timesteps_dir(cap.sequences()[0]) / "frame_abcde"),
    "mis-named frame folder": lambda cap: _mkdir(cap.timesteps_dir(cap.sequences()[0]) / "frame_7"),
    "mis-named mesh file": lambda cap: _copy_to(cap.mesh_path(*_first(cap)[:2]),
                                                cap.mesh_dir(cap.sequences()[0]) / "frame_x.npz"),
    "grayscale image": lambda cap: _grayscale(cap.image_path(*_first(cap))),
}
EXPECTED = {
    "missing camera": "missing cameras",
    "extra camera": "extra cameras not in the calibration: 999",
    "nan vertices": "1 vertices are NaN, inf or beyond float32's range",
    "vertices beyond float32": "1 vertices are NaN, inf or beyond float32's range",
    "camera without intrinsics": "has extrinsics but no intrinsics",
    "faces out of range": "face indices out of range",
    "mismatched frame counts": "mismatched frame counts",
    "wrong code dimension": "expression code must have dimension 10",
    "unreadable image": "unreadable image",
    "truncated image": "unreadable image",
    "mismatched image size": "image size 20x48 does not match",
    "mismatched alpha size": "alpha map size 20x48 does not match",
    "broken calibration": "unreadable camera calibration",
    "calibration is a list": "expected a JSON object with keys 'world_2_cam' and 'intrinsics', got a JSON array",
    "world_2_cam is a list": "world_2_cam must be an object mapping camera serial -> 4x4 matrix, got a JSON array",
    "image_size is a string": "image_size must be an object mapping camera serial -> [width, height], got a JSON "
                              "string",
    "image_size entry is a string": "must be [width, height] as two positive integers, got '48x48'",
    "zero world_2_cam": "world_2_cam's last row must be [0, 0, 0, 1]",
    "tracking meta is a list": "expected a JSON object with 'expression_dim' and 'mesh_kind', got a JSON array",
    "expression_dim is a boolean": "expression_dim must be a positive integer, got True",
    "non-numeric frame folder": "unexpected entry: the timesteps folder holds only frame folders",
    "mis-named frame folder": "unexpected entry: the timesteps folder holds only frame folders",
    "mis-named mesh file": "mesh file name must be frame_<timestep, 5+ digits>.npz",
    "grayscale image": "grayscale image has PIL mode L; the contract needs mode RGB",
}


def _write_json(p: Path, obj) -> Path:
    p.write_text(json.dumps(obj))
    return p


def _edit_json(p: Path, **changes) -> Path:
    raw = json.loads(p.read_text())
    for k, f in changes.items():
        raw[k] = f(raw[k])
    return _write_json(p, raw)


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _copy_to(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _grayscale(p: Path) -> Path:
    with Image.open(p) as im:
        im.convert("L").save(p)
    return p


def _extra_camera(cap: PersonCapture) -> Path:
    p = cap.image_path(*_first(cap))
    extra = p.parent / "cam_999.png"
    extra.write_bytes(p.read_bytes())
    return p.parent


def _drop_mesh(cap: PersonCapture) -> Path:
    seq, t, _ = _first(cap)
    cap.mesh_path(seq, t).unlink()
    return cap.mesh_dir(seq)


def _garbage(p: Path) -> Path:
    p.write_bytes(b"this is not what you think it is")
    return p


def _truncate(p: Path) -> Path:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _resize(p: Path) -> Path:
    Image.new("L" if "alpha" in str(p) else "RGB", (20, 48)).save(p)
    return p


@pytest.mark.parametrize("problem", sorted(BREAKERS))
def test_validation_errors_name_file_and_problem(problem, capture_copy, tmp_path):
    cap = _cap(capture_copy)
    culprit = BREAKERS[problem](cap)
    out = tmp_path / "zarr"
    with pytest.raises(DataError) as err:
        ingest_person(capture_copy, "000", out, CFG)
    assert err.value.path == culprit, str(err.value)
    assert str(culprit) in str(err.value) and EXPECTED[problem] in str(err.value)
    _assert_nothing_written(out)


def test_failed_rebuild_keeps_previous_store(capture_copy, tmp_path, tiny_cfg):
    out = tmp_path / "zarr"
    good = ingest_person(capture_copy, "000", out, CFG)
    _garbage(_cap(capture_copy).image_path(*_first(_cap(capture_copy))))
    with pytest.raises(DataError):
        ingest_person(capture_copy, "000", out, CFG)
    assert PersonStore(good.path).num_frames == tiny_cfg.sequences * tiny_cfg.frames
    assert sorted(p.name for p in out.iterdir()) == ["000.zarr"]


def test_nersemble_shared_intrinsics_without_image_size(capture_copy, tmp_path, tiny_cfg):
    cap = _cap(capture_copy)
    raw = json.loads(cap.calibration_path.read_text())
    raw["intrinsics"] = next(iter(raw["intrinsics"].values()))  # one shared 3x3, as NeRSemble ships it
    del raw["image_size"]
    cap.calibration_path.write_text(json.dumps(raw))
    store = PersonStore(ingest_person(capture_copy, "000", tmp_path, CFG).path)
    assert store.attrs["image_size"] == [tiny_cfg.image_size, tiny_cfg.image_size]


def test_intrinsics_with_float_noise_in_the_last_row_are_made_exact(capture_copy, tmp_path):
    """A last row of [0, 0, 1 + 1e-9] (a calibration tool's float noise) passes the ingest's tolerance; it is stored
    as exactly [0, 0, 1], which the rasterizers need, so the shards stage does not fail on it after the ingest
    passed (it did: a bare ValueError of the rasterizer, not a DataError naming the calibration)."""
    cap = _cap(capture_copy)
    _edit_json(cap.calibration_path, intrinsics=lambda d: {k: [*K[:2], [1e-12, 0, 1 + 1e-9]] for k, K in d.items()})
    calibration = Calibration.load(cap.calibration_path)
    for camera in calibration.cameras.values():
        assert camera.K[2].tolist() == [0.0, 0.0, 1.0]
    store = PersonStore(ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).path)
    shards = write_shards([store.path], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert not shards.failed and shards.written


def test_an_image_replaced_after_the_ingest_by_one_of_another_size_fails_its_person_at_the_shards(capture_copy,
                                                                                                 tmp_path):
    """The shards stage reads the images the store points to: one replaced since the ingest by an image of another
    size is an error naming it, not stretched onto the camera's pixels (the shards then misaligned with the
    rasterized buffers)."""
    store = ingest_person(capture_copy, "000", tmp_path / "zarr", CFG).path
    cap = _cap(capture_copy)
    seq, t, serial = _first(cap)
    Image.new("RGB", (10, 10)).save(cap.image_path(seq, t, serial))
    shards = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert f"{cap.image_path(seq, t, serial)}: is 10x10, but the store's camera is" in shards.failed["000"]


def test_flame_meshes_get_zero_ambient(capture_copy, tmp_path):
    cap = _cap(capture_copy)
    meta = json.loads(cap.tracking_meta_path.read_text())
    meta["mesh_kind"] = "flame"
    cap.tracking_meta_path.write_text(json.dumps(meta))
    for seq in cap.sequences():
        for t in cap.mesh_timesteps(seq):
            m = MeshFrame.load(cap.mesh_path(seq, t))
            m.canonical = m.canonical[:, :3]
            m.save(cap.mesh_path(seq, t))
    store = PersonStore(ingest_person(capture_copy, "000", tmp_path, CFG).path)
    assert store.attrs["canonical_dim"] == 3
    assert np.all(store.mesh(0).canonical[:, 3:] == 0)
    assert store.attrs["ambient_bounds"] == [[0.0, 0.0], [0.0, 0.0]]  # the zeros it holds; it was [[], []]
    shards = write_shards([store.path], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert not shards.failed and shards.written


def _store_copy(tiny_stores: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_stores / "000.zarr", tmp_path / "000.zarr")
    return tmp_path / "000.zarr"


def _first_chunk(store: Path, array: str) -> Path:
    return min(p for p in (store / array / "c").rglob("*") if p.is_file())


def test_a_store_missing_a_chunk_file_is_refused_when_opened(tiny_stores, tmp_path):
    """zarr reads a missing chunk as its fill value: an all-False held_out chunk (a real file since format 3) or a
    vertices chunk lost in a copy must not read as zeros."""
    path = _store_copy(tiny_stores, tmp_path)
    PersonStore(path)
    _first_chunk(path, "frames/expression").unlink()
    with pytest.raises(DataError, match="array frames/expression lacks 1 of its 1 chunk files"):
        PersonStore(path)


def test_a_changed_byte_in_a_store_chunk_fails_the_read(tiny_stores, tmp_path):
    path = _store_copy(tiny_stores, tmp_path)
    chunk = _first_chunk(path, "meshes/vertices")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    store = PersonStore(path)
    with pytest.raises(DataError, match="array meshes/vertices is corrupt: .*checksum"):
        store.mesh(0)
    shards = write_shards([path], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert "000" in shards.failed and "meshes/vertices is corrupt" in shards.failed["000"]


def test_held_out_camera_must_exist(capture_copy, tmp_path):
    with pytest.raises(DataError, match="held-out camera 123 is not in the calibration"):
        ingest_person(capture_copy, "000", tmp_path, IngestConfig(held_out_sequences=1, held_out_camera="123"))


def test_too_many_held_out_sequences(capture_copy, tmp_path):
    with pytest.raises(DataError, match="cannot hold out 3"):
        ingest_person(capture_copy, "000", tmp_path, IngestConfig(held_out_sequences=3))


def test_data_errors_survive_pickling():
    import pickle

    from avatars.data import ShardError

    for err in (DataError("/x/y.png", "unreadable image: boom"), ShardError("/s.tar", "truncated")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and back.path == err.path and str(back) == str(err)


def test_rotation_check_of_world_2_cam(capture_copy, tmp_path):
    cap = _cap(capture_copy)
    _edit_json(cap.calibration_path, world_2_cam=lambda w: {k: (np.diag([1.0, 1.0, -1.0, 1.0]).tolist() if i == 0
                                                                else v) for i, (k, v) in enumerate(sorted(w.items()))})
    with pytest.raises(DataError, match="is not a rotation"):
        ingest_person(capture_copy, "000", tmp_path, CFG)


@pytest.mark.parametrize("change", ["empty frame folder", "mis-named folder", "moved capture root"])
def test_up_to_date_check_covers_folders_and_the_root(change, capture_copy, tmp_path):
    """A store is only 'up to date' when nothing it depends on changed: folders added after the
    first ingest (even empty ones) and the capture root the store's image paths point into."""
    out = tmp_path / "zarr"
    ingest_person(capture_copy, "000", out, CFG)
    assert ingest_person(capture_copy, "000", out, CFG).skipped
    cap = _cap(capture_copy)
    timesteps = cap.timesteps_dir(cap.sequences()[0])
    if change == "empty frame folder":
        (timesteps / "frame_00099").mkdir()
        with pytest.raises(DataError, match=r"frames without mesh: \[99\]"):
            ingest_person(capture_copy, "000", out, CFG)
    elif change == "mis-named folder":
        (timesteps / "frame_00099 (copy)").mkdir()
        with pytest.raises(DataError, match="unexpected entry"):
            ingest_person(capture_copy, "000", out, CFG)
    else:
        moved = tmp_path / "moved"
        os.replace(capture_copy, moved)
        res = ingest_person(moved, "000", out, CFG)
        assert not res.skipped and PersonStore(res.path).attrs["source_root"] == str(moved.resolve())


def test_a_change_inside_a_linked_sequence_folder_makes_the_store_stale(capture_copy, tmp_path):
    """A sequence folder that is a symbolic link into other storage (as large downloads are kept): its files are
    the capture's, so a changed image there makes the store stale and the re-run validates it, rather than the
    store (and the shards made from it) being taken as up to date."""
    cap = _cap(capture_copy)
    seq = cap.sequences()[0]
    kept = tmp_path / "storage" / seq
    kept.parent.mkdir()
    os.replace(capture_copy / "000" / "sequences" / seq, kept)
    (capture_copy / "000" / "sequences" / seq).symlink_to(kept, target_is_directory=True)
    out = tmp_path / "zarr"
    assert not ingest_person(capture_copy, "000", out, CFG).skipped
    assert ingest_person(capture_copy, "000", out, CFG).skipped
    _, t, serial = _first(cap)
    Image.new("RGB", (10, 10)).save(cap.image_path(seq, t, serial))
    with pytest.raises(DataError, match="image size 10x10 does not match"):
        ingest_person(capture_copy, "000", out, CFG)


def test_empty_capture_root_is_an_error(tmp_path):
    from jobs.ingest import IngestArgs, main

    (tmp_path / "captures" / "not-a-person").mkdir(parents=True)
    with pytest.raises(DataError, match="no person folders"):
        main(IngestArgs(captures=tmp_path / "captures", out=tmp_path / "zarr", persons="all", workers=1))


def test_ingest_job_force_rebuilds_an_up_to_date_store(tiny_captures, tiny_cfg, tmp_path, capsys):
    """jobs/ingest.py --force rewrites an up-to-date store, which a run without it leaves untouched; a capture only
    touched keeps its store and says so."""
    import shutil

    import tyro

    from jobs import ingest as ingest_job

    captures, out = tmp_path / "captures", tmp_path / "zarr"
    shutil.copytree(tiny_captures / "000", captures / "000")  # with its mtimes: touched below

    def run(*flags: str) -> tuple[int, int, str]:
        args = tyro.cli(ingest_job.IngestArgs, args=["--captures", str(captures), "--out", str(out),
                                                     "--persons", "000", "--ingest.held-out-sequences", "1",
                                                     "--workers", "1", *flags])
        results, errors = ingest_job.main(args)
        assert not errors and list(results) == ["000"]
        meta = (out / "000.zarr" / "zarr.json").stat()
        return meta.st_ino, meta.st_mtime_ns, capsys.readouterr().out

    first = run()
    assert "(written)" in first[2]
    again = run()
    assert again[:2] == first[:2] and "(up to date)" in again[2]
    forced = run("--force")
    assert forced[0] != first[0] and "(written)" in forced[2]  # a new store replaced the old one
    for f in (captures / "000").rglob("*"):
        os.utime(f)
    touched = run()
    assert "(content unchanged, store kept)" in touched[2]
    assert sorted(p.name for p in out.iterdir()) == [".ingest.lock", "000.zarr"]  # the lock: an ingest at a time
    assert PersonStore(out / "000.zarr").num_frames == tiny_cfg.sequences * tiny_cfg.frames


def test_a_valid_held_out_camera_becomes_the_novel_view_split(tiny_captures, tmp_path, tiny_cfg):
    """IngestConfig.held_out_camera: a valid non-default camera's frames form test_cam, none of them train."""
    from shards.synthetic import FRONTAL_SERIAL
    from shards.writer import plan_person

    serial = next(s for s in tiny_cfg.serials if s != FRONTAL_SERIAL)
    config = IngestConfig(held_out_sequences=1, held_out_camera=serial, io_threads=2)
    store = PersonStore(ingest_person(tiny_captures, "000", tmp_path, config).path)
    assert store.attrs["held_out_camera"] == serial
    train_seqs = set(store.sequences) - set(store.attrs["held_out_sequences"])
    test_cam = store.samples("test_cam")
    assert {s.serial for s in test_cam} == {serial}
    assert len(test_cam) == len(train_seqs) * tiny_cfg.frames
    train = store.samples("train")
    assert serial not in {s.serial for s in train} and FRONTAL_SERIAL in {s.serial for s in train}
    tasks = plan_person(store.path, tmp_path / "shards", TINY_SHARDS)
    assert {s.serial for t in tasks if t.split == "test_cam" for s in t.samples} == {serial}
    assert serial not in {s.serial for t in tasks if t.split == "train" for s in t.samples}


@pytest.mark.parametrize("threads", [1, 3])
def test_io_threads_is_the_number_of_threads_that_check_images(threads, tiny_captures, tmp_path, monkeypatch):
    """IngestConfig.io_threads: the images are decoded and checked on that many threads, and all of them."""
    import threading
    import time

    import shards.ingest as ingest

    check, used = ingest._check_image, set()

    def timed(*args):
        used.add(threading.get_ident())
        time.sleep(0.01)  # a decode long enough that every thread of the pool takes some
        return check(*args)

    monkeypatch.setattr(ingest, "_check_image", timed)
    res = ingest_person(tiny_captures, "000", tmp_path, IngestConfig(held_out_sequences=1, io_threads=threads))
    assert res.images > 3 * threads and len(used) == threads


def test_ingest_config_refuses_negative_holdouts_and_no_threads():
    """IngestConfig: a negative held_out_sequences or io_threads below 1 is refused when built, naming the field."""
    with pytest.raises(ValueError, match=r"held_out_sequences must be >= 1 .*, got -1"):
        IngestConfig(held_out_sequences=-1)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"io_threads must be >= 1, got {bad}"):
            IngestConfig(io_threads=bad)


def test_a_capture_whose_only_camera_is_the_held_out_one_is_refused(tmp_path):
    """A capture of the held-out camera alone (`--synthetic.cameras 1`) has no training sample: refused naming the
    calibration and --ingest.held-out-camera, nothing written (was: a store and shards with 0 training samples,
    and the base pretraining failed later on "no 'train' shards")."""
    from shards.synthetic import FRONTAL_SERIAL, SyntheticConfig, generate

    generate(SyntheticConfig(persons=1, sequences=2, frames=1, cameras=1, image_size=8, n_lat=4, n_lon=4,
                             expression_dim=10), tmp_path / "captures")
    capture = PersonCapture(tmp_path / "captures", "000")
    assert Calibration.load(capture.calibration_path).serials == [FRONTAL_SERIAL]
    with pytest.raises(DataError, match=rf"camera_params.json: the only camera is the held-out camera "
                                        rf"{FRONTAL_SERIAL} \(--ingest.held-out-camera\)"):
        ingest_person(tmp_path / "captures", "000", tmp_path / "zarr", CFG)
    _assert_nothing_written(tmp_path / "zarr")


def test_no_held_out_sequences_is_refused_when_the_options_are_parsed():
    """--ingest.held-out-sequences 0 left the test_seq split empty, and the base pretraining (its VAE's held-out
    PSNR) and the self-reenactment evaluation then failed: refused when built, naming the field (exit code 2)."""
    import tyro

    from jobs.ingest import IngestArgs

    with pytest.raises(ValueError, match=r"^held_out_sequences must be >= 1 .*test_seq.*, got 0$"):
        IngestConfig(held_out_sequences=0)
    with pytest.raises(SystemExit) as exit_:
        tyro.cli(IngestArgs, args=["--ingest.held-out-sequences", "0"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("job", ["ingest", "preprocess"])
def test_a_person_list_that_names_no_person_is_refused(tiny_captures, tmp_path, monkeypatch, capsys, job):
    """jobs/ingest.py and jobs/preprocess.py --persons , name no person: exit code 2 and one line naming --persons
    (was: exit code 0, nothing done and nothing said)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[2] / "jobs" / f"{job}.py"
    where = ["--captures", str(tiny_captures)] if job == "ingest" else ["--stores", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(script), *where, "--out", str(tmp_path / "out"), "--persons", " , "])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.endswith("error: --persons ' , ' names no person (give 'all' or "
                                                  "comma-separated ids, e.g. 017,018)\n"), err
    assert not (tmp_path / "out").exists()


def test_an_image_that_is_no_regular_file_is_named_so(capture_copy, tmp_path):
    """A pipe or a folder where an image should be was reported as "image is missing"."""
    cap = PersonCapture(capture_copy, "000")
    seq, t, serial = _first(cap)
    cap.image_path(seq, t, serial).unlink()
    cap.image_path(seq, t, serial).mkdir()
    with pytest.raises(DataError, match="image is not a regular file"):
        ingest_person(capture_copy, "000", tmp_path / "zarr", CFG)
