"""An ingest beside another ingest of the same zarr folder, or beside a shard preprocess reading its stores (a
user's `jobs/ingest.py` beside the main job's data stage): it is refused before it writes anything. Before, two
ingests wrote the same stores (one failing with ENOTEMPTY in `replace_directory`, an `.old-*` folder left), and a
store replaced while shards were made from it gave shards mixing two stores' chunks, or a failed read."""

from __future__ import annotations

import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest

import shards.writer as writer
from common.locks import AlreadyRunning, exclusive
from jobs import ingest as ingest_job
from jobs._plan import runs_in_progress
from shards.ingest import INGEST_WHAT, STORES_LOCK_FILE
from shards.testing import TINY_INGEST, TINY_SHARDS
from shards.writer import write_shards

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "ingest.py"


def test_a_second_ingest_is_refused_in_one_line_naming_the_first(tiny_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "zarr"
    monkeypatch.setattr(sys, "argv", ["jobs/launch_all.py", "--workdir", "nightly"])  # the holder's command line
    with exclusive(out / STORES_LOCK_FILE, INGEST_WHAT):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--captures", str(tiny_dataset[0]), "--out", str(out),
                                          "--workers", "1"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {INGEST_WHAT} is already running on {out} (pid {os.getpid()} on ")
    assert "jobs/launch_all.py --workdir nightly" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [STORES_LOCK_FILE]  # nothing ingested


def test_an_ingest_is_refused_while_a_preprocess_reads_the_stores(tiny_dataset, tmp_path, monkeypatch):
    stores = tmp_path / "zarr"
    shutil.copytree(tiny_dataset[1], stores)
    before = {p.name: os.stat(p).st_ino for p in stores.iterdir()}
    real, ingest = writer.write_shard, {}

    def write_shard(task, config):
        if not ingest:  # shards are being made from the stores: an ingest of them starts
            try:
                ingest["result"] = ingest_job.main(ingest_job.IngestArgs(
                    captures=tiny_dataset[0], out=stores, ingest=TINY_INGEST, workers=1, force=True))
            except AlreadyRunning as e:
                ingest["error"] = e
        return real(task, config)

    monkeypatch.setattr(writer, "write_shard", write_shard)
    result = write_shards([stores / "000.zarr"], tmp_path / "shards", TINY_SHARDS, workers=1, progress=False)
    assert not result.failed
    assert "error" in ingest, "the ingest replaced the stores while shards were made from them"
    message = str(ingest["error"])
    assert message.startswith(f"{INGEST_WHAT} cannot start on {stores} while other processes read it (pid "
                              f"{os.getpid()} on ")
    assert {p.name: os.stat(p).st_ino for p in stores.iterdir()} == before  # the stores as they were, no .old-*
    monkeypatch.setattr(writer, "write_shard", real)
    results, errors = ingest_job.main(ingest_job.IngestArgs(captures=tiny_dataset[0], out=stores,
                                                            ingest=TINY_INGEST, workers=1))
    assert not errors and all(r.skipped for r in results.values())  # the preprocess's lock went with it


def test_the_dry_run_names_an_ingest_or_a_preprocess_in_progress(tmp_path, monkeypatch):
    work = tmp_path / "work"
    assert runs_in_progress(work) == []
    monkeypatch.setattr(sys, "argv", ["jobs/ingest.py", "--out", str(work / "zarr")])
    with exclusive(work / "zarr" / STORES_LOCK_FILE, INGEST_WHAT):
        (running,) = runs_in_progress(work)
    assert running.startswith(f"an ingest into {work / 'zarr'}, or a preprocess reading its stores, is in "
                              f"progress: pid {os.getpid()} on ")
    assert running.endswith(f"jobs/ingest.py --out {work / 'zarr'}")
    monkeypatch.setattr(sys, "argv", ["jobs/preprocess.py"])
    with exclusive(work / "shards" / writer.LOCK_FILE, "a shard preprocess"):
        (running,) = runs_in_progress(work)
    assert running.startswith(f"a shard preprocess on {work / 'shards'} is in progress: pid {os.getpid()} on ")
    with exclusive(work / "shards" / writer.LOCK_FILE, "a shard preprocess"), \
            exclusive(work / "zarr" / STORES_LOCK_FILE, INGEST_WHAT, shared=True):  # one process: named once
        (running,) = runs_in_progress(work)
    assert running.startswith("an ingest into ") and f"pid {os.getpid()} on " in running
