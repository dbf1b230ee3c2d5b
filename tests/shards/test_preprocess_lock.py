"""Two shard preprocesses on one shard root at once (a user's `jobs/preprocess.py` beside the main job's data stage):
the second is refused before it reads or writes anything, so the first one's shards, manifest and `verified.json`
stay its own. Before, each planned from what it found and wrote whole manifests from its plan: the first finished
with a complete manifest whose shards the second had overwritten."""

from __future__ import annotations

import pytest

import shards.writer as writer
from common.locks import AlreadyRunning, exclusive
from shards.integrity import verify_against_manifests
from shards.testing import TINY_SHARDS
from shards.writer import ShardConfig, shard_paths, write_shards


def test_a_second_preprocess_on_the_same_shard_root_is_refused(tiny_dataset, tmp_path, monkeypatch):
    stores = [tiny_dataset[1] / "000.zarr"]
    out = tmp_path / "shards"
    real, calls, second = writer.write_shard, [], {}

    def write_shard(task, config):
        calls.append(task.name)
        if len(calls) == 2:  # the first run has written a shard: a second run (other settings) starts
            try:
                second["result"] = write_shards(stores, out, ShardConfig(samples_per_shard=2, raster_backend="cpu"),
                                                progress=False)
            except AlreadyRunning as e:
                second["error"] = e
        return real(task, config)

    monkeypatch.setattr(writer, "write_shard", write_shard)
    first = write_shards(stores, out, TINY_SHARDS, workers=1, progress=False)
    assert not first.failed
    for split in ("train", "test_seq", "test_cam"):  # the first run's shards are what its manifest lists
        verify_against_manifests(shard_paths(out, "000", split))
    assert "error" in second, "the second preprocess ran beside the first"
    assert f"already running on {out}" in str(second["error"])
    monkeypatch.setattr(writer, "write_shard", real)
    again = write_shards(stores, out, TINY_SHARDS, workers=1, progress=False)  # the lock went with the first run
    assert again.written == [] and again.rebuilt == {}


def test_the_lock_sits_in_the_shard_root_and_refuses_while_held(tiny_dataset, tmp_path):
    out = tmp_path / "shards"
    write_shards([tiny_dataset[1] / "000.zarr"], out, TINY_SHARDS, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [writer.LOCK_FILE, "000"]
    with pytest.raises(AlreadyRunning, match="a shard preprocess"):
        with exclusive(out / writer.LOCK_FILE, "a test"):
            write_shards([tiny_dataset[1] / "000.zarr"], out, TINY_SHARDS, workers=1, progress=False)


def test_the_command_line_says_so_and_exits_2(tiny_dataset, tmp_path, monkeypatch, capsys):
    """`jobs/preprocess.py` beside a running preprocess: one line naming the holder, exit 2 (before: a traceback)."""
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "shards"
    script = Path(__file__).parents[2] / "jobs" / "preprocess.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--stores", str(tiny_dataset[1]), "--out", str(out),
                                      "--workers", "1"])
    with exclusive(out / writer.LOCK_FILE, "the main job's data stage"), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a shard preprocess") and f"already running on {out}" in err
    assert "Traceback" not in err
