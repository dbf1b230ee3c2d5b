"""`write_shards` holds the lock of the folder of the stores it reads (`STORES_LOCK_FILE`) shared for its whole run:
an ingest into that folder cannot replace a store while shards are made from it (tests/jobs/test_ingest_lock.py),
a preprocess is refused while an ingest runs there, and preprocesses reading the same stores into other shard
roots still run together."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

import shards.writer as writer
from common.locks import AlreadyRunning, exclusive, lock_holder
from shards.ingest import INGEST_WHAT, STORES_LOCK_FILE
from shards.integrity import verify_against_manifests
from shards.testing import TINY_SHARDS
from shards.writer import ShardConfig, shard_paths, write_shards


def test_two_preprocesses_of_one_stores_folder_into_two_shard_roots_both_succeed(tiny_dataset, tmp_path,
                                                                                monkeypatch):
    stores = [tiny_dataset[1] / "000.zarr"]
    real, second = writer.write_shard, {}

    def write_shard(task, config):
        if not second:  # the first run holds its locks: a second one, into another shard root, starts
            second["reader"] = lock_holder(tiny_dataset[1] / STORES_LOCK_FILE)
            second["result"] = write_shards(stores, tmp_path / "b", ShardConfig(samples_per_shard=2,
                                                                                raster_backend="cpu"),
                                            progress=False)
        return real(task, config)

    monkeypatch.setattr(writer, "write_shard", write_shard)
    first = write_shards(stores, tmp_path / "a", TINY_SHARDS, workers=1, progress=False)
    assert not first.failed and first.written
    assert not second["result"].failed and second["result"].written
    assert second["reader"] is not None and f"pid {os.getpid()} on " in second["reader"]  # held, shared
    for root in ("a", "b"):
        for split in ("train", "test_seq", "test_cam"):
            verify_against_manifests(shard_paths(tmp_path / root, "000", split))
    assert lock_holder(tiny_dataset[1] / STORES_LOCK_FILE) is None  # released with the runs


def test_a_preprocess_is_refused_while_an_ingest_writes_the_stores(tiny_dataset, tmp_path, monkeypatch):
    stores = tmp_path / "zarr"  # a copy: the shared data set's lock is not held for other tests' preprocesses
    shutil.copytree(tiny_dataset[1], stores)
    monkeypatch.setattr(sys, "argv", ["jobs/ingest.py", "--persons", "000"])
    out = tmp_path / "shards"
    with exclusive(stores / STORES_LOCK_FILE, INGEST_WHAT):
        with pytest.raises(AlreadyRunning) as err:
            write_shards([stores / "000.zarr"], out, TINY_SHARDS, workers=1, progress=False)
    message = str(err.value)
    assert message.startswith(f"{INGEST_WHAT} is already running on {stores} (pid {os.getpid()} on ")
    assert "jobs/ingest.py --persons 000" in message
    assert sorted(p.name for p in out.iterdir()) == [writer.LOCK_FILE]  # nothing read or written
    assert lock_holder(out / writer.LOCK_FILE) is None  # the shard root's lock was let go
