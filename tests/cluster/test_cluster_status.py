"""The per-person status-file protocol and the status table."""

from __future__ import annotations

import json

from cluster.status import PersonStatus, StatusReporter, format_duration, format_status_table, read_status, write_state


def test_progress_rate_eta_and_throttle(tmp_path, monkeypatch):
    clock = {"t": 1000.0}
    monkeypatch.setattr("cluster.status.time.time", lambda: clock["t"])
    monkeypatch.setattr("cluster.status.time.monotonic", lambda: clock["t"])
    rep = StatusReporter(tmp_path, "017", attempt=2, min_interval_s=5.0)
    rep.set_state("running")
    assert rep.progress(100, 1100)      # first report: rate origin (resumed at step 100)
    clock["t"] += 1.0
    assert not rep.progress(110, 1100)  # within min_interval_s: skipped
    clock["t"] += 9.0
    assert rep.progress(200, 1100)      # 100 steps in 10 s
    (s,) = read_status(tmp_path)
    assert (s.state, s.attempt, s.step, s.total_steps) == ("running", 2, 200, 1100)
    assert abs(s.steps_per_s - 10.0) < 1e-9
    assert abs(s.eta_s - 90.0) < 1e-9
    table = format_status_table([s], now=clock["t"] + 3)
    assert "017" in table and "200/1100" in table and "1m30s" in table and "3s ago" in table
    # the final step is always written, even inside the throttle window
    clock["t"] += 0.5
    assert rep.progress(1100, 1100)
    rep.set_state("succeeded")
    (s,) = read_status(tmp_path)
    assert s.state == "succeeded" and s.eta_s == 0.0 and s.step == 1100


def test_new_run_restarts_rate_clock_keeps_step(tmp_path):
    rep = StatusReporter(tmp_path, "p", min_interval_s=0.0)
    rep.set_state("running")
    rep.progress(5, 10)
    rep2 = StatusReporter(tmp_path, "p", attempt=1, restarts=1, min_interval_s=0.0)
    rep2.set_state("running")
    (s,) = read_status(tmp_path)
    assert s.step == 5 and s.rate_t0 is None and s.restarts == 1 and s.eta_s is None


def test_read_status_handles_bad_files(tmp_path):
    write_state(tmp_path, "ok", "queued")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "nostate.json").write_text(json.dumps({"person": "nostate"}))
    (tmp_path / ".ok.json.123.tmp").write_text("partial")
    st = {s.person: s for s in read_status(tmp_path)}
    assert set(st) == {"ok", "broken", "nostate"}
    assert st["ok"].state == "queued"
    assert st["broken"].state == "invalid" and "broken.json" in st["broken"].message
    assert st["nostate"].state == "invalid"
    assert "invalid=2" in format_status_table(list(st.values()))
    assert read_status(tmp_path / "missing") == []


def test_a_field_of_the_wrong_type_makes_that_file_invalid_not_the_table(tmp_path):
    """A status file with a valid state but a mistyped field (hand-edited, another version's) is listed as
    invalid, naming the field; the others and the table are unaffected (it raised a TypeError for all)."""
    write_state(tmp_path, "ok", "running")
    bad = {"step": {"step": "12", "total_steps": 10}, "updated_at": {"updated_at": "yesterday"},
           "attempt": {"attempt": True}, "rate_t0": {"rate_t0": float("nan")}, "message": {"message": 3}}
    for name, fields in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"person": name, "state": "running", **fields}))
    (tmp_path / "noperson.json").write_text(json.dumps({"state": "queued", "step": None}))
    st = {s.person: s for s in read_status(tmp_path)}
    assert st["ok"].state == "running" and st["noperson"].state == "queued"
    for name in bad:
        assert st[name].state == "invalid" and f"field {name!r} is" in st[name].message, name
    assert "invalid=5" in format_status_table(list(st.values()))


def test_write_state_rejects_unknown_state(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="unknown state"):
        write_state(tmp_path, "p", "done")


def test_format_duration():
    assert [format_duration(x) for x in (None, 5, 65, 3700, 90000)] == ["-", "5s", "1m05s", "1h01m", "1d01h"]
    assert PersonStatus("p", "queued").eta_s is None


def test_a_run_reads_only_its_own_persons_status_files(tmp_path):
    """The progress line of a run of some persons re-read every status file of the folder each second (1000 opens
    a second on a shared file system at 300 persons), and each SLURM failure read them all (n^2): now the persons'
    own files, the ones that exist."""
    for person in ("a", "b", "c"):
        write_state(tmp_path, person, "running")
    assert [s.person for s in read_status(tmp_path, ["c", "a", "x"])] == ["a", "c"]
    assert [s.person for s in read_status(tmp_path)] == ["a", "b", "c"]
