"""A capture with a folder or file name that is not valid UTF-8 (copied from a system with another encoding): the
ingest names the sequence folder; the capture fingerprint no longer stops with a bare UnicodeEncodeError that names
no file (from a thread of its stat pool), and stores of valid names keep their fingerprints."""

from __future__ import annotations

import os

import pytest

from common.io import DataError
from shards.contract import PersonCapture
from shards.ingest import IngestConfig, _fingerprint, ingest_decision, ingest_person

CONFIG = IngestConfig(held_out_sequences=1, io_threads=2)


def _rename_bytes(folder, name: str, new: bytes) -> None:
    os.rename(os.fsencode(folder / name), os.fsencode(folder) + b"/" + new)


def test_a_sequence_named_in_another_encoding_is_refused_naming_its_folder(capture_copy, tmp_path):
    sequences = capture_copy / "000" / "sequences"
    first = sorted(os.listdir(sequences))[0]
    _rename_bytes(sequences, first, first.encode() + b"\xe9")  # latin-1 'é'
    _rename_bytes(capture_copy / "000" / "tracking", first, first.encode() + b"\xe9")
    assert ingest_decision(capture_copy, "000", tmp_path / "zarr", CONFIG).reason is not None  # the dry run's view
    with pytest.raises(DataError, match=rf"sequence folder '{first}\\udce9': its name is not valid UTF-8") as err:
        ingest_person(capture_copy, "000", tmp_path / "zarr", CONFIG)
    assert err.value.path == sequences
    str(err.value).encode()  # the message prints on any terminal
    assert not (tmp_path / "zarr" / "000.zarr").exists()


def test_a_stray_file_named_in_another_encoding_changes_the_fingerprint_without_a_crash(capture_copy):
    capture = PersonCapture(capture_copy.resolve(), "000")
    before = _fingerprint(capture, CONFIG)
    (capture.dir / "calibration" / "notes.txt").write_text("x")
    _rename_bytes(capture.dir / "calibration", "notes.txt", b"notes-\xe9.txt")
    after = _fingerprint(capture, CONFIG)
    assert after != before
    os.remove(os.fsencode(capture.dir / "calibration") + b"/notes-\xe9.txt")
    assert _fingerprint(capture, CONFIG) == before
