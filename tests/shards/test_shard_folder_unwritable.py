"""A person whose shard folder cannot be written (its permissions: a folder copied in from another user, a read-only
copy) fails that person alone at the shards stage, named; the other persons' shards are written. Before, the
OSError of its manifest or `verified.json` write stopped the whole preprocess (and the main job's data stage) for
every person. (The tests run as root, where permissions do not refuse a write: the refusal is injected.)"""

from __future__ import annotations

import errno
import shutil

import pytest

import shards.writer as writer
from shards import integrity
from shards.testing import TINY_SHARDS
from shards.writer import shard_paths, write_shards


def _refuse_in(folder, real, refusing):
    def write(path, *args, **kwargs):
        if refusing and path.parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    return write


@pytest.mark.parametrize("when", ["from the start", "from its first shard on"])
def test_a_person_folder_that_cannot_be_written_fails_that_person_alone(tiny_dataset, tmp_path, monkeypatch, when):
    stores = [tiny_dataset[1] / f"{p}.zarr" for p in ("000", "001")]
    out = tmp_path / "shards"
    refusing = [True] if when == "from the start" else []
    real_write_shard = writer.write_shard

    def write_shard(task, config):
        entry = real_write_shard(task, config)
        if task.out_dir == str(out / "000"):
            refusing.append(True)  # its manifest and records are refused when the shard is done
        return entry

    monkeypatch.setattr(writer, "write_shard", write_shard)
    monkeypatch.setattr(writer, "atomic_write_json", _refuse_in(out / "000", writer.atomic_write_json, refusing))
    monkeypatch.setattr(integrity, "atomic_write_json", _refuse_in(out / "000", integrity.atomic_write_json,
                                                                   refusing))
    result = write_shards(stores, out, TINY_SHARDS, workers=1, progress=False)
    assert list(result.failed) == ["000"]
    assert "Permission denied" in result.failed["000"] and str(out / "000") in result.failed["000"]
    assert shard_paths(out, "001", "train")  # the other person is complete
    integrity.verify_against_manifests(shard_paths(out, "001", "train"))


def test_a_failed_person_whose_manifest_cannot_be_marked_does_not_stop_the_others(tiny_dataset, tmp_path,
                                                                                  monkeypatch):
    stores = [tiny_dataset[1] / f"{p}.zarr" for p in ("000", "001")]
    out = tmp_path / "shards"
    write_shards(stores, out, TINY_SHARDS, workers=1, progress=False)
    misnamed = tmp_path / "zarr" / "000.zarr"  # person 001's store under 000's name: 000 fails planning
    shutil.copytree(stores[1], misnamed)
    shard_paths(out, "001", "train")[0].unlink()  # 001 has a shard to write again
    monkeypatch.setattr(writer, "atomic_write_json", _refuse_in(out / "000", writer.atomic_write_json, [True]))
    result = write_shards([misnamed, stores[1]], out, TINY_SHARDS, workers=1, progress=False)
    assert list(result.failed) == ["000"] and "could not be marked incomplete" in result.failed["000"]
    assert result.written == ["001/train-000000.tar"]
