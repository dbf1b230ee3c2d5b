"""ShardDataset's side of shard integrity: every sample is checked against its checksum when read (with or
without a manifest), opening trusts a shard whose size and mtime match its `verified.json` record (no read), a
corrupt sample marks its shard for the next preprocess, and a marked shard is refused until it is rebuilt."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile

import pytest

from avatars.data import LoaderConfig, ShardDataset, ShardError
from shards import integrity
from shards.testing import TINY_SHARDS, rot_bit
from shards.writer import shard_paths, write_shards

CFG = LoaderConfig(resolution=32, batch_size=4, num_workers=0)


def _copies(loader_shards, tmp_path) -> list:
    """Person 000's training shards copied alone into `tmp_path` (no manifest beside them)."""
    paths = []
    for p in shard_paths(loader_shards, "000", "train"):
        paths.append(tmp_path / p.name)
        shutil.copy(p, paths[-1])
    return paths


def _no_hashing(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"{path} was hashed")
    monkeypatch.setattr(integrity, "file_sha256", refuse)


@pytest.mark.parametrize("member", ["expr.npy", "json", "geom.npy.zst"])
def test_a_flipped_byte_is_found_when_its_sample_is_read_without_a_manifest(loader_shards, tmp_path, member):
    paths = _copies(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    shard, key, exts = ds.index[5]
    off, size = exts[member]
    rot_bit(paths[shard], off + (size - 4 if member == "expr.npy" else size // 2))  # expr: a float's lowest byte
    ds[4], ds[6]  # the other samples are intact
    with pytest.raises(ShardError, match=rf"{paths[shard]}.*corrupt sample {key}.*checksum mismatch.*next "
                                         r"jobs/preprocess.py run rebuilds it"):
        ds[5]
    assert "checksum mismatch" in integrity.corrupt_mark(paths[shard])
    with pytest.raises(ShardError, match=rf"{paths[shard]}: a reader found it corrupt"):
        ShardDataset(paths, CFG)


def test_opening_does_not_read_shards_whose_size_and_mtime_match(loader_shards, tmp_path, monkeypatch):
    shutil.copytree(loader_shards / "000", tmp_path / "000")  # copy2 keeps the mtimes
    paths = shard_paths(tmp_path, "000", "train")
    _no_hashing(monkeypatch)
    assert len(ShardDataset(paths, CFG)) > 0
    touched = paths[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match=f"{touched} was hashed"):  # another mtime: hashed (and not recorded:
        ShardDataset(paths, CFG)                                        # only the preprocess writes the records)
    monkeypatch.undo()
    assert len(ShardDataset(paths, CFG)) > 0


def test_bit_rot_found_in_training_is_rebuilt_by_the_next_preprocess(tiny_dataset, tmp_path, monkeypatch):
    _, stores, shards = tiny_dataset
    shutil.copytree(shards / "000", tmp_path / "000")
    paths = shard_paths(tmp_path, "000", "train")
    victim = paths[1]
    original = victim.read_bytes()
    ds = ShardDataset(paths, CFG, verify=False)
    i = next(i for i, (s, _, _) in enumerate(ds.index) if s == 1)
    _, key, exts = ds.index[i]
    off, size = exts["json"]
    rot_bit(victim, off + size // 2)  # size and mtime unchanged: opening trusts it, the read does not
    _no_hashing(monkeypatch)
    ds = ShardDataset(paths, CFG)
    with pytest.raises(ShardError, match=rf"{victim}: corrupt sample {key}: .*the next jobs/preprocess.py run "
                                         r"rebuilds it"):
        ds[i]
    res = write_shards([stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert res.written == [f"000/{victim.name}"] and f"000/{victim.name}" in res.rebuilt
    assert victim.read_bytes() == original and not integrity.corrupt_marker(victim).exists()
    ds = ShardDataset(paths, CFG)
    ds[i]


@pytest.mark.parametrize("boundary", [False, True], ids=["inside a sample", "first of the second sample"])
def test_a_damaged_tar_header_fails_the_open_and_marks_the_shard(loader_shards, tmp_path, boundary):
    """A header whose checksum fails (bit rot in a member's name or size) ends `tarfile`'s member list: at a
    sample boundary the samples after it would vanish without a word. Size and mtime are unchanged, so the
    preprocess's check keeps the shard: the reader marks it."""
    victim = tmp_path / "train-000000.tar"
    shutil.copy(shard_paths(loader_shards, "000", "train")[0], victim)
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    second = next(i for i, m in enumerate(members) if m.name.split(".")[0] != members[0].name.split(".")[0])
    rot_bit(victim, members[second if boundary else 1].offset + 10)  # inside the member's name
    with pytest.raises(ShardError, match=f"{victim}: corrupt .*next jobs/preprocess.py run rebuilds it"):
        ShardDataset([victim], CFG)
    assert integrity.corrupt_mark(victim)


def test_a_read_only_folder_still_names_the_corrupt_sample(loader_shards, tmp_path, monkeypatch):
    victim = tmp_path / "train-000000.tar"
    shutil.copy(shard_paths(loader_shards, "000", "train")[0], victim)
    ds = ShardDataset([victim], CFG)
    _, key, exts = ds.index[0]
    rot_bit(victim, exts["expr.npy"][0] + exts["expr.npy"][1] - 4)

    def read_only(path, data, mode=None):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(integrity, "atomic_write_bytes", read_only)
    with pytest.raises(ShardError, match=f"corrupt sample {key}.*could not be marked for a rebuild.*--verify-all"):
        ds[0]


def test_a_shard_of_the_previous_codec_is_refused_when_opened(loader_shards, tmp_path):
    """Its samples carry no checksum: it cannot be read safely (the next preprocess rebuilds it)."""
    victim = tmp_path / "train-000000.tar"
    with tarfile.open(shard_paths(loader_shards, "000", "train")[0]) as src, tarfile.open(victim, "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith(".sha256"):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ShardError, match=f"{victim}.*lacks sha256"):
        ShardDataset([victim], CFG)


@pytest.mark.parametrize("code, marked", [(errno.EIO, True), (errno.EACCES, False)])
def test_a_read_the_system_refuses_names_the_shard_and_an_io_error_marks_it(loader_shards, tmp_path, monkeypatch,
                                                                            code, marked):
    paths = _copies(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    shard, key, exts = ds.index[3]
    bad = exts["rgb.npy.zst"][0]
    real = os.pread

    def pread(fd, size, offset):  # the sector under sample 3's image fails (a bad disk block)
        if offset == bad and os.path.samefile(f"/proc/self/fd/{fd}", paths[shard]):
            raise OSError(code, os.strerror(code))
        return real(fd, size, offset)

    monkeypatch.setattr(os, "pread", pread)
    ds[2]
    with pytest.raises(ShardError, match=rf"{paths[shard]}: cannot read \d+ bytes at offset {bad}: "
                                         rf"{os.strerror(code)}"):
        ds[3]
    assert (integrity.corrupt_mark(paths[shard]) is not None) == marked
