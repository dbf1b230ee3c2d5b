"""The member index written with each shard (`<shard>.index.json`): what the writer records is what a walk of the
tar headers reads; the preprocess indexes an up-to-date shard that has none (or whose mtime changed) instead of
rebuilding it, rebuilds one whose walk finds it damaged, and removes the indexes of shards it no longer plans."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

from shards import integrity, writer
from shards.integrity import MANIFEST, index_path
from shards.testing import TINY_SHARDS, rot_bit
from shards.writer import write_shards


def _copy(tiny_shards: Path, dst: Path) -> Path:
    shutil.copytree(tiny_shards / "000", dst / "000")
    return dst / "000"


def _counting_walks(monkeypatch) -> list[str]:
    walked, real = [], integrity.walk_shard

    def count(path, st):
        walked.append(Path(path).name)
        return real(path, st)
    monkeypatch.setattr(integrity, "walk_shard", count)
    monkeypatch.setattr(writer, "walk_shard", count)
    return walked


def test_the_writer_records_what_a_walk_of_the_tar_reads(tiny_shards):
    shards = sorted(tiny_shards.glob("*/*.tar"))
    assert shards
    for p in shards:
        st = p.stat()
        recorded, problem = integrity.load_index(p, st)
        assert problem is None and recorded == integrity.walk_shard(p, st), p
    # The manifest is as it was: the evaluation and base keys are derived from its bytes.
    for person in {p.parent for p in shards}:
        for entry in json.loads((person / MANIFEST).read_text())["shards"].values():
            assert set(entry) == {"split", "samples", "bytes", "sha256", "spec", "first_key", "last_key"}


def test_an_up_to_date_shard_without_an_index_is_indexed_not_rebuilt(tiny_stores, tiny_shards, tmp_path,
                                                                        monkeypatch):
    """Shards of an older version: the next preprocess walks each once (no hash, no rewrite), then none."""
    person = _copy(tiny_shards, tmp_path)
    old = person / "train-000001.tar"
    index_path(old).unlink()
    before = old.read_bytes(), old.stat().st_mtime_ns
    walked = _counting_walks(monkeypatch)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not res.written and not res.rebuilt and walked == [old.name]
    assert (old.read_bytes(), old.stat().st_mtime_ns) == before
    assert integrity.load_index(old, old.stat())[0] == integrity.walk_shard(old, old.stat())
    walked.clear()
    write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not walked  # the steady state reads no tar


def test_a_touched_shard_is_indexed_again(tiny_stores, tiny_shards, tmp_path):
    person = _copy(tiny_shards, tmp_path)
    touched = person / "train-000000.tar"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert integrity.load_index(touched, touched.stat()) == (None, None)  # stale
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not res.written
    assert integrity.load_index(touched, touched.stat())[0] is not None


def test_an_unindexed_shard_whose_tar_header_is_damaged_is_rebuilt(tiny_stores, tiny_shards, tmp_path):
    """Its size and mtime match (bit rot), so only the walk that indexes it sees the damage."""
    person = _copy(tiny_shards, tmp_path)
    victim = person / "train-000001.tar"
    original = victim.read_bytes()
    index_path(victim).unlink()
    with tarfile.open(victim) as tar:
        second = tar.getmembers()[len(integrity.MEMBERS)]
    rot_bit(victim, second.offset + 10)
    res = write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert res.written == [f"000/{victim.name}"] and "tar header" in res.rebuilt[f"000/{victim.name}"]
    assert victim.read_bytes() == original and not integrity.corrupt_marker(victim).exists()
    assert integrity.load_index(victim, victim.stat())[0] is not None


def test_indexes_of_shards_no_longer_planned_are_removed(tiny_stores, tiny_shards, tmp_path):
    person = _copy(tiny_shards, tmp_path)
    leftover = person / "train-000099.tar"
    shutil.copy2(person / "train-000000.tar", leftover)
    shutil.copy2(index_path(person / "train-000000.tar"), index_path(leftover))
    write_shards([tiny_stores / "000.zarr"], tmp_path, TINY_SHARDS, progress=False)
    assert not leftover.exists() and not index_path(leftover).exists()
    assert all(index_path(p).is_file() for p in person.glob("*.tar"))
