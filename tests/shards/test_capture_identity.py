"""The store's content identity: a capture touched, copied without its mtimes or moved to another root costs a
re-ingest and nothing more (no shard rewritten, the manifest byte-identical, the training data and evaluation
keys unchanged); a changed byte rebuilds the person's shards; a store written before stores recorded an identity
keeps the shard specs and evaluation key it had (the formulas of the previous version, pinned here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

import shards.ingest as ingest
from cluster.eval_driver.uptodate import data_digest
from common.fingerprint import file_digest, json_digest
from shards.codec import CODEC_VERSION
from shards.contract import PersonCapture
from shards.ingest import CONTENT, FORMAT_VERSION, VALIDATION_VERSION, ingest_person
from shards.store import PersonStore
from shards.testing import TINY_INGEST, TINY_SHARDS
from shards.writer import MANIFEST, SAMPLE_CHECKS, plan_person, sample_key, split_digest, write_shards


def _expected_content(capture: PersonCapture) -> str:
    """The content identity computed independently: each file the ingest reads as its path relative to the
    person's folder and the sha256 of its bytes, in two streams in reading order (the JSON files and the meshes;
    the images and alpha maps), after the versions and the split settings."""
    def lines(paths) -> str:
        h = hashlib.sha256()
        for p in paths:
            h.update(f"{p.relative_to(capture.dir).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
        return h.hexdigest()

    frames = [(seq, t) for seq in capture.sequences() for t in capture.timesteps(seq)]
    serials = sorted(json.loads(capture.calibration_path.read_text())["world_2_cam"])
    inputs = [capture.tracking_meta_path, capture.calibration_path, *(capture.mesh_path(*f) for f in frames)]
    images = [p for f in frames for s in serials for p in (capture.image_path(*f, s), capture.alpha_path(*f, s))]
    split = {"held_out_sequences": TINY_INGEST.held_out_sequences, "held_out_camera": TINY_INGEST.held_out_camera}
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "checks": VALIDATION_VERSION, "config": split},
                                  sort_keys=True).encode())
    h.update(f"{lines(inputs)}\n{lines(images)}\n".encode())
    return h.hexdigest()


def _tars(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every shard: a shard written again (a new file renamed into place) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.tar")}


@pytest.fixture
def work(tiny_data, tmp_path):
    """A private copy of person 000's capture ingested into a store of its own, and the shared shards of 000
    copied beside it with their mtimes: the store (same bytes, another root) has the shared store's content
    identity, so those shards are its own and nothing is written."""
    captures, stores, shards = tiny_data
    root = tmp_path / "captures"
    shutil.copytree(captures / "000", root / "000")  # copy2: with mtimes
    shutil.copytree(shards / "000", tmp_path / "shards" / "000")
    store = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST).path
    assert PersonStore(store).attrs[CONTENT] == PersonStore(stores / "000.zarr").attrs[CONTENT]
    res = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert res.written == [] and not res.failed and len(res.skipped) == len(_tars(tmp_path / "shards" / "000"))
    return root, store, tmp_path / "shards"


def _keys(store: Path, shards: Path) -> tuple[bytes, str, str]:
    """What the stages after the data stage key on: the manifest's bytes (the tiny base's key), the training data
    digest and the evaluation's data digest."""
    return ((shards / "000" / MANIFEST).read_bytes(), split_digest(shards, "000", "train"),
            data_digest(shards, store.parent, "000"))


def test_the_content_identity_is_every_read_file_s_sha256_by_relative_path(work):
    root, store, _ = work
    assert PersonStore(store).attrs[CONTENT] == _expected_content(PersonCapture(root, "000"))


