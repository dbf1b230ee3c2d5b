"""A status file is its name's person: a ``person`` field that says otherwise (a copied, hand-edited file) does not
hide that person nor count another twice."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.status import format_status_table, read_status, write_state


def _copy_with_person(status_dir: Path, name: str, person: str) -> None:
    rec = json.loads((status_dir / f"{name}.json").read_text())
    rec["person"] = person
    (status_dir / f"{name}.json").write_text(json.dumps(rec))


def test_a_status_file_whose_person_field_names_another_person_is_invalid(tmp_path: Path) -> None:
    write_state(tmp_path, "000", "running")
    write_state(tmp_path, "001", "failed", message="out of memory")
    _copy_with_person(tmp_path, "001", "000")
    statuses = read_status(tmp_path)
    assert [s.person for s in statuses] == ["000", "001"]
    by_person = {s.person: s for s in statuses}
    assert by_person["000"].state == "running"
    bad = by_person["001"]
    assert bad.state == "invalid" and "001.json" in bad.message and "'person'" in bad.message
    assert "'000'" in bad.message
    table = format_status_table(statuses)
    assert "running=1" in table and "invalid=1" in table


def test_write_state_writes_the_files_person(tmp_path: Path) -> None:
    """write_state keeps the other fields of the file, but not a wrong person: the file it writes reads back valid."""
    write_state(tmp_path, "001", "running")
    _copy_with_person(tmp_path, "001", "000")
    rec = write_state(tmp_path, "001", "succeeded")
    assert rec["person"] == "001"
    assert json.loads((tmp_path / "001.json").read_text())["person"] == "001"
    [status] = read_status(tmp_path)
    assert (status.person, status.state) == ("001", "succeeded")
