"""A capture touched, copied without its mtimes or moved is checked by hashing, not ingested again: the store records
every file the ingest read with its size, mtime and sha256 (`shards.ingest.TABLE`), the files are statted and those
whose size or mtime changed hashed (no image decoded), and when the content identity they give is the store's, the
store is kept (its arrays byte-identical) with its fingerprint, capture root and table updated. A changed byte with a
new mtime, another layout, a damaged or missing table, a store written before the table existed: ingested again."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import shards.ingest as ingest
from shards.ingest import CONTENT, TABLE, ingest_person
from shards.store import PersonStore
from shards.testing import TINY_INGEST, TINY_SHARDS
from shards.writer import write_shards

#: The attributes a kept store may change: those of the capture's stat and root, and its table.
ROOT_ATTRS = {"fingerprint", "source_root", TABLE}


@pytest.fixture
def work(tiny_data, tmp_path):
    """A private copy of person 000's capture (with mtimes) ingested into a store of its own, and the shared shards
    of 000 copied beside it: they are the store's (same content identity), nothing is written."""
    captures, _, shards = tiny_data
    root = tmp_path / "captures"
    shutil.copytree(captures / "000", root / "000")
    shutil.copytree(shards / "000", tmp_path / "shards" / "000")
    store = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST).path
    res = write_shards([store], tmp_path / "shards", TINY_SHARDS, progress=False)
    assert res.written == [] and not res.failed
    return root, store, tmp_path / "shards"


def _arrays(store: Path) -> dict[str, bytes]:
    """Every file of the store but its root metadata and its table, by relative path."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store).as_posix() != "zarr.json" and not p.name.startswith("inputs-")}


def _tars(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.tar")}


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The images the ingest opens (decodes or sizes) from now on."""
    opened = []
    real = ingest.Image.open

    def counting(fp, *a, **k):
        opened.append(str(fp))
        return real(fp, *a, **k)

    monkeypatch.setattr(ingest.Image, "open", counting)
    return opened


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files the ingest reads (and hashes) from now on."""
    read = []
    real = ingest._read_hashed

    def counting(path):
        read.append(str(path))
        return real(path)

    monkeypatch.setattr(ingest, "_read_hashed", counting)
    return read


def _touch_all(root: Path, seconds: int = 5) -> int:
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))
            n += 1
    return n


def _flip_byte(path: Path, restore_mtime: bool) -> None:
    """One byte of ``path`` changed (same size); its mtime set back when ``restore_mtime``, else a later one."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    mtime = st.st_mtime_ns if restore_mtime else st.st_mtime_ns + 7 * 10**9
    os.utime(path, ns=(st.st_atime_ns, mtime))


def _table(store: Path) -> list[list]:
    attr = PersonStore(store).attrs[TABLE]
    data = (store / attr["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == attr["sha256"]
    return [json.loads(line) for line in gzip.decompress(data).splitlines()]


def test_a_touched_capture_keeps_its_store_and_decodes_nothing(work, tmp_path, decodes, reads):
    root, store, shards = work
    arrays, attrs, tars = _arrays(store), PersonStore(store).attrs, _tars(shards / "000")
    listed = {e[1] for e in _table(store)}
    _touch_all(root)
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert res.kept and not res.skipped and res.frames == PersonStore(store).num_frames
    assert decodes == []  # no image decoded or opened
    assert sorted(reads) == sorted(str(root / "000" / rel) for rel in listed)  # each file the ingest reads, once
    assert _arrays(store) == arrays
    after = PersonStore(store).attrs
    assert {k for k in after.keys() | attrs.keys() if after.get(k) != attrs.get(k)} == {"fingerprint", TABLE}
    assert after[CONTENT] == attrs[CONTENT]
    entries = _table(store)
    assert {e[1]: e[3] for e in entries} == {p.relative_to(root / "000").as_posix(): p.stat().st_mtime_ns
                                            for p in map(Path, reads)}  # the new mtimes recorded
    res = write_shards([store], shards, TINY_SHARDS, progress=False)
    assert res.written == [] and not res.failed and _tars(shards / "000") == tars
    reads.clear()
    again = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert again.skipped and not again.kept and reads == [] and decodes == []


def test_a_capture_copied_without_mtimes_is_kept_and_read_from_its_new_root(work, tmp_path, decodes):
    root, store, shards = work
    arrays, tars = _arrays(store), _tars(shards / "000")
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved, copy_function=shutil.copyfile)  # cp -r: new mtimes
    shutil.rmtree(root)
    res = ingest_person(moved, "000", tmp_path / "zarr", TINY_INGEST)
    assert res.kept and decodes == [] and _arrays(store) == arrays
    s = PersonStore(store)
    assert s.attrs["source_root"] == str(moved.resolve())
    assert all(p.is_file() and p.is_relative_to(moved.resolve()) for p in s.image_paths(s.samples()[0]))
    res = write_shards([store], shards, TINY_SHARDS, progress=False)
    assert res.written == [] and not res.failed and _tars(shards / "000") == tars
    # a shard written again reads its images from the new root (the old one is gone), with the bytes it had
    victim = sorted(shards.glob("000/*.tar"))[0]
    before = hashlib.sha256(victim.read_bytes()).hexdigest()
    victim.unlink()
    res = write_shards([store], shards, TINY_SHARDS, progress=False)
    assert res.written == [f"000/{victim.name}"] and not res.failed
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == before


def test_a_byte_changed_with_its_mtime_set_back_is_the_stat_s_trust_and_force_reads_it(work, tmp_path):
    """Size and mtime unchanged: the recorded sha256 is taken (the trust the stat fingerprint gives, with nothing
    else changed the store is up to date as it is); ``force`` reads and decodes every file again."""
    root, store, _ = work
    content = PersonStore(store).attrs[CONTENT]
    image = sorted((root / "000" / "sequences").rglob("images/cam_*.png"))[0]
    _touch_all(root / "000" / "tracking")
    _flip_byte(image, restore_mtime=True)
    assert ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST).kept
    assert PersonStore(store).attrs[CONTENT] == content
    with pytest.raises(ingest.DataError):  # the flipped byte breaks the PNG: only a full read finds it
        ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST, force=True)


