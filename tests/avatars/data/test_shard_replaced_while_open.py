"""A shard that a preprocess rewrites (renames a new file over) while a loader has it open: the loader's member
index is of the file it replaced, so it must refuse the new file, not read it by the old offsets, fail the checksums
and mark the new, good shard corrupt; and a corrupt read of the old file must not mark the new one. Opening stats
each shard once."""

from __future__ import annotations

import os
import shutil

import pytest

from avatars.data import LoaderConfig, ShardDataset, ShardError
from shards import integrity
from shards.testing import rot_bit
from shards.writer import shard_paths

CFG = LoaderConfig(resolution=32, batch_size=4, num_workers=0)


def _copy(loader_shards, tmp_path):
    shutil.copytree(loader_shards / "000", tmp_path / "000")
    return shard_paths(tmp_path, "000", "train")


def _rename_over(source, target) -> None:
    """What the preprocess does with a shard it wrote: a whole file renamed over the old name."""
    tmp = target.with_name(f".{target.name}.new")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def test_a_shard_rewritten_after_the_open_is_refused_and_not_marked_corrupt(loader_shards, tmp_path):
    paths = _copy(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    _rename_over(paths[1], paths[0])  # a rebuild from other inputs: other members at other offsets
    with pytest.raises(ShardError, match=rf"{paths[0]}: the shard was replaced since the loader opened it.*open the "
                                         r"shards again"):
        ds[0]
    assert integrity.corrupt_mark(paths[0]) is None  # the new shard is not condemned
    reopened = ShardDataset(paths, LoaderConfig(resolution=32, batch_size=4, num_workers=0), verify=False)
    reopened[0]  # opened again, it reads (its index is walked anew)


def test_a_corrupt_read_of_a_replaced_shard_does_not_mark_its_successor(loader_shards, tmp_path):
    paths = _copy(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    ds[0]  # the loader holds shard 0 open from here on
    shard, key, exts = ds.index[1]
    assert shard == 0
    offset, size = exts["json"]
    rot_bit(paths[0], offset + size // 2)  # bit rot in the file the loader reads ...
    _rename_over(loader_shards / "000" / paths[0].name, paths[0])  # ... which a preprocess has rebuilt meanwhile
    with pytest.raises(ShardError, match=rf"corrupt sample {key}.*replaced or removed since.*not marked"):
        ds[1]
    assert integrity.corrupt_mark(paths[0]) is None
    ShardDataset(paths, CFG)[1]  # the rebuilt shard reads


def test_a_corrupt_read_of_the_shard_in_place_still_marks_it(loader_shards, tmp_path):
    paths = _copy(loader_shards, tmp_path)
    ds = ShardDataset(paths, CFG)
    ds[0]
    _, key, exts = ds.index[1]
    offset, size = exts["json"]
    rot_bit(paths[0], offset + size // 2)
    with pytest.raises(ShardError, match=rf"corrupt sample {key}.*marked for a rebuild"):
        ds[1]
    assert "checksum mismatch" in integrity.corrupt_mark(paths[0])


def test_opening_stats_each_shard_once(loader_shards, tmp_path, monkeypatch):
    paths = _copy(loader_shards, tmp_path)
    os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))  # hashed, re-indexed
    shards = {os.fspath(p) for p in paths}
    calls = []
    real = os.stat

    def counting(path, *args, **kwargs):
        if os.fspath(path) in shards:
            calls.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting)
    ShardDataset(paths, CFG)
    assert sorted(calls) == sorted(shards)
