"""launch_all --dry-run of a subset (--persons) with the tiny base, which is made of every person of the data set:
a requested folder under --captures that is no capture (no calibration) is a failure the real run names
(``ingest: no capture of <p> in the data set (--persons)``, exit code 1: tests/cluster/test_launch_all_options.py::
test_a_requested_person_without_a_capture_fails_at_the_data_stage); the plan named nothing of it."""

from __future__ import annotations

from pathlib import Path

import tyro

from jobs import launch_all


def test_a_requested_folder_without_a_capture_is_planned_to_fail(tiny_dataset, tmp_path: Path, capsys) -> None:
    shared, _, _ = tiny_dataset
    captures = tmp_path / "captures"
    captures.mkdir()
    (captures / "000").symlink_to(shared / "000", target_is_directory=True)
    (captures / "018").mkdir()  # a folder, so --persons accepts it, but no capture
    work = tmp_path / "work"
    args = tyro.cli(launch_all.LaunchAllArgs, args=[
        "--workdir", str(work), "--captures", str(captures), "--persons", "000,018", "--ingest.held-out-sequences",
        "1", "--workers", "1", "--backend", "local", "--min-free-gb", "0", "--no-evaluate", "--dry-run"])
    assert launch_all._needs_tiny_base(args)
    assert launch_all.main(args) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    assert ("ingest 018: fails (no capture of 018 in the data set (--persons): its folder has no "
            "calibration/camera_params.json)") in lines, out
    assert not any(line.startswith(("train 018", "shards 018")) for line in lines), out
    assert any(line.startswith("train 000: train") for line in lines), out
    assert not work.exists()
