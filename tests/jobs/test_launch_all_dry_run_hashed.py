"""launch_all --dry-run on a capture touched, copied without mtimes or moved: it does not hash, and it says what the
real run does: the files are hashed and the store kept if their content is unchanged, else ingested again (a
capture whose folders' or files' names changed, or a store without a table, is ingested again: it says only that)."""

from __future__ import annotations

import shutil

import pytest
import tyro

import shards.ingest as ingest
from jobs import _plan, launch_all
from shards.ingest import CAPTURE_CHANGED, HASHED

TINY = ["--ingest.held-out-sequences", "1", "--shards.samples-per-shard", "4", "--shards.raster-backend", "cpu"]


@pytest.fixture
def work(tiny_dataset, tmp_path):
    """(a work directory with person 000's store and shards, a copy of its capture without mtimes)."""
    captures, stores, shards = tiny_dataset
    work = tmp_path / "work"
    shutil.copytree(stores / "000.zarr", work / "zarr" / "000.zarr")
    shutil.copytree(shards / "000", work / "shards" / "000")
    moved = tmp_path / "moved"
    shutil.copytree(captures / "000", moved / "000", copy_function=shutil.copyfile)  # cp -r: new mtimes
    return work, moved


def _ingest_line(work, captures, monkeypatch) -> str:
    monkeypatch.setattr(ingest, "_read_hashed", lambda path: pytest.fail(f"{path} read by the dry run"))
    args = tyro.cli(launch_all.LaunchAllArgs, args=["--workdir", str(work), "--captures", str(captures),
                                                    "--persons", "000", *TINY, "--workers", "1"])
    plan = _plan.Plan()
    _plan._plan_data(args, plan, "000")
    (line,) = [line.strip() for line in plan.lines() if line.strip().startswith("ingest 000:")]
    return line


def test_a_copied_capture_is_said_to_be_hashed(work, monkeypatch):
    line = _ingest_line(*work, monkeypatch)
    assert line == f"ingest 000: ingest ({CAPTURE_CHANGED}; {HASHED})"


def test_a_capture_with_another_layout_is_said_to_be_ingested_again(work, monkeypatch):
    (work[1] / "000" / "tracking" / "notes.txt").write_text("x")
    line = _ingest_line(*work, monkeypatch)
    assert line == f"ingest 000: ingest ({CAPTURE_CHANGED})"
