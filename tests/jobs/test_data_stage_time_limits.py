"""The data stages' item time limit (jobs/ingest.py, jobs/preprocess.py --item-timeout-s; launch_all
--data-item-timeout-s): a person whose capture read never returns (an image on a file system that does not answer,
here a named pipe nobody writes) fails alone after the limit, its process killed; the other persons are ingested and
sharded. Before, the read held the stage, and the main job, forever."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from common.process_pool import ItemTimedOut
from jobs.ingest import IngestArgs
from jobs.ingest import main as ingest
from jobs.launch_all import LaunchAllArgs, check_options
from jobs.preprocess import PreprocessArgs
from jobs.preprocess import main as preprocess
from shards.contract import PersonCapture
from shards.testing import TINY_INGEST, TINY_SHARDS
from shards.writer import shard_paths

LIMIT_S = 4.0


def _hang(path: Path) -> Path:
    """Replace the file at `path` by a named pipe: opening it for reading waits for a writer that never comes."""
    path.unlink()
    os.mkfifo(path)
    return path


def _first_frame(captures: Path, person: str) -> tuple[PersonCapture, str, int]:
    capture = PersonCapture(captures, person)
    seq = capture.sequences()[0]
    return capture, seq, capture.timesteps(seq)[0]


@pytest.fixture
def captures(tiny_dataset, tmp_path) -> Path:
    dst = tmp_path / "captures"
    shutil.copytree(tiny_dataset[0], dst, symlinks=True)
    return dst


@pytest.mark.timeout(180)
def test_an_ingest_whose_read_hangs_fails_its_person_alone_after_the_limit(captures, tmp_path):
    """With one worker too (the persons then run one process each: a limit needs a process to kill)."""
    workers = 1
    capture, seq, t = _first_frame(captures, "001")
    _hang(capture.mesh_path(seq, t))
    start = time.monotonic()
    results, errors = ingest(IngestArgs(captures=captures, out=tmp_path / "zarr", persons="all", ingest=TINY_INGEST,
                                        workers=workers, item_timeout_s=LIMIT_S))
    assert sorted(results) == ["000"] and (tmp_path / "zarr" / "000.zarr").is_dir()
    assert list(errors) == ["001"] and isinstance(errors["001"], ItemTimedOut)
    assert f"still running after the time limit of {LIMIT_S:g} s" in str(errors["001"])
    assert not (tmp_path / "zarr" / "001.zarr").exists()  # nothing half-written
    assert time.monotonic() - start < 90


@pytest.mark.timeout(240)
def test_a_shard_whose_image_read_hangs_fails_its_person_alone_after_the_limit(captures, tmp_path):
    results, errors = ingest(IngestArgs(captures=captures, out=tmp_path / "zarr", persons="all", ingest=TINY_INGEST,
                                        workers=2))
    assert not errors
    capture, seq, t = _first_frame(captures, "001")
    image = capture.image_path(seq, t, "222200037")
    original = image.read_bytes()
    _hang(image)  # after the ingest: the shards stage reads the images again
    res = preprocess(PreprocessArgs(stores=tmp_path / "zarr", out=tmp_path / "shards", persons="all",
                                    shards=TINY_SHARDS, workers=2, item_timeout_s=LIMIT_S))
    assert list(res.failed) == ["001"] and "still running after the time limit" in res.failed["001"]
    assert shard_paths(tmp_path / "shards", "000", "train")  # the other person's shards are all written
    # the file system answers again: the next run writes 001's shards and removes the killed writer's temporary file
    image.unlink()
    image.write_bytes(original)
    res = preprocess(PreprocessArgs(stores=tmp_path / "zarr", out=tmp_path / "shards", persons="all",
                                    shards=TINY_SHARDS, workers=2, item_timeout_s=LIMIT_S))
    assert not res.failed and shard_paths(tmp_path / "shards", "001", "train")
    assert sorted(p.name for p in (tmp_path / "shards" / "001").iterdir() if ".tmp" in p.name) == []


@pytest.mark.parametrize("limit", [0, -5, float("nan"), float("inf")])
def test_an_item_time_limit_that_is_no_positive_number_is_refused(limit, tmp_path):
    with pytest.raises(ValueError, match="--item-timeout-s must be a positive number of seconds"):
        IngestArgs(item_timeout_s=limit)
    with pytest.raises(ValueError, match="--item-timeout-s must be a positive number of seconds"):
        PreprocessArgs(item_timeout_s=limit)
    problem = check_options(LaunchAllArgs(workdir=tmp_path, data_item_timeout_s=limit))
    assert problem is not None and problem.startswith("--data-item-timeout-s must be a positive number of seconds")

