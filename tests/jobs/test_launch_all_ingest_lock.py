"""The main job beside a user's `jobs/ingest.py` into its work directory's zarr folder: its data stage is refused
(exit 2, one `error:` line naming the ingest), not run beside it. Before, both wrote the same stores."""

from __future__ import annotations

import os
import sys

import tyro

from common.locks import exclusive
from jobs import launch_all
from shards.ingest import INGEST_WHAT, STORES_LOCK_FILE


def test_the_main_job_is_refused_while_an_ingest_writes_its_stores(tiny_dataset, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    args = tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(work), "--captures", str(tiny_dataset[0]), "--persons", "000", "--workers", "1",
        "--ingest.held-out-sequences", "1", "--backend", "local", "--no-evaluate", "--min-free-gb", "0"])
    monkeypatch.setattr(sys, "argv", ["jobs/ingest.py", "--out", str(work / "zarr")])
    with exclusive(work / "zarr" / STORES_LOCK_FILE, INGEST_WHAT):
        assert launch_all.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {INGEST_WHAT} is already running on {work / 'zarr'} (pid {os.getpid()} on " in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (work / "zarr").iterdir()) == [STORES_LOCK_FILE]  # nothing ingested
    assert not (work / "shards").exists()
