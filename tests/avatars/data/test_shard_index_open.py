"""Opening shards by their member index (`<shard>.index.json`): no tar header is read while the index can be
trusted (the shard's size and mtime as indexed, its digest, consistent with the shard); otherwise the headers are
walked with all their checks and the index written again (a read-only folder still trains, with a warning); a wrong
offset in a trusted index makes no corrupt sample train."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from avatars.data import LoaderConfig, ShardDataset, ShardError
from shards import integrity
from shards.integrity import index_path
from shards.testing import rot_bit
from shards.writer import shard_paths

CFG = LoaderConfig(resolution=32, batch_size=4, num_workers=0)


def _no_tar_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tar's headers were read")
    monkeypatch.setattr(tarfile, "open", refuse)


def _copy(loader_shards, tmp_path):
    """Person 000's shards with their member indexes and mtimes (as `cp -p` and rsync -t copy them)."""
    shutil.copytree(loader_shards / "000", tmp_path / "000")
    return shard_paths(tmp_path, "000", "train")


def _walked(paths) -> list[tuple[int, str, dict]]:
    """The index a walk of the tar headers gives (what the loader opened before the member indexes)."""
    return [(si, key, exts) for si, p in enumerate(paths) for key, exts in integrity.walk_shard(p, p.stat())]


def _rewrite(path, edit) -> None:
    """Edits the member index of the shard at `path` and writes it back with a matching digest (an index that a
    faulty writer would have made), keeping it stamped with the shard's size and mtime."""
    record = json.loads(index_path(path).read_text())
    edit(record)
    body = {k: v for k, v in record.items() if k != "sha256"}
    index_path(path).write_text(json.dumps({**body, "sha256": integrity._index_digest(body)}))


def test_opening_reads_no_tar_header_of_shards_with_a_member_index(loader_shards, tmp_path, monkeypatch):
    paths = _copy(loader_shards, tmp_path)
    expected = _walked(paths)
    _no_tar_reads(monkeypatch)
    ds = ShardDataset(paths, CFG)
    assert ds.index == expected
    ds[0], ds[len(ds) - 1]


def test_shards_without_an_index_are_walked_and_indexed_for_the_next_open(loader_shards, tmp_path, monkeypatch):
    """Shards written by an older version, or copied without their indexes."""
    paths = _copy(loader_shards, tmp_path)
    expected = _walked(paths)
    for p in paths:
        index_path(p).unlink()
    assert ShardDataset(paths, CFG).index == expected
    assert all(index_path(p).is_file() for p in paths)
    _no_tar_reads(monkeypatch)
    assert ShardDataset(paths, CFG).index == expected


def test_an_index_of_a_shard_touched_since_is_not_trusted(loader_shards, tmp_path, monkeypatch):
    paths = _copy(loader_shards, tmp_path)
    touched = paths[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    walked, real = [], tarfile.open

    def counting(name, *args, **kwargs):
        walked.append(os.path.basename(name))
        return real(name, *args, **kwargs)
    monkeypatch.setattr(tarfile, "open", counting)
    ShardDataset(paths, CFG)
    assert walked == [touched.name]
    assert json.loads(index_path(touched).read_text())["mtime_ns"] == touched.stat().st_mtime_ns


@pytest.mark.parametrize("damage", ["not json", "digest", "inconsistent"])
def test_a_damaged_or_inconsistent_index_is_replaced_by_a_walk(loader_shards, tmp_path, damage):
    paths = _copy(loader_shards, tmp_path)
    expected = _walked(paths)
    victim = paths[1]
    if damage == "not json":
        index_path(victim).write_bytes(index_path(victim).read_bytes()[:-20])
    elif damage == "digest":  # a flipped digit, the digest not recomputed
        record = json.loads(index_path(victim).read_text())
        record["samples"][0][1] += 1
        index_path(victim).write_text(json.dumps(record))
    else:  # the digest matches, but an offset is not on a tar block
        _rewrite(victim, lambda r: r["samples"][0].__setitem__(1, r["samples"][0][1] + 1))
    with pytest.warns(RuntimeWarning, match=rf"{index_path(victim)}: (damaged|inconsistent).*written again"):
        ds = ShardDataset(paths, CFG)
    assert ds.index == expected
    ds[next(i for i, (s, _, _) in enumerate(ds.index) if s == 1)]
    assert integrity.load_index(victim, victim.stat())[1] is None  # rewritten whole


@pytest.mark.parametrize("wrong", ["swapped members", "shifted by a block"])
def test_a_consistent_index_with_wrong_offsets_trains_nothing_wrong(loader_shards, tmp_path, wrong):
    """An index that passes every check of its own (size, mtime, digest, layout) but points at the wrong bytes:
    the sample's sha256 member fails, the shard is marked for a rebuild, nothing is decoded."""
    paths = _copy(loader_shards, tmp_path)
    victim = paths[0]

    def edit(record):
        first, second = record["samples"][0], record["samples"][1]
        if wrong == "swapped members":  # the rgb of sample 0 and 1 swapped
            first[1:3], second[1:3] = second[1:3], first[1:3]
        else:  # rgb's offset one block further, its size one block less: inside its own bytes
            assert first[2] > 2 * tarfile.BLOCKSIZE
            first[1] += tarfile.BLOCKSIZE
            first[2] -= tarfile.BLOCKSIZE
    _rewrite(victim, edit)
    ds = ShardDataset(paths, CFG)
    assert integrity.load_index(victim, victim.stat())[0] is not None  # trusted: the open did not walk
    _, key, _ = ds.index[0]
    with pytest.raises(ShardError, match=rf"{victim}: corrupt sample {key}: .*checksum mismatch"):
        ds[0]
    assert "checksum mismatch" in integrity.corrupt_mark(victim)


def test_a_read_only_folder_still_opens_with_one_warning(loader_shards, tmp_path, monkeypatch):
    paths = _copy(loader_shards, tmp_path)
    expected = _walked(paths)
    for p in paths:
        index_path(p).unlink()

    def read_only(path, data, mode=None):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(integrity, "atomic_write_bytes", read_only)
    with pytest.warns(RuntimeWarning, match=rf"{tmp_path / '000'}: the member index of {len(paths)} shard\(s\) could "
                                            r"not be written \(.*Permission denied.*jobs/preprocess.py") as caught:
        ds = ShardDataset(paths, CFG)
    assert len([w for w in caught if "member index" in str(w.message)]) == 1
    assert ds.index == expected and not any(index_path(p).exists() for p in paths)
    ds[0]


def test_a_damaged_tar_header_is_still_found_when_the_index_is_not_trusted(loader_shards, tmp_path):
    """The walk keeps its checks: a shard copied without its index (another mtime) whose header is damaged."""
    victim = tmp_path / "train-000000.tar"
    shutil.copy(shard_paths(loader_shards, "000", "train")[0], victim)
    with tarfile.open(victim) as tar:
        second = tar.getmembers()[len(integrity.MEMBERS)]
    rot_bit(victim, second.offset + 10)
    with pytest.raises(ShardError, match=f"{victim}: corrupt shard: the tar header"):
        ShardDataset([victim], CFG)
    assert integrity.corrupt_mark(victim) and not index_path(victim).exists()
