"""Names that come from folders and files (person ids, camera serials, sequences) become paths, tar member
names and job names: each is checked where it is first read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common.io import DataError
from common.names import person_id_problem
from shards.contract import Calibration, PersonCapture, find_persons
from shards.ingest import IngestConfig, ingest_person


# summary.json / stages.json: the main job's own files in <workdir>/runs, beside the person folders
@pytest.mark.parametrize("name", ["000 copy", "001,x", "000\n", "-x", ".x", "../x", "a/b", "é", "p" * 65, "",
                                  "summary.json", "stages.json"])
def test_what_is_not_a_person_id(name):
    assert person_id_problem(name) is not None


@pytest.mark.parametrize("name", ["000", "017", "a.b", "Person_1-x", "p" * 64, "summary", "summary.json.1"])
def test_what_is_a_person_id(name):
    assert person_id_problem(name) is None


def test_a_folder_that_is_no_person_id_is_skipped_by_name_and_the_others_stay(capture_copy):
    """'000 copy' (a backup) stopped the whole main job with a traceback after its data stage; '001,x' was split
    into two persons between the stages (the list travels comma-joined), failing every person."""
    for copy in ("000 copy", "000,x", "p" * 70):
        shutil.copytree(capture_copy / "000", capture_copy / copy)
    with pytest.warns(RuntimeWarning) as caught:
        persons = find_persons(capture_copy)
    assert "000 copy" not in persons and "000,x" not in persons and "000" in persons
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3 and all(": skipped: " in m and "is not a person id" in m for m in messages)
    assert any(str(capture_copy / "000 copy") in m for m in messages)


def test_a_camera_serial_with_a_dot_is_refused_naming_the_calibration(capture_copy, tmp_path):
    """A serial '220700191.1' was ingested and sharded; the shard loader then called the new shard corrupt
    (its sample names are split at the first dot) and the whole run stopped."""
    path = PersonCapture(capture_copy, "000").calibration_path
    raw = json.loads(path.read_text())
    serial = sorted(raw["world_2_cam"])[0]
    raw["world_2_cam"][f"{serial}.1"] = raw["world_2_cam"].pop(serial)
    if isinstance(raw["intrinsics"], dict):
        raw["intrinsics"][f"{serial}.1"] = raw["intrinsics"].pop(serial)
    if isinstance(raw.get("image_size"), dict) and serial in raw["image_size"]:
        raw["image_size"][f"{serial}.1"] = raw["image_size"].pop(serial)
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"world_2_cam: camera serial '{serial}.1' must be") as err:
        Calibration.load(path, image_size=(32, 32))
    assert err.value.path == path


def test_a_hidden_folder_among_the_sequences_is_not_a_sequence(capture_copy, tmp_path):
    """A '.ipynb_checkpoints' folder failed the whole person ('timesteps folder is missing')."""
    cap = PersonCapture(capture_copy, "000")
    expected = cap.sequences()
    (cap.dir / "sequences" / ".ipynb_checkpoints").mkdir()
    assert cap.sequences() == expected
    ingest_person(capture_copy, "000", tmp_path / "zarr", IngestConfig(held_out_sequences=1, io_threads=1))


@pytest.mark.parametrize("job", ["ingest", "preprocess"])
def test_a_listed_person_that_is_a_path_is_refused(tiny_captures, tmp_path, monkeypatch, capsys, job):
    """jobs/ingest.py and jobs/preprocess.py wrote '--persons ../elsewhere/x' outside --out (exit code 0)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[2] / "jobs" / f"{job}.py"
    where = ["--captures", str(tiny_captures)] if job == "ingest" else ["--stores", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [str(script), *where, "--out", str(tmp_path / "out"), "--persons", "000,../x"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: --persons: '../x' is not a person id (letters" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.zarr").exists()