def test_a_touched_capture_is_ingested_again_and_nothing_after_it_changes(work, tmp_path):
    root, store, shards = work
    tars, keys, content = _tars(shards / "000"), _keys(store, shards), PersonStore(store).attrs[CONTENT]
    image = next((root / "000" / "sequences").rglob("cam_*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    again = ingest_person(root, "000", tmp_path / "zarr", replace(TINY_INGEST, io_threads=1))  # how fast, not what
    assert not again.skipped and PersonStore(store).attrs[CONTENT] == content
    res = write_shards([store], shards, TINY_SHARDS, progress=False)
    assert res.written == [] and not res.failed
    assert _tars(shards / "000") == tars and _keys(store, shards) == keys


def test_a_capture_copied_without_mtimes_to_another_root_keeps_the_shards(work, tmp_path):
    root, store, shards = work
    tars, keys = _tars(shards / "000"), _keys(store, shards)
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved, copy_function=shutil.copyfile)  # cp -r: new mtimes
    shutil.rmtree(root)
    again = ingest_person(moved, "000", tmp_path / "zarr", TINY_INGEST)
    assert not again.skipped and PersonStore(store).attrs["source_root"] == str(moved.resolve())
    res = write_shards([store], shards, TINY_SHARDS, progress=False)  # reads its images from the new root
    assert res.written == [] and not res.failed
    assert _tars(shards / "000") == tars and _keys(store, shards) == keys


def test_a_changed_pixel_rebuilds_every_shard_of_the_person(work, tmp_path):
    """The identity is the store's, so every shard of the person is rebuilt (not only those of the changed frame);
    the shards of the other frames come out with the same bytes."""
    root, store, shards = work
    tars, keys, content = _tars(shards / "000"), _keys(store, shards), PersonStore(store).attrs[CONTENT]
    sha = {name: e["sha256"] for name, e in json.loads(keys[0])["shards"].items()}
    s = PersonStore(store)
    sample = s.samples("train")[0]
    image, alpha = s.image_paths(sample)
    pixels = np.asarray(Image.open(image)).copy()
    pixels[np.unravel_index(np.argmax(np.asarray(Image.open(alpha))), pixels.shape[:2])] ^= 1  # on the person
    Image.fromarray(pixels).save(image)
    assert not ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST).skipped
    assert PersonStore(store).attrs[CONTENT] not in (content, None)
    res = write_shards([store], shards, TINY_SHARDS, progress=False)
    assert sorted(res.written) == sorted(f"000/{name}" for name in tars) and not res.failed
    after = _keys(store, shards)
    assert after[1] != keys[1] and after[2] != keys[2]  # trained and evaluated again
    changed = {name for name, e in json.loads(after[0])["shards"].items() if e["sha256"] != sha[name]}
    assert changed == {"train-000000.tar"}  # the sample's shard: the others' bytes are the same


def _strip_identity(store: Path) -> None:
    """The store as the previous version wrote it: no content identity."""
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    del attrs[CONTENT]
    group.attrs.clear()
    group.attrs.update(attrs)


def _old_spec(store: PersonStore, keys: list[str]) -> str:
    """`shards.writer._spec_digest` before stores recorded a content identity (verbatim)."""
    h = hashlib.sha256(json.dumps({"fingerprint": store.attrs["fingerprint"], "config": asdict(TINY_SHARDS),
                                   "codec": CODEC_VERSION, "checks": SAMPLE_CHECKS}, sort_keys=True).encode())
    h.update("\n".join(keys).encode())
    return h.hexdigest()


def _old_data_digest(shards: Path, stores: Path, person: str) -> str:
    """`cluster.eval_driver.uptodate.data_digest` before stores recorded a content identity (verbatim)."""
    return json_digest({"manifest": file_digest(Path(shards) / person / MANIFEST),
                        "store": file_digest(Path(stores) / f"{person}.zarr" / "zarr.json")})


def test_a_store_of_the_previous_version_keeps_its_specs_and_evaluation_key(work, tmp_path, monkeypatch):
    root, store, shards = work
    _strip_identity(store)
    s = PersonStore(store)
    assert CONTENT not in s.attrs
    tasks = plan_person(store, shards, TINY_SHARDS)
    assert [t.spec for t in tasks] == [_old_spec(s, [sample_key("000", x) for x in t.samples]) for t in tasks]
    assert data_digest(shards, store.parent, "000") == _old_data_digest(shards, store.parent, "000")
    # Up to date as it is: the upgrade neither ingests it again (which would hash the capture) nor gives it one.
    monkeypatch.setattr(ingest, "_read_hashed", lambda path: pytest.fail(f"{path} read to decide"))
    assert ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST).skipped
    assert CONTENT not in PersonStore(store).attrs