def test_a_byte_changed_with_a_new_mtime_is_ingested_again(work, tmp_path, decodes):
    root, store, _ = work
    content = PersonStore(store).attrs[CONTENT]
    mesh = sorted((root / "000" / "tracking").rglob("frame_*.npz"))[0]
    data = dict(np.load(mesh))
    data["vertices"] = data["vertices"] + 1e-3
    with open(mesh, "wb") as f:
        np.savez(f, **data)
    os.utime(mesh, ns=(mesh.stat().st_atime_ns, mesh.stat().st_mtime_ns + 10**9))
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert not res.kept and not res.skipped and decodes  # every image decoded again
    s = PersonStore(store)
    assert s.attrs[CONTENT] not in (content, None)
    rel = mesh.relative_to(root / "000").as_posix()
    assert [e[4] for e in _table(store) if e[1] == rel] == [hashlib.sha256(mesh.read_bytes()).hexdigest()]


@pytest.mark.parametrize("damage", ["flipped", "missing", "truncated", "forged"])
def test_a_damaged_or_missing_table_is_not_trusted(work, tmp_path, decodes, damage):
    root, store, _ = work
    attr = PersonStore(store).attrs[TABLE]
    table = store / attr["file"]
    if damage == "flipped":
        data = bytearray(table.read_bytes())
        data[len(data) // 2] ^= 0xFF
        table.write_bytes(bytes(data))
    elif damage == "missing":
        table.unlink()
    elif damage == "truncated":
        table.write_bytes(table.read_bytes()[:-20])
    else:  # valid gzip and sha recorded, but an untouched file's sha256 is not its own: the identity does not match
        lines = gzip.decompress(table.read_bytes()).splitlines()
        last = json.loads(lines[-1])
        last[4] = "0" * 64
        lines[-1] = json.dumps(last, separators=(",", ":")).encode()
        data = gzip.compress(b"\n".join(lines) + b"\n")
        table.write_bytes(data)
        group = zarr.open_group(str(store), mode="r+")
        group.attrs.update({TABLE: {**attr, "sha256": hashlib.sha256(data).hexdigest()}})
    _touch_all(root / "000" / "tracking" if damage == "forged" else root)
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert not res.kept and not res.skipped and decodes
    assert len(_table(store)) > 0  # the new store has a table of its own


def test_a_store_written_before_the_table_existed_is_ingested_again(work, tmp_path, decodes):
    root, store, _ = work
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    (store / attrs.pop(TABLE)["file"]).unlink()
    group.attrs.clear()
    group.attrs.update(attrs)
    _touch_all(root)
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert not res.kept and not res.skipped and decodes
    assert PersonStore(store).attrs[CONTENT] == attrs[CONTENT] and _table(store)


@pytest.mark.parametrize("change", ["empty folder", "extra file"])
def test_another_layout_is_ingested_again(work, tmp_path, decodes, change):
    """A folder or a file the ingest does not read, added: the layout it lists differs, so it validates again."""
    root, store, _ = work
    _touch_all(root)
    if change == "empty folder":
        (root / "000" / "calibration" / "old").mkdir()
    else:
        (root / "000" / "tracking" / "notes.txt").write_text("x")
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert not res.kept and decodes


def test_a_crash_between_the_table_and_the_metadata_leaves_a_stale_valid_store(work, tmp_path, monkeypatch):
    root, store, _ = work
    arrays, attrs = _arrays(store), PersonStore(store).attrs

    def crash(path, data):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ingest, "atomic_write_bytes", crash)  # the zarr.json rename, after the new table
    _touch_all(root)
    with pytest.raises(KeyboardInterrupt):
        ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert PersonStore(store).attrs == attrs and _arrays(store) == arrays and _table(store)  # old and stale
    monkeypatch.undo()
    res = ingest_person(root, "000", tmp_path / "zarr", TINY_INGEST)
    assert res.kept and _arrays(store) == arrays
    assert [p.name for p in store.glob("*inputs-*")] == [PersonStore(store).attrs[TABLE]["file"]]
